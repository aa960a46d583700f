"""The input contract of the CT model: are these pixels what it expects?

:func:`check_ct_contract` raises :class:`~lungsight.errors.InputContractError` when the model cannot read the
study at all and appends a warning to ``study.warnings`` when it can but the result deserves doubt. It is
called by :func:`lungsight.io.load_study` for every CT study and again by the CT prediction path, so it
never adds the same warning twice.
"""

from __future__ import annotations

import math

import numpy as np

from lungsight.errors import InputContractError
from lungsight.study import Study

#: Plausible Hounsfield range; values outside it are reported (scanner padding is often -2048 or -3024).
HU_RANGE = (-2000.0, 5000.0)
#: A CT of the chest has air: its 1st percentile must lie below this (HU).
AIR_PERCENTILE_MAX = -500.0
#: Below this standard deviation (grey levels) an 8-bit image is considered blank.
MIN_GREY8_STD = 2.0


def _warn(study: Study, message: str) -> None:
    if message not in study.warnings:
        study.warnings.append(message)


def _sample(pixels: np.ndarray) -> np.ndarray:
    """An in-plane strided subset of at most ~1 million values, for statistics on large volumes."""
    step = max(1, math.ceil(math.sqrt(pixels.size / 1_000_000)))
    return pixels[:, ::step, ::step]


def check_ct_contract(study: Study, source: str) -> None:
    """Check that ``study`` can be read by the CT model; ``source`` names the input in messages."""
    if study.modality != "CT":
        dicom_modality = study.metadata.get("Modality", study.modality)
        raise InputContractError(f"{source}: this is an X-ray (Modality {dicom_modality}), the CT model cannot read it")
    pixels = study.pixels
    if study.intensity == "hu":
        low, high = float(pixels.min()), float(pixels.max())
        if low >= 0 and high <= 255:
            raise InputContractError(
                f"{source}: values {low:g}-{high:g} (within 0-255) look like display grey levels, not "
                "Hounsfield units; pass the original DICOM/NIfTI or the images as PNG"
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
            "raw 16-bit values are scaled by their own minimum and maximum; contrast may differ from "
            "the 8-bit images the model was trained on",
        )
