"""Slice selection after paper 002 (COVID-CTset): keep the slices in which the inside of the lung is visible.

Paper rule, on 512x512 16-bit slices: count the "dark" pixels (raw value < 300) in the central box
x 120-370, y 240-340; over the patient's series, threshold = (max count - min count) / 1.5; keep slices whose count is
above the threshold.

Ours works on any unit and size:

* the box is scaled with the image: x 120/512..370/512 of the width, y 240/512..340/512 of the height;
* the dark level is expressed in HU. COVID-CTset stores DICOM values with the usual rescale intercept of -1024, so
  raw 300 is -724 HU. For 8-bit slices, which we take as displayed in the lung window (see ``window.py``), -724 HU is
  grey level 106 (0.417 of full scale); raw 16-bit values are taken as HU + 1024;
* a series shorter than ``min_slices`` (single images included) or whose counts barely vary keeps every slice and
  says why, instead of dropping slices on noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lungsight.preprocess.window import LUNG_WINDOW, hu_to_unit_level
from lungsight.study import Intensity

BOX_X = (120 / 512, 370 / 512)
BOX_Y = (240 / 512, 340 / 512)
DARK_HU = 300.0 - 1024.0  # paper's raw level 300 with intercept -1024
DIVISOR = 1.5
MIN_SLICES = 5
MIN_SPREAD = 0.02  # (max - min) dark count below 2 % of the box area: counts do not discriminate


@dataclass
class SliceSelection:
    """Which slices were kept, and the numbers behind the decision."""

    kept: np.ndarray  # bool, one per slice
    dark_counts: np.ndarray
    threshold: float | None
    method: str
    note: str = ""
    params: dict = field(default_factory=dict)

    @property
    def kept_indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.kept)]

    @property
    def dropped_indices(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(~self.kept)]

    @classmethod
    def keep_all(cls, counts: np.ndarray, method: str, note: str, params: dict | None = None) -> SliceSelection:
        """Every slice kept, with the reason in ``note``."""
        return cls(np.ones(len(counts), bool), counts, None, method, note, params or {})

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "threshold": self.threshold,
            "note": self.note,
            "n_kept": len(self.kept_indices),
            "n_dropped": len(self.dropped_indices),
            "dark_counts": [int(c) for c in self.dark_counts],
            "params": self.params,
        }


def dark_level(intensity: Intensity) -> float:
    """The dark-pixel level in the study's own unit."""
    if intensity == "hu":
        return DARK_HU
    if intensity == "grey8":
        return 255.0 * hu_to_unit_level(DARK_HU, LUNG_WINDOW)
    if intensity == "grey16":
        return DARK_HU + 1024.0
    raise ValueError(f"unknown intensity unit {intensity!r}")


def dark_counts(pixels: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Number of dark pixels in the central box of each slice, scaled to 512x512 pixel units."""
    h, w = pixels.shape[1:]
    x0, x1 = round(BOX_X[0] * w), round(BOX_X[1] * w)
    y0, y1 = round(BOX_Y[0] * h), round(BOX_Y[1] * h)
    box = pixels[:, y0:y1, x0:x1]
    counts = (box < dark_level(intensity)).sum(axis=(1, 2)).astype(np.float64)
    return counts * (512.0 * 512.0) / float(h * w)


def select_slices(
    pixels: np.ndarray, intensity: Intensity, *, min_slices: int = MIN_SLICES, divisor: float = DIVISOR
) -> SliceSelection:
    """Apply the paper-002 rule to a ``(slices, rows, cols)`` array in the given unit."""
    counts = dark_counts(pixels, intensity)
    n = len(counts)
    method = "dark-pixel count in the central box (paper 002, in HU)"
    params = {
        "dark_level": dark_level(intensity),
        "unit": intensity,
        "divisor": divisor,
        "min_slices": min_slices,
    }
    if n < min_slices:
        return SliceSelection.keep_all(counts, method, f"{n} slice(s) < {min_slices}: all kept", params)
    box_area = 512.0 * 512.0 * (BOX_X[1] - BOX_X[0]) * (BOX_Y[1] - BOX_Y[0])
    spread = float(counts.max() - counts.min())
    if spread < MIN_SPREAD * box_area:
        return SliceSelection.keep_all(counts, method, "dark-pixel counts barely vary: all kept", params)
    threshold = spread / divisor
    kept = counts > threshold
    return SliceSelection(kept, counts, threshold, method, "", params)
