"""Slice selection after paper 002 (COVID-CTset): keep the slices in which the inside of the lung is visible.

Paper rule, on 512x512 16-bit slices: count the "dark" pixels (raw value < 300) in the central box
x 120-370, y 240-340; over the patient's series, threshold = (max count - min count) / 1.5; keep slices whose count is
above the threshold.

Ours works on any unit and size:

* the box is scaled with the image: x 120/512..370/512 of the width, y 240/512..340/512 of the height;
* the dark level is expressed in HU. COVID-CTset stores DICOM values with the usual rescale intercept of -1024, so
  raw 300 is -724 HU. For 8-bit slices, which we take as displayed in the lung window (see ``window.py``), -724 HU is
  grey level 106 (0.417 of full scale); raw 16-bit values are taken as HU + 1024;
* the box assumes a whole-chest field of view. A study whose pixel spacing gives a field of view narrower than
  250 mm both ways is a crop around the lungs, centred on the mediastinum, where the box would see no lung: there
  the dark pixels of the whole frame are counted instead;
* a series shorter than ``min_slices`` (single images included) or whose counts barely vary keeps every slice and
  says why, instead of dropping slices on noise.
"""

from __future__ import annotations

import math
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
FEW_KEPT = 5  # fewer kept slices than this (of more) are reported: the patient rules then rest on a handful
# A whole-chest field of view is wider than this (COVID-CTset: 512 px of about 0.7 mm, about 360 mm); a narrower
# one both ways is a crop around the lungs, whose centre is the mediastinum.
NARROW_FOV_MM = 250.0
WHOLE_FRAME = ((0.0, 1.0), (0.0, 1.0))


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


def dark_counts(
    pixels: np.ndarray, intensity: Intensity, box: tuple[tuple[float, float], tuple[float, float]] = (BOX_X, BOX_Y)
) -> np.ndarray:
    """Number of dark pixels in ``box`` (x and y fractions of the width and height; default: paper 002's central
    box) of each slice, scaled to 512x512 pixel units."""
    h, w = pixels.shape[1:]
    (bx0, bx1), (by0, by1) = box
    x0, x1 = round(bx0 * w), round(bx1 * w)
    y0, y1 = round(by0 * h), round(by1 * h)
    counts = (pixels[:, y0:y1, x0:x1] < dark_level(intensity)).sum(axis=(1, 2)).astype(np.float64)
    return counts * (512.0 * 512.0) / float(h * w)


def field_of_view_mm(shape: tuple[int, ...], spacing: tuple[float, float, float] | None) -> tuple[float, float] | None:
    """(width, height) of a slice in mm, or ``None`` when the spacing is unknown (or not a positive number)."""
    if spacing is None or not all(math.isfinite(v) and v > 0 for v in spacing[1:]):
        return None
    return shape[-1] * spacing[2], shape[-2] * spacing[1]


def select_slices(
    pixels: np.ndarray,
    intensity: Intensity,
    *,
    spacing: tuple[float, float, float] | None = None,
    min_slices: int = MIN_SLICES,
    divisor: float = DIVISOR,
) -> SliceSelection:
    """Apply the paper-002 rule to a ``(slices, rows, cols)`` array in the given unit.

    With the ``(slice, row, column)`` spacing in mm, a field of view narrower than :data:`NARROW_FOV_MM` both ways
    (a crop around the lungs) counts the dark pixels of the whole frame instead of the central box, which such a
    crop centres on the mediastinum.
    """
    fov = field_of_view_mm(pixels.shape, spacing)
    narrow = fov is not None and max(fov) < NARROW_FOV_MM
    box = WHOLE_FRAME if narrow else (BOX_X, BOX_Y)
    counts = dark_counts(pixels, intensity, box)
    n = len(counts)
    if narrow:
        method = f"dark-pixel count in the whole frame (field of view under {NARROW_FOV_MM:g} mm: a crop), in HU"
    else:
        method = "dark-pixel count in the central box (paper 002, in HU)"
    params = {
        "dark_level": dark_level(intensity),
        "unit": intensity,
        "divisor": divisor,
        "min_slices": min_slices,
        "box": {"x": list(box[0]), "y": list(box[1])},
        "field_of_view_mm": None if fov is None else [round(v, 1) for v in fov],
    }
    if n < min_slices:
        return SliceSelection.keep_all(counts, method, f"{n} slice(s) < {min_slices}: all kept", params)
    box_area = 512.0 * 512.0 * (box[0][1] - box[0][0]) * (box[1][1] - box[1][0])
    spread = float(counts.max() - counts.min())
    if spread < MIN_SPREAD * box_area:
        return SliceSelection.keep_all(counts, method, "dark-pixel counts barely vary: all kept", params)
    threshold = spread / divisor
    kept = counts > threshold
    return SliceSelection(kept, counts, threshold, method, _few_kept_note(int(kept.sum()), n), params)


def _few_kept_note(k: int, n: int) -> str:
    """A warning when the rule kept fewer than :data:`FEW_KEPT` of ``n`` slices (a series cut short above or
    below the lungs, a crop, a scout): every patient rule then decides from those few."""
    if k >= min(FEW_KEPT, n):
        return ""
    which = "it" if k == 1 else "them"
    return (
        f"only {k} of {n} slices kept by slice selection: the decision rests on {which} alone; check that the "
        "series covers the lungs, or classify every slice (--no-select)"
    )
