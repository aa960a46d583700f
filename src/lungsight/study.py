"""The :class:`Study`: what every reader returns and everything downstream consumes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Modality = Literal["CT", "XR"]
Intensity = Literal["hu", "grey8", "grey16"]
#: What :attr:`Study.pixels` may be stored as for Hounsfield units (any other type is converted to float32).
HU_DTYPES = (np.dtype(np.float32), np.dtype(np.int16))


def fits_int16(low: float, high: float) -> bool:
    """Whether whole numbers from ``low`` to ``high`` fit in int16, as readers store Hounsfield units."""
    info = np.iinfo(np.int16)
    return bool(info.min <= low and high <= info.max)


def sums_fit_int16(values: np.ndarray, offset: float) -> bool:
    """Whether every one of the (non-empty) integer ``values`` plus ``offset`` fits in int16."""
    return fits_int16(int(values.min()) + offset, int(values.max()) + offset)


def int16_wrapped(value: float) -> np.int16:
    """The whole number ``value`` modulo 2**16, as int16. Added to integers in int16 arithmetic, which wraps modulo
    2**16 too, it gives every sum that fits in int16 exactly, whatever the size of ``value``."""
    return np.int16((int(value) + 2**15) % 2**16 - 2**15)


def add_whole_hu(values: np.ndarray, offset: float, out: np.ndarray) -> None:
    """``out[...] = values + offset`` for integer ``values``, a whole ``offset`` and an int16 ``out``, in integer
    arithmetic modulo 2**16 (:func:`int16_wrapped`): exact wherever the sum fits in int16, which the callers check
    (:func:`sums_fit_int16`). Unsigned values of two bytes or more are read as the signed type of their size, the
    same number modulo 2**16, so that no promotion reaches float64 (uint64 with a signed scalar would) and 16-bit
    values add in int16 arithmetic."""
    if values.dtype.kind == "u" and values.dtype.itemsize >= 2:
        values = values.view(values.dtype.str.replace("u", "i"))
    np.add(values, int16_wrapped(offset), out=out, casting="unsafe")


@dataclass(frozen=True)
class SeriesInfo:
    """A series found next to the one that was loaded (only non-identifying fields)."""

    series_uid: str
    modality: str
    n_images: int
    description: str = ""
    orientation: str = ""  # "axial", "coronal", "sagittal", "oblique" or ""


@dataclass
class Study:
    """One patient study, de-identified, with pixels in a documented unit.

    Attributes:
        pixels: ``(n_slices, height, width)`` array. For ``intensity == "hu"`` the values are Hounsfield units, as
            int16 when every one is a whole number in int16's range (the usual CT: a DICOM series with the plain
            rescale, a NIfTI volume of integers with no scaling but a whole intercept; half the memory of
            float32), as float32 otherwise; for ``"grey8"`` they are 0–255 display values and for ``"grey16"``
            raw 16-bit detector/display values, both float32. Take ``pixels.astype(np.float32)`` before arithmetic
            that could leave int16's range.
            Slices are in anatomical order (sorted along the slice normal for DICOM) and rows run top to bottom as a
            radiologist views the image.
        modality: ``"CT"`` for a CT slice series or slice images, ``"XR"`` for a radiograph.
        intensity: the unit of ``pixels`` (see above).
        spacing: ``(slice, row, column)`` spacing in mm where known, otherwise ``None``.
        slice_labels: one short, non-identifying label per slice (an image file name, or ``"slice 0007"``).
        source_format: ``"dicom-series"``, ``"dicom"``, ``"nifti"``, ``"tiff-folder"``, ``"image"``, ``"image-folder"``.
        metadata: technical, non-identifying metadata only (see :mod:`lungsight.io.deid`).
        warnings: things the reader or the input contract noticed that the user should know.
        other_series: series that were found but not loaded (multi-series DICOM folders).
    """

    pixels: np.ndarray
    modality: Modality
    intensity: Intensity
    spacing: tuple[float, float, float] | None = None
    slice_labels: list[str] = field(default_factory=list)
    source_format: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    other_series: list[SeriesInfo] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.pixels.ndim == 2:
            self.pixels = self.pixels[None]
        if self.pixels.ndim != 3:
            raise ValueError(f"Study.pixels must be (slices, rows, cols), got shape {self.pixels.shape}")
        allowed = HU_DTYPES if self.intensity == "hu" else (np.dtype(np.float32),)
        if self.pixels.dtype not in allowed:
            self.pixels = self.pixels.astype(np.float32)
        if not self.slice_labels:
            self.slice_labels = [f"slice {i:04d}" for i in range(self.n_slices)]
        if len(self.slice_labels) != self.n_slices:
            raise ValueError("one slice label per slice is required")

    @property
    def n_slices(self) -> int:
        return int(self.pixels.shape[0])

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable description (no pixels, no identifying data)."""
        return {
            "modality": self.modality,
            "intensity": self.intensity,
            "source_format": self.source_format,
            "n_slices": self.n_slices,
            "shape": list(self.pixels.shape),
            "spacing_mm": list(self.spacing) if self.spacing else None,
            "metadata": self.metadata,
            "warnings": list(self.warnings),
            "other_series": [s.__dict__ for s in self.other_series],
        }

    def __repr__(self) -> str:
        return (
            f"Study(modality={self.modality!r}, intensity={self.intensity!r}, slices={self.n_slices}, "
            f"shape={tuple(self.pixels.shape)}, source={self.source_format!r})"
        )
