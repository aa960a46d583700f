"""Three-class prediction on one frontal chest X-ray, with the share of its evidence inside the lungs.

Steps: the X-ray input contract (frontal views only: the DICOM header, else the view classifier) -> lung
segmentation -> the model's preprocessing scheme (paper 004: ``raw``, ``cropped`` or ``segmented``) -> softmax over
the classes -> Grad-CAM of the predicted class -> the share of its energy inside the lung mask. A prediction whose
share is below the model's ``lung_share_flag`` is flagged: paper 004 showed networks scoring well by reading text
stamps and the sternum, and this is how a user sees it happen on their own image.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from lungsight.about import DISCLAIMER, __version__
from lungsight.errors import InputContractError
from lungsight.explain.gradcam import cam_energy_inside
from lungsight.preprocess.window import to_unit
from lungsight.study import Study

if TYPE_CHECKING:
    from lungsight.inference.detector import Detector, Prediction
    from lungsight.preprocess.lung_fields import LungSegmenter


@lru_cache(maxsize=4)
def _segmenter(name: str | None) -> LungSegmenter:
    from lungsight.preprocess.lung_fields import load_segmenter

    return load_segmenter(name)


def flag_message(share: float | None, threshold: float) -> str | None:
    """The warning for evidence outside the lungs, or ``None`` when the share is at or above ``threshold``."""
    if share is None:
        return "the Grad-CAM map is empty: the evidence for this prediction cannot be located"
    if share >= threshold:
        return None
    return (
        f"only {100 * share:.0f} % of the Grad-CAM evidence lies inside the lungs (flag below "
        f"{100 * threshold:.0f} %): the model may be reading something other than the lungs (text, markers, "
        "sternum, borders); treat this prediction as a possible shortcut, not a finding"
    )


def predict_xray(det: Detector, study: Study, *, explain: bool = True) -> Prediction:
    """Classify one frontal X-ray with an X-ray ``Detector`` (``config["task"] == "cxr"``)."""
    from lungsight.inference.detector import Evidence, Prediction
    from lungsight.io.contract import check_xr_contract
    from lungsight.preprocess.xray import prepare_xray

    c = det.config
    if study.modality != "XR":
        raise InputContractError(
            f"this study is a CT ({study.n_slices} slice{'s' if study.n_slices != 1 else ''}); the X-ray model "
            f"{c['arch']!r} reads single frontal chest X-rays (use a CT model such as ct-default)"
        )
    if study.n_slices != 1:
        raise InputContractError(f"{study.n_slices} images were given; the X-ray model reads one X-ray at a time")
    view = check_xr_contract(study, "")  # the caller (CLI, service) names the file
    t0 = time.perf_counter()
    segmenter = _segmenter(c.get("segmenter"))
    prepared = prepare_xray(to_unit(study.pixels[0], study.intensity), c["scheme"], segmenter, c["prep_size"])
    t_pre = time.perf_counter() - t0
    t1 = time.perf_counter()
    probs = det.slice_probabilities(prepared.image[None])[0]
    t_inf = time.perf_counter() - t1
    predicted = int(np.argmax(probs))
    label = det.classes[predicted]
    t2 = time.perf_counter()
    share: float | None = None
    evidence: list[Evidence] = []
    threshold = float(c.get("lung_share_flag", 0.5))
    if explain:
        cam = det.explain(prepared.image[None], predicted)[0]
        share = cam_energy_inside(cam, prepared.lung_mask)
        evidence = [Evidence(0, label, float(probs[predicted]), prepared.image, cam, mask=prepared.lung_mask)]
        evidence[0].extra["lung_share"] = share
    t_exp = time.perf_counter() - t2
    flag = flag_message(share, threshold) if explain else None
    warnings = list(study.warnings)
    if prepared.note:
        warnings.append(prepared.note)
    if flag:
        warnings.append(flag)
    entry = det.entry
    result: dict[str, Any] = {
        "lungsight_version": __version__,
        "disclaimer": DISCLAIMER,
        "input": study.summary(),
        "model": {
            "name": entry.name if entry else c["arch"],
            "arch": c["arch"],
            "sha256": entry.sha256 if entry else None,
            "classes": det.classes,
            "input_size": c["input_size"],
            "scheme": c["scheme"],
        },
        "decision": {
            "label": label,
            "rule": "argmax",
            "score": float(probs[predicted]),
            "positive": label == c["positive_class"],
        },
        "probabilities": {cls: float(probs[k]) for k, cls in enumerate(det.classes)},
        "view": {"kind": view.kind, "source": view.source, "probabilities": view.probabilities},
        "evidence": {
            "lung_share": share,
            "lung_area": float(prepared.lung_mask.mean()),
            "flagged": bool(flag) if explain else None,
            "flag_below": threshold,
            "explained_class": label if explain else None,
            "segmenter": segmenter.name,
            "mask_plausible": bool(prepared.mask_ok),
            "scheme": c["scheme"],
        },
        "overlays": [],
        "timings_s": {"preprocess": t_pre, "inference": t_inf, "explain": t_exp, "total": time.perf_counter() - t0},
        "warnings": warnings,
    }
    return Prediction(result, evidence)
