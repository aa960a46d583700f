"""Which modality an upload is read as, which model answers a study, and the models loaded once for all requests."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from lungsight.errors import ModelError
from lungsight.inference.detector import Detector
from lungsight.io.contract import check_xr_contract
from lungsight.serve.settings import Settings
from lungsight.serve.uploads import RequestError
from lungsight.study import Study

MODALITIES = ("CT", "XR")


class Predictor(Protocol):
    """What the service needs of a model: ``Detector`` for CT, and the X-ray detector with the same interface."""

    def predict(self, study: Study) -> Any: ...


def choose_modality(requested: str | None) -> str | None:
    """The ``modality`` passed to ``load_study``: what the client asked for, else ``None``.

    DICOM and NIfTI say what they are themselves. A single PNG/JPEG/TIFF says nothing: it is read as CT and then
    :func:`lungsight.inference.route.settle_image_modality` (the same rule as ``lungsight predict``) asks the view
    classifier whether it is an X-ray.
    """
    if requested:
        if requested.upper() not in MODALITIES:
            raise RequestError(400, f"modality must be CT or XR, not {requested[:16]!r}")
        return requested.upper()
    return None


def route(study: Study, settings: Settings) -> str:
    """The name of the model that answers ``study``; a lateral X-ray is refused here with the reason."""
    if study.modality == "XR":
        check_xr_contract(study, "upload")  # a lateral view (header, else the view classifier) is refused here
        return settings.xr_model
    return settings.ct_model


class ModelPool:
    """Models by name, each loaded once on first use and guarded by its own lock (Grad-CAM hooks the model)."""

    def __init__(self, loader: Callable[[str | Path], Predictor] = Detector.from_pretrained) -> None:
        self._loader = loader
        self._models: dict[str, tuple[Predictor, threading.Lock]] = {}
        self._loading = threading.Lock()

    def get(self, name: str) -> tuple[Predictor, threading.Lock]:
        """The model and the lock to hold while it predicts; raises ModelError when it cannot be loaded."""
        with self._loading:
            if name not in self._models:
                self._models[name] = (self._loader(name), threading.Lock())
            return self._models[name]

    def loaded(self) -> list[str]:
        return sorted(self._models.copy())  # without the lock, which is held while a model loads


def model_for(study: Study, settings: Settings, pool: ModelPool) -> str:
    """Route ``study`` and make sure its model is loaded; an unavailable model is a clear 422 (or 503 for CT)."""
    name = route(study, settings)
    try:
        pool.get(name)
    except ModelError as exc:
        if study.modality == "XR":
            raise RequestError(
                422, f"this is an X-ray and the X-ray model {name!r} is not available on this server ({exc})"
            ) from None
        raise RequestError(503, f"the CT model {name!r} is not available on this server ({exc})") from None
    return name
