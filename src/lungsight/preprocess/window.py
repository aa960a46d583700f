"""Intensity windowing: every study becomes grey values in [0, 1] the same way for training and prediction.

* Hounsfield units are mapped through the lung window (centre -600 HU, width 1500 HU, i.e. -1350..150 HU).
* 8-bit images (the COVID-CT PNG/JPEG slices, exported screenshots) are taken as already windowed for display and
  divided by 255. The public 8-bit CT datasets are, as far as their papers say, exported in a lung window; this is the
  assumption behind mixing 8-bit and HU inputs, and it is stated in the docs.
* Raw 16-bit values without a known unit are scaled between their 0.5th and 99.5th percentiles over the whole study.
"""

from __future__ import annotations

import numpy as np

from lungsight.study import Intensity

LUNG_WINDOW: tuple[float, float] = (-1350.0, 150.0)  # centre -600 HU, width 1500 HU


def window_bounds(center: float, width: float) -> tuple[float, float]:
    """(low, high) HU of a window given as centre and width."""
    return center - width / 2.0, center + width / 2.0


def to_unit(pixels: np.ndarray, intensity: Intensity, window: tuple[float, float] = LUNG_WINDOW) -> np.ndarray:
    """Map pixels of the given unit to float32 grey values in [0, 1] (see module docstring)."""
    x = np.asarray(pixels, dtype=np.float32)
    if intensity == "hu":
        lo, hi = window
        out = (x - lo) / (hi - lo)
    elif intensity == "grey8":
        out = x / 255.0
    elif intensity == "grey16":
        lo, hi = np.percentile(x, [0.5, 99.5])
        out = (x - lo) / max(float(hi - lo), 1.0)
    else:
        raise ValueError(f"unknown intensity unit {intensity!r}")
    return np.clip(out, 0.0, 1.0, out=out).astype(np.float32, copy=False)


def hu_to_unit_level(hu: float, window: tuple[float, float] = LUNG_WINDOW) -> float:
    """The [0, 1] grey level at which a HU value is displayed in ``window``."""
    lo, hi = window
    return float(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))
