"""Which model reads a study, and whether a plain image is a CT slice or an X-ray: one place for CLI and service.

DICOM says its modality in the header. A NIfTI volume or a folder of images is a CT series. A single PNG, JPEG or
TIFF says nothing: the user's ``modality`` decides; otherwise the model's own modality when a model is named;
otherwise the view classifier (:func:`lungsight.inference.view.guess_image_modality`), which tells CT slices from
radiographs. The default model is ``ct-default`` for CT and ``cxr-default`` for X-rays.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

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
            study, lambda m: load_study(path, series_uid=series_uid, modality=m, tiff_intercept=tiff_intercept)
        )
    return study, model if model is not None else DEFAULT_MODELS[study.modality]


def settle_image_modality(study: Study, reread: Callable[[str], Study]) -> Study:
    """A single plain image read without a stated modality (so, as CT): re-read it as an X-ray when the view
    classifier says it is one. Any other study is returned as it is."""
    if study.source_format != "image":
        return study
    from lungsight.inference.view import guess_image_modality
    from lungsight.preprocess.window import to_unit

    if guess_image_modality(to_unit(study.pixels[0], study.intensity)) == "XR":
        return reread("XR")
    return study
