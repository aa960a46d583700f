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


def unit_bounds(
    pixels: np.ndarray, intensity: Intensity, window: tuple[float, float] = LUNG_WINDOW
) -> tuple[float, float]:
    """The values of ``pixels`` that map to grey 0 and 1 (see module docstring). For 16-bit values of no known unit
    they depend on the values themselves: pass the whole study, not a batch of its slices."""
    if intensity == "hu":
        return float(window[0]), float(window[1])
    if intensity == "grey8":
        return 0.0, 255.0
    if intensity == "grey16":
        lo, hi = np.percentile(pixels, [0.5, 99.5])
        return float(lo), float(lo) + max(float(hi - lo), 1.0)
    raise ValueError(f"unknown intensity unit {intensity!r}")


def to_unit(
    pixels: np.ndarray,
    intensity: Intensity,
    window: tuple[float, float] = LUNG_WINDOW,
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """Map pixels of the given unit to float32 grey values in [0, 1] (see module docstring).

    ``bounds`` (from :func:`unit_bounds` on the whole study) maps a subset of a study's slices exactly as the
    whole study; without them they are computed from ``pixels``.
    """
    lo, hi = bounds if bounds is not None else unit_bounds(pixels, intensity, window)
    out = np.subtract(pixels, np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out)


def hu_to_unit_level(hu: float, window: tuple[float, float] = LUNG_WINDOW) -> float:
    """The [0, 1] grey level at which a HU value is displayed in ``window``."""
    lo, hi = window
    return float(np.clip((hu - lo) / (hi - lo), 0.0, 1.0))
