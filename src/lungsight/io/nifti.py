"""NIfTI volumes (.nii, .nii.gz) as axial slices in radiological display order.

The volume is reoriented to canonical RAS with :func:`nibabel.as_closest_canonical` (voxel axes
i→patient right, j→anterior, k→superior) and then laid out as ``(slice, row, column)`` with slices running
inferior→superior, rows anterior (top)→posterior and columns patient-right (image left)→patient-left: the
layout of a DICOM axial series sorted along +z. Only the voxel data, the zooms and the orientation codes are
used; the header's free-text fields (``descrip``, ``db_name``, ``aux_file``, ``intent_name``) never reach
the Study.

Most CT volumes are stored slice by slice along the patient's z axis (axial, possibly flipped in any axis): those
are streamed (:func:`_read_streamed`), each slab of slices converted to display order as it is decompressed, with
ISA-L decompressing in a thread of its own, so that decompression and conversion overlap and the stored integers
never exist as a whole volume. Integers with no scaling but a whole intercept (most CT volumes) are kept as int16
Hounsfield units as long as every value fits (a slab with one that does not turns the volume into float32 as it is
read); anything else is float32. Any other layout (sagittal or coronal storage, NIfTI-2, complex or RGB voxels)
goes through nibabel's reorientation (:func:`_read_image`), as float32.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import nibabel as nib
import numpy as np
from nibabel.affines import obliquity
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import io_orientation
from nibabel.spatialimages import HeaderDataError
from nibabel.wrapstruct import WrapStructError

try:
    from isal import igzip, igzip_threaded
except ImportError:  # optional: nibabel's and Python's zlib openers are used instead
    igzip = igzip_threaded = None

from lungsight.errors import MAX_PIXELS_HINT, InputError, UnsupportedInputError
from lungsight.study import Study, add_whole_hu, fits_int16, sums_fit_int16


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
    maybe_non_finite = _maybe_non_finite(raw.dtype, slope, inter)
    pixels = to_display(raw, np.float32)
    del raw
    _scale(pixels, slope, inter)
    return pixels, maybe_non_finite


def _maybe_non_finite(dtype: np.dtype, slope: float, inter: float) -> bool:
    """Whether stored values of ``dtype`` scaled by ``slope`` and ``inter`` can be NaN or infinite in float32 (not
    when integers are stored and the scaling is finite and cannot overflow)."""
    finite_by_type = (
        np.issubdtype(dtype, np.integer)
        and bool(np.isfinite([slope, inter]).all())
        and float(max(abs(np.iinfo(dtype).min), np.iinfo(dtype).max)) * abs(slope) + abs(inter)
        < float(np.finfo(np.float32).max)
    )
    return not finite_by_type


def _scale(pixels: np.ndarray, slope: float, inter: float) -> None:
    """Apply ``scl_slope``/``scl_inter`` in place."""
    if slope != 1.0:
        pixels *= np.float32(slope)
    if inter != 0.0:
        pixels += np.float32(inter)


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
        # values that overflow float32 once scaled become infinite and are reported in the Study's warnings
        with np.errstate(over="ignore", invalid="ignore"):
            study = _read_streamed(path, label, max_pixels)
            if study is not None:
                return study
            with _nifti_file(path) as image:
                return _read_image(image, label, max_pixels)
    except (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{label}: not a readable NIfTI file ({type(exc).__name__})") from None
    except MemoryError as exc:  # a header that describes a volume larger than this machine's memory
        raise InputError(f"{label}: the volume its header describes does not fit in memory ({exc})") from None


def _check_size(label: str, i: int, j: int, max_pixels: int) -> None:
    if i * j > max_pixels:
        raise InputError(
            f"{label}: {i}x{j} pixels per slice exceeds the limit of {max_pixels:,} pixels ({MAX_PIXELS_HINT})"
        )


def _read_image(image: nib.Nifti1Image, label: str, max_pixels: int) -> Study:
    image, original_codes = _load_canonical(image, label)
    i, j, _ = image.shape
    _check_size(label, i, j, max_pixels)
    try:
        pixels, maybe_non_finite = _display_hu(image)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        raise InputError(f"{label}: corrupt NIfTI voxel data ({type(exc).__name__})") from None
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return _study(pixels, maybe_non_finite, image.header, image.affine, zooms, original_codes)


def _study(
    pixels: np.ndarray,
    maybe_non_finite: bool,
    header: nib.Nifti1Header,
    affine: np.ndarray,
    zooms: tuple[float, ...],
    original_codes: str,
) -> Study:
    """The :class:`Study` of display-order HU ``pixels``, with what the header says about their geometry."""
    notes: list[str] = []
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    if qform_code == 0 and sform_code == 0:
        notes.append("the NIfTI header has no orientation (qform and sform codes are 0): RAS was assumed")
    tilt = math.degrees(float(np.max(obliquity(affine))))
    if tilt > 1.0:
        notes.append(f"the volume is oblique by {tilt:.1f} degrees; shown in the closest axis-aligned orientation")
    # one pass when all are finite; none when integers were stored
    bad = None if not maybe_non_finite or np.isfinite(pixels.sum(dtype=np.float64)) else ~np.isfinite(pixels)
    if bad is not None and bad.any():
        fill = float(np.min(pixels[~bad])) if (~bad).any() else -1024.0
        pixels[bad] = fill
        notes.append(f"{int(bad.sum())} voxels were NaN or infinite and were set to {fill:g}")
    return Study(
        pixels=pixels,
        modality="CT",
        intensity="hu",
        spacing=(zooms[2], zooms[1], zooms[0]),
        source_format="nifti",
        metadata={"n_slices": int(pixels.shape[0]), "orientation": "axial", "nifti_axcodes": original_codes},
        warnings=notes,
    )


#: Bytes of stored voxels decompressed and converted at a time by the streaming reader (16 slices of 512 x 512
#: int16): large enough for few Python calls, small enough to stay in cache between the two steps.
SLAB_BYTES = 8 << 20


def _stream(path: Path) -> BinaryIO:
    """``path``'s bytes, decompressed when its name ends in ``.gz``: by ISA-L in a thread of its own (which runs
    beside the caller's conversion) when ``isal`` is installed, else by Python's zlib."""
    if not path.name.lower().endswith(".gz"):
        return open(path, "rb")
    if igzip_threaded is not None:
        return igzip_threaded.open(path, "rb", threads=1)
    return gzip.open(path, "rb")


def _read_exactly(f: BinaryIO, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise EOFError(f"the voxel data ends after {got} of {len(view)} bytes")
        got += n


def _axial_layout(header: nib.Nifti1Header) -> np.ndarray | None:
    """Which stored axes are flipped relative to canonical RAS (``[i, j, k]`` booleans) when the volume is stored as
    slices along z with rows and columns along the canonical x and y (any of the three flipped); ``None`` for any
    other storage (which needs a transpose) or voxel type."""
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) or min(shape) < 1:
        return None
    if dtype.kind not in "iuf" or dtype.fields is not None or dtype.subdtype is not None:
        return None
    ornt = io_orientation(header.get_best_affine())
    if np.isnan(ornt).any() or list(ornt[:, 0]) != [0, 1, 2]:
        return None
    return ornt[:, 1] < 0


def _read_streamed(path: Path, label: str, max_pixels: int) -> Study | None:
    """Read a NIfTI-1 volume stored slice by slice along z as it is decompressed (see the module docstring); ``None``
    when the file is stored otherwise (or is not NIfTI-1), for :func:`_read_image` to read."""
    with _stream(path) as f:
        try:
            header = nib.Nifti1Header.from_fileobj(f)
            flips = _axial_layout(header)
        except (HeaderDataError, WrapStructError, OSError, EOFError, ValueError, zlib.error):
            return None  # the general reader says what is wrong
        if flips is None:
            return None
        ni, nj, nk = (int(n) for n in header.get_data_shape()[:3])
        _check_size(label, ni, nj, max_pixels)
        dtype = header.get_data_dtype()
        needed, held = int(header.get_data_offset()) + ni * nj * nk * dtype.itemsize, path.stat().st_size
        if not path.name.lower().endswith(".gz") and held < needed:  # known before allocating anything
            raise InputError(
                f"{label}: truncated NIfTI file: its header describes {nk} slices of {ni}x{nj} "
                f"({needed / 1e6:.1f} MB with the header) but the file holds {held / 1e6:.1f} MB"
            )
        slope, inter = header.get_slope_inter()
        slope = 1.0 if slope is None else float(slope)
        inter = 0.0 if inter is None else float(inter)
        whole = dtype.kind in "iu" and slope == 1.0 and inter.is_integer()  # int16 while every value fits
        pixels = np.empty((nk, nj, ni), np.int16 if whole else np.float32)
        # the stored type's own range may say so for every value, else each slab's minimum and maximum will
        fits_by_type = whole and fits_int16(np.iinfo(dtype).min + inter, np.iinfo(dtype).max + inter)
        try:
            skip = int(header.get_data_offset()) - f.tell()
            if skip < 0:
                raise ValueError("the voxel data starts inside the header")
            f.read(skip)
            plane = ni * nj * dtype.itemsize
            per_slab = max(1, SLAB_BYTES // plane)
            buffer = memoryview(bytearray(plane * min(per_slab, nk)))
            flip_i, flip_j, flip_k = (bool(v) for v in flips)
            wide = dtype.itemsize > 4 or (dtype.kind in "iu" and dtype.itemsize == 4)  # not exact in float32
            for k0 in range(0, nk, per_slab):
                n = min(per_slab, nk - k0)
                _read_exactly(f, buffer[: plane * n])
                # stored (i, j, k) in Fortran order is (k, j, i) in C order: a slab of slices, rows along j
                raw = np.frombuffer(buffer, dtype, count=ni * nj * n).reshape(n, nj, ni)
                # display rows run posterior-to-anterior reversed (canonical j descending), columns canonical i
                # descending, slices canonical k ascending (see to_display)
                shown = raw[:, :: 1 if flip_j else -1, :: 1 if flip_i else -1]
                if pixels.dtype == np.int16 and not fits_by_type and not sums_fit_int16(raw, inter):
                    pixels = pixels.astype(np.float32)  # the slabs read so far are whole: carried over exactly
                target = pixels[nk - k0 - n : nk - k0][::-1] if flip_k else pixels[k0 : k0 + n]
                if pixels.dtype == np.int16:  # exact: every sum fits (checked above)
                    add_whole_hu(shown, inter, target)
                elif wide and (slope != 1.0 or inter != 0.0):  # scaled before rounding to float32, as nibabel does
                    np.copyto(target, shown * slope + inter, casting="unsafe")
                else:
                    np.copyto(target, shown, casting="unsafe")
                    _scale(target, slope, inter)
        except (OSError, EOFError, ValueError, zlib.error) as exc:
            raise InputError(f"{label}: corrupt NIfTI voxel data ({type(exc).__name__})") from None
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    affine = header.get_best_affine()
    return _study(
        pixels, _maybe_non_finite(dtype, slope, inter), header, affine, zooms, "".join(nib.aff2axcodes(affine))
    )
