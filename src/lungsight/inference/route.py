"""Which model reads a study, and whether a plain image is a CT slice or an X-ray: one place for CLI and service.

DICOM says its modality in the header. A NIfTI volume is a CT series. A PNG, JPEG or TIFF, or a folder or zip of
them, says nothing: the user's ``modality`` decides; otherwise the model's own modality when a model is named;
otherwise the view classifier (:func:`lungsight.inference.view.guess_image_modality`), which tells CT slices from
radiographs. A folder of up to :data:`~lungsight.io.images.MAX_EXAM_IMAGES` images that are all radiographs is an
X-ray exam (a PA and a lateral, say) and is read as its frontal view; one that mixes radiographs and CT slices is
refused. The default model is ``ct-default`` for CT and ``cxr-default`` for X-rays.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lungsight.errors import InputContractError
from lungsight.study import Study

DEFAULT_MODELS = {"CT": "ct-default", "XR": "cxr-default"}


def model_modality(name_or_path: str | Path) -> str:
    """``"CT"`` or ``"XR"``: what the named model (or model file) reads, from its stored configuration."""
    from lungsight.models.pretrained import resolve
    from lungsight.models.weights import read_checkpoint_config

    config = read_checkpoint_config(resolve(name_or_path).path)
    return str(config.get("modality") or ("XR" if config.get("task") in ("cxr", "view") else "CT"))


def load_for_prediction(
    path: str | os.PathLike[str],
    *,
    modality: str | None = None,
    model: str | Path | None = None,
    series_uid: str | None = None,
    tiff_intercept: float = -1024.0,
) -> tuple[Study, str | Path]:
    """Read ``path`` the way the model that will classify it expects; returns the study and that model's name."""
    from lungsight.io import load_study

    if modality is None and model is not None:
        modality = model_modality(model)
    study = load_study(path, series_uid=series_uid, modality=modality, tiff_intercept=tiff_intercept)
    if modality is None:
        study = settle_image_modality(
            study,
            lambda m: load_study(path, series_uid=series_uid, modality=m, tiff_intercept=tiff_intercept),
            label=str(path),
        )
    return study, model if model is not None else DEFAULT_MODELS[study.modality]


def settle_image_modality(study: Study, reread: Callable[[str], Study], label: str | None = None) -> Study:
    """Plain images read without a stated modality (so, as CT): re-read them as an X-ray when the view classifier
    says they are radiographs. Any other study is returned as it is.

    One image: its view decides. A folder or zip of up to ``MAX_EXAM_IMAGES`` images: all radiographs make an X-ray
    exam (re-read as X-ray, which keeps its one frontal view); all CT slices stay a CT series; a mixture is refused
    with the radiographs named (after ``label``, the input's name, when given). Larger folders are CT series and
    are not classified.
    """
    from lungsight.io.images import MAX_EXAM_IMAGES

    if study.source_format not in ("image", "image-folder", "tiff-folder") or study.n_slices > MAX_EXAM_IMAGES:
        return study
    from lungsight.inference.view import guess_image_modality
    from lungsight.preprocess.window import to_unit

    kinds = [guess_image_modality(to_unit(plane, study.intensity)) for plane in study.pixels]
    if all(k == "CT" for k in kinds):
        return study
    if all(k == "XR" for k in kinds):
        return reread("XR")
    radiographs = [name for name, k in zip(study.slice_labels, kinds, strict=True) if k == "XR"]
    where = f"{label}: " if label else ""
    raise InputContractError(
        f"{where}{len(radiographs)} of these {study.n_slices} images look like X-rays to the view classifier "
        f"({', '.join(radiographs)}) and the others like CT slices; pass one study, or state it with --modality"
    )
