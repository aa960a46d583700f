"""NIfTI volumes (.nii, .nii.gz) as axial slices in radiological display order.

The volume is reoriented to canonical RAS with :func:`nibabel.as_closest_canonical` (voxel axes
i→patient right, j→anterior, k→superior) and then laid out as ``(slice, row, column)`` with slices running
inferior→superior, rows anterior (top)→posterior and columns patient-right (image left)→patient-left: the
layout of a DICOM axial series sorted along +z. Only the voxel data, the zooms and the orientation codes are
used; the header's free-text fields (``descrip``, ``db_name``, ``aux_file``, ``intent_name``) never reach
the Study.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

try:
    from isal import igzip
except ImportError:  # optional: nibabel's zlib opener is used instead
    igzip = None

from lungsight.errors import InputError, UnsupportedInputError
from lungsight.study import Study


def to_display(volume: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """``(i, j, k)`` canonical-RAS voxels as ``(slice, row, column)`` in radiological display order (converted to
    ``dtype`` in the same pass when given)."""
    return np.ascontiguousarray(volume[::-1, ::-1, :].transpose(2, 1, 0), dtype=dtype)


def from_display(pixels: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_display`: ``(slice, row, column)`` -> canonical-RAS voxels ``(i, j, k)``."""
    return np.ascontiguousarray(pixels.transpose(2, 1, 0)[::-1, ::-1, :])


@contextmanager
def _nifti_file(path: Path) -> Iterator[nib.Nifti1Image | nib.Nifti2Image]:
    """The image of ``path``, its voxels readable inside the ``with`` block.

    Compressed files are streamed through ISA-L's gzip (``isal``, two to three times faster than zlib, which was
    most of the time spent reading a CT volume) when it is installed, otherwise through nibabel's own opener.
    """
    if path.name.lower().endswith(".gz") and igzip is not None:
        with igzip.open(path, "rb") as f:
            holder = nib.FileHolder(fileobj=f)
            files = {"header": holder, "image": holder}
            try:
                image = nib.Nifti1Image.from_file_map(files)
            except HeaderDataError:  # not NIfTI-1: try NIfTI-2 (nib.load does the same)
                f.seek(0)
                image = nib.Nifti2Image.from_file_map(files)
            yield image
    else:
        yield nib.load(str(path))


def _display_hu(image: nib.Nifti1Image) -> tuple[np.ndarray, bool]:
    """The voxels as float32 ``(slice, row, column)`` in display order, scaled by ``scl_slope``/``scl_inter``, and
    whether they can hold NaN or infinity (not when integers are stored and the scaling is finite).

    The stored integers are reordered and converted in one pass, and scaled in place: one float32 copy of the
    volume instead of the three that ``get_fdata`` and a separate reordering copy make (most CT volumes are int16).
    """
    # A proxy reads the stored values and carries the scaling; an array (a reoriented image) is already scaled.
    if nib.is_proxy(image.dataobj):
        raw, slope, inter = np.asanyarray(image.dataobj.get_unscaled()), image.dataobj.slope, image.dataobj.inter
    else:
        raw, slope, inter = np.asanyarray(image.dataobj), 1.0, 0.0
    finite_by_type = (
        np.issubdtype(raw.dtype, np.integer)
        and bool(np.isfinite([slope, inter]).all())
        and float(max(abs(np.iinfo(raw.dtype).min), np.iinfo(raw.dtype).max)) * abs(slope) + abs(inter)
        < float(np.finfo(np.float32).max)
    )
    maybe_non_finite = not finite_by_type
    pixels = to_display(raw, np.float32)
    del raw
    if slope != 1.0:
        pixels *= np.float32(slope)
    if inter != 0.0:
        pixels += np.float32(inter)
    return pixels, maybe_non_finite


def _load_canonical(image: nib.Nifti1Image, label: str) -> tuple[nib.Nifti1Image, str]:
    """The 3-D image reoriented to canonical RAS, and its original axis codes (e.g. "LPS")."""
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    if len(image.shape) != 3:
        raise UnsupportedInputError(
            f"{label}: {len(shape)}-D NIfTI of shape {tuple(shape)} is not supported; pass one 3-D volume"
        )
    try:
        canonical = nib.as_closest_canonical(image)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{label}: corrupt NIfTI voxel data ({type(exc).__name__})") from None
    return canonical, "".join(nib.aff2axcodes(image.affine))


def read_nifti(path: Path, label: str, *, max_pixels: int = 64_000_000) -> Study:
    """Read a NIfTI CT volume (values in HU after ``scl_slope``/``scl_inter``) into a :class:`Study`."""
    try:
        with _nifti_file(path) as image:
            return _read_image(image, label, max_pixels)
    except (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{label}: not a readable NIfTI file ({type(exc).__name__})") from None


def _read_image(image: nib.Nifti1Image, label: str, max_pixels: int) -> Study:
    image, original_codes = _load_canonical(image, label)
    notes: list[str] = []
    i, j, _ = image.shape
    if i * j > max_pixels:
        raise InputError(
            f"{label}: {i}x{j} pixels per slice exceeds the limit of {max_pixels:,} pixels (set max_pixels)"
        )
    qform_code, sform_code = int(image.header["qform_code"]), int(image.header["sform_code"])
    if qform_code == 0 and sform_code == 0:
        notes.append("the NIfTI header has no orientation (qform and sform codes are 0): RAS was assumed")
    tilt = math.degrees(float(np.max(obliquity(image.affine))))
    if tilt > 1.0:
        notes.append(f"the volume is oblique by {tilt:.1f} degrees; shown in the closest axis-aligned orientation")
    try:
        pixels, maybe_non_finite = _display_hu(image)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{label}: corrupt NIfTI voxel data ({type(exc).__name__})") from None
    # one pass when all are finite; none when integers were stored
    bad = None if not maybe_non_finite or np.isfinite(pixels.sum(dtype=np.float64)) else ~np.isfinite(pixels)
    if bad is not None and bad.any():
        fill = float(np.min(pixels[~bad])) if (~bad).any() else -1024.0
        pixels[bad] = fill
        notes.append(f"{int(bad.sum())} voxels were NaN or infinite and were set to {fill:g}")
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return Study(
        pixels=pixels,
        modality="CT",
        intensity="hu",
        spacing=(zooms[2], zooms[1], zooms[0]),
        source_format="nifti",
        metadata={"n_slices": int(pixels.shape[0]), "orientation": "axial", "nifti_axcodes": original_codes},
        warnings=notes,
    )
