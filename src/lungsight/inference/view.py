"""What kind of image is this: a frontal chest X-ray, a lateral one, or a CT slice?

:func:`classify_view` runs the bundled ``xr-view`` classifier (``lungsight/pretrained/xr-view.md``), loaded once per
process. :func:`lungsight.io.contract.check_xr_contract` uses it when a radiograph's header does not state its
view, and :func:`guess_image_modality` uses it to route a lone PNG/JPEG given without a modality.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

ViewKind = Literal["frontal", "lateral", "ct"]

#: The bundled view classifier.
VIEW_MODEL = "xr-view"


@dataclass(frozen=True)
class ViewResult:
    """The view of one image and how it was known.

    Attributes:
        kind: ``"frontal"``, ``"lateral"`` or ``"ct"``.
        probabilities: the classifier's probability per kind; empty when the view came from metadata.
        source: ``"metadata"`` (the DICOM ViewPosition) or ``"classifier"``.
        evidence: one line for reports, e.g. ``"ViewPosition PA in the DICOM header"``.
    """

    kind: ViewKind
    probabilities: dict[str, float] = field(default_factory=dict)
    source: Literal["metadata", "classifier"] = "classifier"
    evidence: str = ""

    @property
    def p(self) -> float | None:
        """The classifier's probability of ``kind`` (``None`` when the view came from metadata)."""
        return self.probabilities.get(self.kind)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for result.json."""
        return {
            "kind": self.kind,
            "source": self.source,
            "probabilities": dict(self.probabilities),
            "evidence": self.evidence,
        }


_lock = threading.Lock()
_loaded: dict[str, tuple[Any, dict[str, Any]]] = {}


def _model(name: str) -> tuple[Any, dict[str, Any]]:
    """(model, config) of a view classifier, loaded and SHA-256 checked once per process."""
    with _lock:
        if name not in _loaded:
            from lungsight.models.pretrained import load_model

            model, config, _ = load_model(name)
            _loaded[name] = (model, config)
        return _loaded[name]


def classify_view(image01: np.ndarray, model: str = VIEW_MODEL) -> ViewResult:
    """Classify one grey image with values in [0, 1] (``(H, W)`` or ``(1, H, W)``) as frontal, lateral or CT.

    The image is prepared exactly as in training (:mod:`lungsight.train.view`): the study's pixels through
    :func:`lungsight.preprocess.window.to_unit`, squeezed to the model's square input, normalised.
    """
    import torch

    from lungsight.preprocess.transforms import model_batch

    x = np.asarray(image01, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.ndim != 2 or min(x.shape) < 2 or not np.all(np.isfinite(x)):
        raise ValueError(f"classify_view needs one finite (H, W) image, got shape {x.shape}")
    net, config = _model(model)
    batch = model_batch(x, config["input_size"], config["in_chans"], tuple(config["mean"]), tuple(config["std"]))
    with torch.no_grad():
        probs = torch.softmax(net(batch), dim=1)[0].tolist()
    probabilities = {c: float(p) for c, p in zip(config["classes"], probs, strict=True)}
    kind = max(probabilities, key=probabilities.__getitem__)
    label = "a CT slice" if kind == "ct" else kind
    return ViewResult(kind, probabilities, "classifier", f"{label} by the view classifier, p={probabilities[kind]:.2f}")  # type: ignore[arg-type]


def guess_image_modality(image01: np.ndarray, model: str = VIEW_MODEL) -> Literal["CT", "XR"]:
    """``"CT"`` when the view classifier takes the image for a CT slice, else ``"XR"`` (frontal or lateral).

    For a single PNG/JPEG given without a modality, whose pixels alone must say which model can read it.
    """
    return "CT" if classify_view(image01, model).kind == "ct" else "XR"
