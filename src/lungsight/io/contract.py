"""The input contracts of the CT and X-ray models: are these pixels what they expect?

:func:`check_ct_contract` raises :class:`~lungsight.errors.InputContractError` when the model cannot read the
study at all and appends a warning to ``study.warnings`` when it can but the result deserves doubt. It is
called by :func:`lungsight.io.load_study` for every CT study and again by the CT prediction path, so it
never adds the same warning twice.

:func:`check_xr_contract` admits frontal chest X-rays only (paper 004): the view comes from the DICOM
ViewPosition when the header states it, otherwise from the bundled view classifier, which also recognises a CT
slice given as an X-ray.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from lungsight.errors import InputContractError
from lungsight.preprocess.transforms import tensor_view
from lungsight.study import Study

if TYPE_CHECKING:
    from lungsight.inference.view import ViewResult

#: Plausible Hounsfield range; values outside it are reported (scanner padding is often -2048 or -3024).
HU_RANGE = (-2000.0, 5000.0)
#: A CT of the chest has air: its 1st percentile must lie below this (HU).
AIR_PERCENTILE_MAX = -500.0
#: A CT of the chest has tissue (muscle, vessels, bone) too: a volume whose highest value lies below this (HU) is
#: air, or lung alone, or unreadable voxels (NaN, read as air), and is refused.
TISSUE_HU_MIN = -500.0
#: Below this standard deviation (grey levels) an 8-bit image is considered blank.
MIN_GREY8_STD = 2.0


def _warn(study: Study, message: str) -> None:
    if message not in study.warnings:
        study.warnings.append(message)


#: About this many voxels (a strided subset) estimate the contract's percentiles and shares on a large volume.
SAMPLE_SIZE = 250_000


def _sample(pixels: np.ndarray) -> np.ndarray:
    """An in-plane strided subset of at most about :data:`SAMPLE_SIZE` values, for statistics on large volumes."""
    step = max(1, math.ceil(math.sqrt(pixels.size / SAMPLE_SIZE)))
    return pixels[:, ::step, ::step]


def check_ct_contract(study: Study, source: str) -> None:
    """Check that ``study`` can be read by the CT model; ``source`` names the input in messages."""
    if study.modality != "CT":
        dicom_modality = study.metadata.get("Modality", study.modality)
        raise InputContractError(f"{source}: this is an X-ray (Modality {dicom_modality}), the CT model cannot read it")
    pixels = study.pixels
    if study.intensity == "hu":
        extremes = torch.aminmax(tensor_view(pixels))  # one pass on PyTorch's threads
        low, high = float(extremes.min), float(extremes.max)
        if low >= 0 and high <= 255:
            raise InputContractError(
                f"{source}: values {low:g}-{high:g} (within 0-255) look like display grey levels, not "
                "Hounsfield units; pass the original DICOM/NIfTI or the images as PNG"
            )
        if high < TISSUE_HU_MIN:
            raise InputContractError(
                f"{source}: no tissue in the volume (its highest value is {high:.0f} HU, below "
                f"{TISSUE_HU_MIN:.0f}): it holds air only, or voxels that could not be read; there is no chest "
                "to classify"
            )
        first_percentile = float(np.percentile(_sample(pixels), 1))
        if first_percentile > AIR_PERCENTILE_MAX:
            _warn(
                study,
                f"no air found (1st percentile {first_percentile:.0f} HU > {AIR_PERCENTILE_MAX:.0f}): "
                "the volume is cropped inside the body or the values are not Hounsfield units",
            )
        if low < HU_RANGE[0] or high > HU_RANGE[1]:
            sample = _sample(pixels)
            outside = float(np.mean((sample < HU_RANGE[0]) | (sample > HU_RANGE[1])))
            _warn(
                study,
                f"values from {low:.0f} to {high:.0f} HU go beyond [{HU_RANGE[0]:.0f}, {HU_RANGE[1]:.0f}] "
                f"({100 * outside:.1f}% of voxels): padding outside the scan field, metal, or not "
                "Hounsfield units",
            )
    elif study.intensity == "grey8":
        std = float(pixels.std())
        if std < MIN_GREY8_STD:
            raise InputContractError(
                f"{source}: the image is nearly constant (standard deviation {std:.2f} grey levels); "
                "it holds no readable anatomy"
            )
    elif study.intensity == "grey16":
        _warn(
            study,
            "raw 16-bit values are scaled between their own 0.5th and 99.5th percentiles; contrast may differ from "
            "the 8-bit images the model was trained on",
        )


#: DICOM ViewPosition values (upper case) of a lateral chest X-ray.
LATERAL_VIEW_POSITIONS = frozenset({"LL", "RL", "LAT", "LATERAL", "L"})
#: ... of an oblique one (also refused: neither frontal nor what the model was trained on).
OBLIQUE_VIEW_POSITIONS = frozenset({"LLO", "RLO", "OBLIQUE"})
_FRONTAL_VIEW_POSITION = re.compile(r"^(PA|AP)\b")


def view_position(text: object) -> str:
    """A ViewPosition (or a data set's view column) as compared here: upper case, spaces collapsed, at most 16
    characters (the length DICOM allows a code string)."""
    return " ".join(str(text or "").upper().split())[:16]


def view_kind(view: object) -> str | None:
    """``"frontal"`` (PA, AP, AP Supine, AP Erect ...), ``"lateral"`` (L, LL, RL, Lat, Lateral), ``"oblique"``
    (LLO, RLO, Oblique) or ``None`` (anything else, or nothing) for a ViewPosition or a data set's view text, in
    any case and spacing. The one rule for every reader, the contract check and the X-ray data tables."""
    position = view_position(view)
    if position in LATERAL_VIEW_POSITIONS:
        return "lateral"
    if position in OBLIQUE_VIEW_POSITIONS:
        return "oblique"
    return "frontal" if _FRONTAL_VIEW_POSITION.match(position) else None


#: The view classifier's probability of "CT slice" from which an image given as an X-ray is refused.
CT_REFUSE_P = 0.9
_ONLY_FRONTAL = "only frontal (PA/AP) views can be classified"


def _where(source: str) -> str:
    """``"source: "`` to start a message, or nothing when the caller names the input itself."""
    return f"{source}: " if source else ""


def check_xr_contract(study: Study, source: str) -> ViewResult:
    """Check that ``study`` is one frontal chest X-ray; return how its view was known.

    Refused with :class:`~lungsight.errors.InputContractError` (``source`` names the input; empty when the caller
    adds the file name itself): a study that is
    not an X-ray or holds more than one image; a nearly constant image; a lateral or oblique view, from the DICOM
    ViewPosition (LL, RL, ... -> lateral, without running the classifier) or, when the header does not state it,
    from the view classifier; an image the classifier takes for a CT slice with p >= :data:`CT_REFUSE_P`. A
    less confident "CT slice" is read as an X-ray with a warning. PA/AP in the header admit the image without
    the classifier.
    """
    if study.modality != "XR":
        raise InputContractError(
            f"{_where(source)}this is a CT (Modality {study.modality}), the X-ray model cannot read it"
        )
    if study.n_slices != 1:
        raise InputContractError(
            f"{_where(source)}an X-ray study is one image, this one has {study.n_slices}; pass one radiograph at a time"
        )
    from lungsight.preprocess.window import to_unit

    image01 = to_unit(study.pixels[0], study.intensity)
    std = 255.0 * float(image01.std())
    if std < MIN_GREY8_STD:
        raise InputContractError(
            f"{_where(source)}the image is nearly constant (standard deviation {std:.2f} grey levels); "
            "it holds no readable anatomy"
        )
    from lungsight.inference.view import ViewResult, classify_view

    position = view_position(study.metadata.get("ViewPosition"))
    kind = view_kind(position)
    if kind in ("lateral", "oblique"):
        raise InputContractError(
            f"{_where(source)}this is {'a lateral' if kind == 'lateral' else 'an oblique'} chest X-ray "
            f"(view {position} from the DICOM header); {_ONLY_FRONTAL}"
        )
    if kind == "frontal":
        return ViewResult("frontal", {}, "metadata", f"ViewPosition {position} in the DICOM header")

    view = classify_view(image01)
    p = view.probabilities
    if p["ct"] >= CT_REFUSE_P:
        raise InputContractError(
            f"{_where(source)}this does not look like a chest X-ray but like a CT slice (view classifier, "
            f"p={p['ct']:.2f}); pass it as a CT (modality CT) or check the file"
        )
    if p["lateral"] > p["frontal"]:
        raise InputContractError(
            f"{_where(source)}this is a lateral chest X-ray (lateral by the view classifier, p={p['lateral']:.2f}); "
            f"{_ONLY_FRONTAL}"
        )
    if view.kind == "ct":
        _warn(
            study,
            f"the view classifier is unsure that this is a chest X-ray (p={p['ct']:.2f} that it is a CT slice); "
            "read as a frontal X-ray",
        )
        return ViewResult("frontal", p, "classifier", f"frontal by the view classifier, p={p['frontal']:.2f}")
    return view
