"""DICOM series folders and single DICOM files.

Two passes keep memory flat: the first reads headers only, and of each header only groups 0002-0028, where every
value it needs lies (:func:`_past_header_groups`), to group files by SeriesInstanceUID, pick a series, check its
geometry and sort it; the second decodes one file at a time into a preallocated array: int16 Hounsfield units when
every header of a CT series declares the plain rescale of 16-bit values (slope 1, a whole intercept: the usual CT)
and every value fits in int16 (a slice with one that does not turns the volume into float32 as it is read), float32
otherwise. The usual CT slice (uncompressed little-endian 16-bit pixels, the plain rescale) is read in the second
pass straight from its pixel data element, located by the first pass, without parsing the header again
(:func:`_read_raw_ct`); anything else, or anything unexpected there, goes through pydicom. No pydicom dataset
outlives the function that read it, and only whitelisted tags (:mod:`lungsight.io.deid`) reach the returned
:class:`~lungsight.study.Study`.
"""

from __future__ import annotations

import logging
import math
import os
import re
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import cast

import numpy as np
from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_partial
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pydicom.values import convert_value

from lungsight.cores import usable_cores
from lungsight.errors import MAX_PIXELS_HINT, InputError, UnsupportedInputError
from lungsight.io.contract import view_kind
from lungsight.io.deid import identifying_values, redact, series_id, whitelisted_metadata
from lungsight.study import SeriesInfo, Study, add_whole_hu, fits_int16, sums_fit_int16

logger = logging.getLogger("lungsight.io")

#: DICOM modalities read as radiographs (``Study.modality == "XR"``).
XR_MODALITIES = frozenset({"CR", "DX", "DR", "XA", "MG", "RF", "RG", "PX", "IO"})
#: Largest angle (degrees) between the slice-position steps and the slice normal (else: gantry tilt).
TILT_LIMIT_DEG = 1.0
#: Largest relative deviation of one slice step from the median step.
SPACING_TOLERANCE = 0.10

#: Modality values that do not say what the image is (other, secondary capture, none): ``modality=`` decides.
_UNLABELLED_MODALITIES = frozenset({"", "OT", "SC"})

NameFn = Callable[[Path], str]


@dataclass
class _Header:
    """The few header fields needed to group, check and sort (no identifying values)."""

    path: Path
    uid: str
    modality: str
    rows: int
    cols: int
    frames: int
    samples: int
    photometric: str
    iop: np.ndarray | None
    ipp: np.ndarray | None
    instance: int | None
    transfer_syntax: UID | None
    gantry_tilt: float
    pixel_spacing: tuple[float, float] | None
    thickness: float | None
    view: str = ""
    stored: _PlainStored | None = None
    raw: _RawPixels | None = None


@dataclass(frozen=True)
class _PlainStored:
    """16-bit stored integers that the plain rescale (no modality LUT, slope 1, a whole intercept) turns into HU."""

    bits: int  # bits stored, the high bit being bits - 1
    signed: bool
    intercept: int

    @property
    def hu_range(self) -> tuple[int, int]:
        """The Hounsfield units these stored values can give."""
        low, high = (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)
        return self.intercept + low, self.intercept + high


@dataclass(frozen=True)
class _RawPixels:
    """Where an uncompressed 16-bit CT slice's pixel data lies, read without pydicom (see :func:`_raw_pixels`)."""

    offset: int  # where the PixelData element's tag is expected in the file (checked before reading)
    explicit_vr: bool


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom while reading: its warnings and value-validation messages can quote header values."""
    mode = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.reading_validation_mode = mode


#: VRs whose raw values :func:`_get` converts with pydicom's value converters directly: numbers, and strings whose
#: character repertoire is fixed (no SpecificCharacterSet applies to them).
_PLAIN_VRS = frozenset({"CS", "DS", "FD", "FL", "IS", "SL", "SS", "UI", "UL", "US"})


@lru_cache(maxsize=128)
def _tag_and_vr(keyword: str) -> tuple[int, str]:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    return tag, dictionary_VR(tag)


def _get(ds: Dataset, keyword: str, default: object = None) -> object:
    """``ds.get(keyword, default)``, with the same value, about four times faster for the plain numbers and codes
    read from every file of a series (their conversion took 23-28 ms per 100 files, now 5-8 ms): an element still
    raw from the file, of its dictionary VR (or of none, in implicit VR) and a plain VR, goes through pydicom's
    value converter alone, without the dataset's element machinery; anything else (a sequence, a VR that differs
    from the dictionary's, UN, a value already read) through ``ds.get``."""
    tag, vr = _tag_and_vr(keyword)
    element = ds.get_item(tag, keep_deferred=True)
    if element is None:
        return default
    if vr in _PLAIN_VRS and _as_read(element, vr):
        return convert_value(vr, element)
    return ds.get(keyword, default)


def _as_read(element: object, vr: str) -> bool:
    """Whether ``element`` is still raw from the file, with a value, of its dictionary VR ``vr`` (or of none, in
    implicit VR): the elements whose bytes the header pass converts without pydicom's dataset machinery."""
    return isinstance(element, RawDataElement) and element.value is not None and element.VR in (None, vr)


#: VRs of numbers written as text: decimal and integer strings.
_NUMBER_STRING_VRS = frozenset({"DS", "IS"})


def _decimals(ds: Dataset, keyword: str) -> list[float] | None:
    """The numbers of a decimal or integer string element still raw from the file, parsed by ``float`` straight
    from its bytes: the values pydicom's DS and IS conversion gives, without building its validated number
    objects (which took about a sixth of the header pass). ``None`` for anything else, and for text ``float``
    does not read (empty, padded with NUL): the caller then asks pydicom."""
    tag, vr = _tag_and_vr(keyword)
    if vr not in _NUMBER_STRING_VRS:  # known from the keyword: no lookup for the caller's _get to repeat
        return None
    element = ds.get_item(tag, keep_deferred=True)
    if not _as_read(element, vr) or not element.value:
        return None
    try:
        return [float(v) for v in element.value.split(b"\\")]
    except ValueError:
        return None


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray | None:
    value = _decimals(ds, keyword)
    if value is None:
        value = _get(ds, keyword)
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        return None
    return out if out is not None and out.shape == (count,) and np.all(np.isfinite(out)) else None


def _number(ds: Dataset, keyword: str, default: float | None = None) -> float | None:
    decimals = _decimals(ds, keyword)
    if decimals is not None:
        return decimals[0] if len(decimals) == 1 else default
    try:
        value = _get(ds, keyword)
        return default if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return default


def _read_header(path: Path, name: NameFn) -> _Header | None:
    """The header of ``path``; ``None`` for a DICOM object without an image (DICOMDIR, report, RTSTRUCT). Its
    values are read quietly too: pydicom validates them as it converts them, and its warnings quote them."""
    with _quiet():
        return _header(path, name)


#: The last group the header pass reads: every value it needs is in groups 0002-0028.
_LAST_HEADER_GROUP = 0x0028
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010), little endian


def _past_header_groups(tag: int, vr: str | None, length: int) -> bool:
    """pydicom's ``stop_when``: stop at the first top-level element after group 0028. What follows in a scanner's
    file (private groups such as Siemens' CSA headers, request and procedure sequences, the pixel data) is never
    read by the header pass; parsing it cost about 10 ms per 100 slices of the real series, 8 % of reading them
    (``docs/speed.md``). Sequence items are read whole: pydicom asks this only of top-level elements."""
    return tag >> 16 > _LAST_HEADER_GROUP  # int's shift: pydicom's BaseTag compares in Python, slowly


@dataclass(frozen=True)
class _Stop:
    """Where the header pass stopped in a file (pydicom rewinds to the start of the element it stopped at)."""

    offset: int
    at_pixel_data: bool  # the element there is PixelData
    file_size: int


def _header(path: Path, name: NameFn) -> _Header | None:
    try:
        with open(path, "rb") as fp:
            ds = read_partial(fp, stop_when=_past_header_groups, force=False)
            if "Rows" not in ds or "Columns" not in ds:  # no image, or elements out of tag order: read it all
                fp.seek(0)
                ds = dcmread(fp, force=False, stop_before_pixels=True)
            offset = fp.tell()
            stop = _Stop(offset, fp.read(4) == _PIXEL_DATA_TAG, os.fstat(fp.fileno()).st_size)
    except InvalidDicomError:
        raise InputError(f"{name(path)}: not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from None
    except Exception as exc:
        raise InputError(f"{name(path)}: unreadable DICOM header ({type(exc).__name__})") from None
    rows, cols = _number(ds, "Rows"), _number(ds, "Columns")
    if rows is None or cols is None:
        return None
    spacing = _floats(ds, "PixelSpacing", 2)
    instance = _number(ds, "InstanceNumber")
    file_meta = getattr(ds, "file_meta", None)
    transfer_syntax = cast("UID | None", _get(file_meta, "TransferSyntaxUID") if file_meta is not None else None)
    stored = _plain_stored(ds)
    return _Header(
        path=path,
        uid=str(_get(ds, "SeriesInstanceUID", "") or ""),
        modality=str(_get(ds, "Modality", "") or "").strip().upper()[:16],
        rows=int(rows),
        cols=int(cols),
        frames=int(_number(ds, "NumberOfFrames", 1) or 1),
        samples=int(_number(ds, "SamplesPerPixel", 1) or 1),
        photometric=str(_get(ds, "PhotometricInterpretation", "MONOCHROME2")).strip().upper()[:16],
        iop=_floats(ds, "ImageOrientationPatient", 6),
        ipp=_floats(ds, "ImagePositionPatient", 3),
        instance=None if instance is None else int(instance),
        transfer_syntax=transfer_syntax,
        gantry_tilt=_number(ds, "GantryDetectorTilt", 0.0) or 0.0,
        pixel_spacing=(float(spacing[0]), float(spacing[1])) if spacing is not None else None,
        thickness=_number(ds, "SliceThickness"),
        view=" ".join(str(_get(ds, "ViewPosition", "") or "").upper().split())[:16],
        stored=stored,
        raw=_raw_pixels(stored, transfer_syntax, int(rows) * int(cols), stop),
    )


_RAW_SYNTAXES = {ExplicitVRLittleEndian: True, ImplicitVRLittleEndian: False}  # -> explicit VR


def _raw_pixels(
    stored: _PlainStored | None, transfer_syntax: UID | None, pixels: int, stop: _Stop
) -> _RawPixels | None:
    """How to read a slice's pixels (``pixels`` a frame) without pydicom, for the usual CT slice only: uncompressed
    little-endian, 16 bits allocated, high bit = bits stored - 1, no modality LUT, slope 1 and a whole intercept
    (``stored``).

    The PixelData element is expected where the header pass stopped if it is there (nothing between the image
    attributes and the pixels), else as the file's last element, where scanners put it. :func:`_read_raw_ct` checks
    the element's tag, VR and length before reading and leaves the file to pydicom if they are not as expected
    (pixel data followed by padding, for one)."""
    explicit = _RAW_SYNTAXES.get(transfer_syntax) if transfer_syntax is not None else None
    if explicit is None or stored is None:
        return None
    offset = stop.offset
    if not stop.at_pixel_data:  # a file too short for it: pydicom says why
        offset = max(offset, stop.file_size - (12 if explicit else 8) - 2 * pixels)
    return _RawPixels(offset, explicit)


def _plain_stored(ds: Dataset) -> _PlainStored | None:
    """What the header says of the usual CT slice's stored values: 16 bits allocated, high bit = bits stored - 1,
    the plain rescale (:func:`_plain_intercept`); ``None`` for anything else (a series with one such header is
    read as float32)."""
    intercept = _plain_intercept(ds)
    if intercept is None:
        return None
    bits, high = _number(ds, "BitsStored"), _number(ds, "HighBit")
    representation = _number(ds, "PixelRepresentation")
    if (
        _number(ds, "BitsAllocated") != 16
        or bits is None
        or not 1 <= bits <= 16
        or high != bits - 1
        or representation not in (0, 1)
    ):
        return None
    return _PlainStored(int(bits), representation == 1, int(intercept))


def _plain_intercept(ds: Dataset) -> float | None:
    """The intercept of the usual CT rescale (no modality LUT, slope 1, a whole intercept under 2**16 in size),
    which turns 16-bit stored values into HU with one exact addition; ``None`` for any other rescale."""
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if (
        _get(ds, "ModalityLUTSequence")  # empty: ignored, as pydicom's apply_modality_lut ignores it
        or slope != 1.0
        or intercept is None
        or not float(intercept).is_integer()
        or abs(intercept) >= 2**16
    ):
        return None
    return float(intercept)


def _read_raw_ct(header: _Header, out: np.ndarray) -> bool:
    """Write the slice of ``header`` as HU into ``out`` (float32 or int16) straight from the file (see
    :func:`_raw_pixels`), exactly as pydicom decodes and rescales it (unused high bits masked, or the sign extended
    from the bits stored). ``False``, with ``out`` untouched, when the file is not as its header promised, or when
    ``out`` is int16 and a value does not fit in it: pydicom then reads it (and :func:`_ct_values` says so)."""
    raw, stored = header.raw, header.stored
    if raw is None or stored is None or header.samples != 1 or header.frames != 1:
        return False
    count = header.rows * header.cols
    try:
        with open(header.path, "rb") as fp:
            fp.seek(raw.offset)
            element = fp.read(12 if raw.explicit_vr else 8)
            if len(element) < (12 if raw.explicit_vr else 8) or element[:4] != _PIXEL_DATA_TAG:
                return False
            if raw.explicit_vr and (element[4:6] not in (b"OW", b"OB") or element[6:8] != b"\0\0"):
                return False
            (length,) = struct.unpack("<I", element[-4:])
            if length == 0xFFFFFFFF or length < 2 * count:  # encapsulated, or short: pydicom says what is wrong
                return False
            values = np.fromfile(fp, dtype="<i2" if stored.signed else "<u2", count=count)
    except OSError:  # gone or unreadable since the header pass: pydicom's read names the problem
        return False
    if values.size != count:
        return False
    if stored.bits < 16:
        unused = 16 - stored.bits
        values = (values << unused) >> unused if stored.signed else values & np.uint16((1 << stored.bits) - 1)
    values = values.reshape(header.rows, header.cols)
    if out.dtype == np.int16:
        if not fits_int16(*stored.hu_range) and not sums_fit_int16(values, stored.intercept):
            return False
        add_whole_hu(values, stored.intercept, out)  # exact: every sum fits (checked above)
    else:
        np.add(values, np.float32(stored.intercept), out=out, dtype=np.float32)
    return True


def _decoder_threads() -> None:
    """Let OpenJPEG (Pillow's JPEG 2000 decoder) decode each slice on every usable core: it reads
    ``OPJ_NUM_THREADS`` whenever it creates a decoder, and decodes on one thread without it (the real JPEG 2000
    series: 540 -> 375 ms for 20 slices of 512², 2 cores). A value the user has set is kept."""
    os.environ.setdefault("OPJ_NUM_THREADS", str(usable_cores()))


def _header_metadata(path: Path, name: NameFn) -> dict[str, object]:
    """The whitelisted tags of ``path``'s header (:func:`lungsight.io.deid.whitelisted_metadata`)."""
    try:
        with _quiet():
            ds = dcmread(path, force=False, stop_before_pixels=True)
    except Exception as exc:
        raise InputError(f"{name(path)}: unreadable DICOM header ({type(exc).__name__})") from None
    return whitelisted_metadata(ds)


def _normal(iop: np.ndarray) -> np.ndarray:
    normal = np.cross(iop[:3], iop[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0 else normal


def _orientation(iop: np.ndarray | None) -> str:
    """Axial, coronal, sagittal or oblique, from the slice normal (LPS: x sagittal, y coronal, z axial)."""
    if iop is None:
        return ""
    normal = np.abs(_normal(iop))
    if normal.max() < math.cos(math.radians(30)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _info(uid: str, headers: list[_Header]) -> SeriesInfo:
    return SeriesInfo(
        series_uid=series_id(uid),
        modality=headers[0].modality,
        n_images=sum(h.frames for h in headers),
        orientation=_orientation(headers[0].iop),
    )


def _describe(info: SeriesInfo) -> str:
    details = (info.modality, f"{info.n_images} images", info.orientation)
    return f"{info.series_uid} ({', '.join(d for d in details if d)})"


def _natural_key(text: str) -> list[object]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def _scan(files: Sequence[Path], name: NameFn, folder: str) -> tuple[dict[str, list[_Header]], list[Path]]:
    """Headers of ``files`` grouped by SeriesInstanceUID, and the DICOM files that hold no image."""
    groups: dict[str, list[_Header]] = {}
    skipped: list[Path] = []
    for path in files:
        header = _read_header(path, name)
        if header is None:
            skipped.append(path)
            continue
        groups.setdefault(header.uid, []).append(header)
    if not groups:
        n = len(skipped)
        detail = (
            f" ({n} DICOM file{'' if n == 1 else 's'} without an image: a report, DICOMDIR or structure set, or a "
            "file cut short inside its header)"
            if n
            else ""
        )
        raise InputError(f"{folder}: no DICOM image found{detail}")
    logger.debug("%d DICOM images in %d series, %d without image", len(files) - len(skipped), len(groups), len(skipped))
    return groups, skipped


def list_dicom_series(files: Sequence[Path], name: NameFn, folder: str) -> list[SeriesInfo]:
    """One :class:`SeriesInfo` per series in ``files``, largest first (``series_uid`` holds the short id)."""
    groups, _ = _scan(files, name, folder)
    infos = [_info(uid, headers) for uid, headers in groups.items()]
    return sorted(infos, key=lambda s: (-s.n_images, s.series_uid))


def _choose(groups: dict[str, list[_Header]], wanted: str | None, folder: str) -> str:
    if wanted is not None:
        key = wanted.strip()
        for uid in groups:
            if key == uid or key.lower() == series_id(uid):
                return uid
        available = ", ".join(
            f"{series_id(uid)} ({sum(h.frames for h in hs)} images)" for uid, hs in sorted(groups.items())
        )
        raise InputError(f"{folder}: series_uid {key[:64]!r} not found; available series ids: {available}")

    def rank(uid: str) -> tuple[bool, bool, int, str]:
        # An axial CT series first, the largest of them; among radiographs (an X-ray exam with a PA and a
        # lateral series, say) a frontal view first.
        headers = groups[uid]
        axial_ct = headers[0].modality == "CT" and _orientation(headers[0].iop) == "axial"
        frontal = view_kind(headers[0].view) == "frontal"
        return (axial_ct, frontal, sum(h.frames for h in headers), series_id(uid))

    return max(groups, key=rank)


def _check_uniform(series: list[_Header], name: NameFn, max_pixels: int) -> None:
    first = series[0]
    for header in series:
        if header.frames > 1:
            raise UnsupportedInputError(
                f"{name(header.path)}: multi-frame DICOM (NumberOfFrames {header.frames}) is not supported; "
                "export the series as one file per slice"
            )
        if header.samples != 1 or header.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise UnsupportedInputError(
                f"{name(header.path)}: colour DICOM (PhotometricInterpretation {header.photometric}) is not supported"
            )
        if (header.rows, header.cols) != (first.rows, first.cols):
            raise UnsupportedInputError(
                f"{name(header.path)}: {header.cols}x{header.rows} pixels but {name(first.path)} has "
                f"{first.cols}x{first.rows}; one series must have one image size"
            )
        if (header.iop is None) != (first.iop is None) or (
            header.iop is not None and first.iop is not None and not np.allclose(header.iop, first.iop, atol=1e-3)
        ):
            raise UnsupportedInputError(
                f"{name(header.path)}: ImageOrientationPatient differs from {name(first.path)} within one series"
            )
        if abs(header.gantry_tilt) > 1e-3:
            raise UnsupportedInputError(
                f"{name(header.path)}: gantry tilt of {header.gantry_tilt:g} degrees (GantryDetectorTilt) "
                "is not supported; reconstruct the series without tilt"
            )
        if header.rows * header.cols > max_pixels:
            raise InputError(
                f"{name(header.path)}: {header.cols}x{header.rows} pixels exceeds the limit of "
                f"{max_pixels:,} pixels ({MAX_PIXELS_HINT})"
            )
    for syntax in {h.transfer_syntax for h in series if h.transfer_syntax is not None}:
        if not syntax.is_compressed:
            continue
        example = next(h for h in series if h.transfer_syntax == syntax)
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            raise UnsupportedInputError(
                f"{name(example.path)}: compressed transfer syntax {syntax.name} ({syntax}) cannot be "
                "decoded by pydicom; convert the series to an uncompressed transfer syntax"
            ) from None
        if not decoder.is_available:
            raise UnsupportedInputError(
                f"{name(example.path)}: compressed transfer syntax {syntax.name} ({syntax}) cannot be "
                f"decoded; install one of: {'; '.join(decoder.missing_dependencies)}"
            )


@dataclass
class _Geometry:
    order: list[_Header]
    slice_spacing: float | None
    flip_rows: bool
    flip_cols: bool
    warnings: list[str]


def _geometry(series: list[_Header], name: NameFn, folder: str) -> _Geometry:
    """Sort the slices along the slice normal and check the steps (duplicates, gaps, tilt)."""
    notes: list[str] = []
    iop = series[0].iop
    if len(series) == 1:
        return _Geometry(list(series), series[0].thickness, *_in_plane_flips(iop, notes), notes)
    if iop is None or any(h.ipp is None for h in series):
        if all(h.instance is not None for h in series):
            order = sorted(series, key=lambda h: (h.instance, _natural_key(h.path.name)))
            notes.append("no ImagePositionPatient/ImageOrientationPatient: slices ordered by InstanceNumber")
        else:
            order = sorted(series, key=lambda h: _natural_key(h.path.name))
            notes.append("no ImagePositionPatient or InstanceNumber: slices ordered by file name")
        return _Geometry(order, series[0].thickness, False, False, notes)

    normal = _normal(iop)
    positions = np.stack([h.ipp for h in series])
    projected = positions @ normal
    index = sorted(range(len(series)), key=lambda i: (projected[i], series[i].instance or 0))
    steps = np.diff(projected[index])
    if np.any(steps < 1e-3):
        k = int(np.argmax(steps < 1e-3))
        raise UnsupportedInputError(
            f"{folder}: duplicated slice position in one series ({name(series[index[k]].path)} and "
            f"{name(series[index[k + 1]].path)}); several acquisitions share a SeriesInstanceUID"
        )
    median = float(np.median(steps))
    if np.any(np.abs(steps - median) > SPACING_TOLERANCE * median):
        raise UnsupportedInputError(
            f"{folder}: inconsistent slice spacing (steps from {steps.min():.3g} to {steps.max():.3g} mm, "
            f"median {median:.3g} mm); slices are missing or the series mixes reconstructions"
        )
    moves = np.diff(positions[index], axis=0)
    cosines = np.abs(moves @ normal) / np.linalg.norm(moves, axis=1)
    tilt = math.degrees(math.acos(min(1.0, float(cosines.min()))))
    if tilt > TILT_LIMIT_DEG:
        raise UnsupportedInputError(
            f"{folder}: gantry tilt: slice positions step {tilt:.1f} degrees off the slice normal; "
            "reconstruct the series without tilt"
        )
    order = [series[i] for i in index]
    if normal[int(np.argmax(np.abs(normal)))] < 0:
        order.reverse()
    return _Geometry(order, median, *_in_plane_flips(iop, notes), notes)


def _in_plane_flips(iop: np.ndarray | None, notes: list[str]) -> tuple[bool, bool]:
    """For axial images: flips that put patient-right on the image left and anterior at the top."""
    if _orientation(iop) != "axial" or iop is None:
        return False, False
    row_dir, col_dir = iop[:3], iop[3:]
    if np.argmax(np.abs(row_dir)) != 0 or np.argmax(np.abs(col_dir)) != 1:
        notes.append("axial images are stored rotated by 90 degrees; shown as stored")
        return False, False
    flip_rows, flip_cols = bool(col_dir[1] < 0), bool(row_dir[0] < 0)
    if flip_rows or flip_cols:
        notes.append("stored images were mirrored; flipped to radiological display (patient right on image left)")
    return flip_rows, flip_cols


def _xr_values(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, bool, bool]:
    """Modality LUT, then VOI LUT/window, then MONOCHROME1 inversion, shifted to start at 0.

    Returns the values, the width of their nominal range, and whether a VOI LUT/window and an inversion
    were applied.
    """
    bits = int(ds.get("BitsStored", 8 * arr.itemsize))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    modality_lut = ds.get("ModalityLUTSequence")
    if modality_lut:
        low, high = 0, 2 ** int(modality_lut[0].LUTDescriptor[2]) - 1
    elif ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None:
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = sorted((low * slope + intercept, high * slope + intercept))
    values = apply_modality_lut(arr, ds)
    voi_lut = ds.get("VOILUTSequence")
    voi_applied = False
    if voi_lut and voi_lut[0].get("LUTDescriptor") is not None and voi_lut[0].get("LUTData") is not None:
        values = apply_voi_lut(values, ds, index=0)
        low, high = 0, 2 ** int(voi_lut[0].LUTDescriptor[2]) - 1
        voi_applied = True
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        values = apply_voi_lut(values, ds, index=0)
        voi_applied = True
    inverted = str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    if inverted:
        values = high + low - values
    shifted = (np.asarray(values, dtype=np.float64) - low).astype(np.float32)
    return shifted, float(high - low), voi_applied, inverted


def _ct_values(arr: np.ndarray, ds: Dataset, out: np.ndarray) -> bool:
    """Write the stored values ``arr`` as Hounsfield units (modality LUT or rescale) into ``out``.

    The usual CT rescale (slope 1, a whole-number intercept, integers of at most 16 bits) is one addition, exact
    for these values; anything else goes through pydicom's :func:`apply_modality_lut` (float64). ``False``, with
    ``out`` untouched, when ``out`` is int16 and a value is not a whole HU in its range (a decoder that gave more
    bits than the header declared, say): the caller then stores the series as float32.
    """
    intercept = _plain_intercept(ds)
    plain = intercept is not None and arr.dtype.kind in "iu" and arr.dtype.itemsize <= 2
    if out.dtype == np.int16:
        if not plain or not arr.size or not sums_fit_int16(arr, intercept):
            return False
        add_whole_hu(arr, intercept, out)  # exact: every sum fits (checked above)
    elif plain:
        np.add(arr, np.float32(intercept), out=out, dtype=np.float32)
    else:
        out[...] = apply_modality_lut(arr, ds)
    return True


def _volume_dtype(kind: str, series: list[_Header]) -> type[np.floating] | type[np.signedinteger]:
    """int16 for a CT series whose every header declares the plain rescale of 16-bit stored values (whole HU:
    :class:`_PlainStored`), float32 for anything else. Whether every value fits is checked as each slice is read."""
    return np.int16 if kind == "CT" and all(h.stored is not None for h in series) else np.float32


def _kind(modality: str, requested: str | None, where: str) -> str:
    if modality == "CT":
        return "CT"
    if modality in XR_MODALITIES:
        return "XR"
    if modality in _UNLABELLED_MODALITIES and requested in ("CT", "XR"):
        return requested
    raise UnsupportedInputError(
        f"{where}: Modality {modality or 'missing'} is not supported (CT, or X-ray: "
        f"{', '.join(sorted(XR_MODALITIES))})"
        + ("; pass modality='CT' or modality='XR' to say which" if modality in _UNLABELLED_MODALITIES else "")
    )


def read_dicom(
    files: Sequence[Path],
    name: NameFn,
    folder: str,
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    max_pixels: int = 64_000_000,
) -> Study:
    """Read one series from ``files`` (a folder's DICOM files, or one file) into a :class:`Study`.

    ``name`` turns a path into the name shown in messages; ``folder`` names the input as a whole.
    """
    groups, skipped = _scan(files, name, folder)
    chosen = _choose(groups, series_uid, folder)
    series = groups[chosen]
    notes: list[str] = []
    if skipped:
        notes.append(
            f"{len(skipped)} DICOM file(s) without an image were ignored (e.g. {name(skipped[0])}: "
            "DICOMDIR, report or damaged header)"
        )
    others = sorted(
        (_info(uid, headers) for uid, headers in groups.items() if uid != chosen),
        key=lambda s: (-s.n_images, s.series_uid),
    )
    if others:
        listed = ", ".join(_describe(s) for s in others)
        notes.append(
            f"{len(others)} other series not loaded: {listed}; loaded {series_id(chosen)} "
            f"({len(series)} images); choose another by the id shown with --series (series_uid= in Python)"
        )

    kind = _kind(series[0].modality, modality, name(series[0].path))
    _check_uniform(series, name, max_pixels)
    geometry = _geometry(series, name, folder)
    notes.extend(geometry.warnings)
    first = geometry.order[0]
    pixels = np.empty((len(geometry.order), first.rows, first.cols), dtype=_volume_dtype(kind, geometry.order))
    voi_applied = inverted = False
    span = 0.0
    if any(h.transfer_syntax is not None and h.transfer_syntax.is_compressed for h in geometry.order):
        _decoder_threads()

    def slot(k: int) -> np.ndarray:  # slice k of the volume, as stored (rows and columns in the file's order)
        return pixels[k, :: -1 if geometry.flip_rows else 1, :: -1 if geometry.flip_cols else 1]

    for k, header in enumerate(geometry.order):
        target = slot(k)
        if kind == "CT" and _read_raw_ct(header, target):
            continue
        with _quiet():
            try:
                ds = dcmread(header.path, force=False)
            except Exception as exc:
                raise InputError(f"{name(header.path)}: unreadable DICOM file ({type(exc).__name__})") from None
            if "PixelData" not in ds:
                raise InputError(f"{name(header.path)}: no pixel data (truncated or damaged file)")
            try:
                arr = ds.pixel_array
            except Exception as exc:
                reason = redact(f"{type(exc).__name__}: {exc}", identifying_values(ds))
                raise InputError(f"{name(header.path)}: corrupt pixel data ({reason})") from None
            if arr.shape != (first.rows, first.cols):
                raise InputError(
                    f"{name(header.path)}: decoded pixel data has shape {arr.shape}, the header says "
                    f"{first.rows}x{first.cols}"
                )
            try:
                if kind == "CT":
                    if not _ct_values(arr, ds, target):  # not whole HU in int16's range: float32 from here on
                        pixels = pixels.astype(np.float32)
                        _ct_values(arr, ds, slot(k))
                else:
                    values, span, voi_applied, inverted = _xr_values(arr, ds)
                    target[...] = values
            except Exception as exc:
                reason = redact(f"{type(exc).__name__}: {exc}", identifying_values(ds))
                raise InputError(f"{name(header.path)}: invalid rescale or VOI LUT attributes ({reason})") from None

    if kind == "CT" and first.photometric == "MONOCHROME1":
        notes.append(
            "CT stored as MONOCHROME1: rescaled values are Hounsfield units whatever the display "
            "polarity, so they were not inverted; check the images look right"
        )
    metadata: dict[str, object] = _header_metadata(first.path, name)
    metadata.update(series_id=series_id(chosen), n_slices=len(geometry.order), orientation=_orientation(first.iop))
    if kind == "XR":
        metadata.update(voi_lut_applied=voi_applied, monochrome1_inverted=inverted)
        intensity = "grey8" if span <= 255 else "grey16"
    else:
        intensity = "hu"
    spacing = None
    if first.pixel_spacing is not None:
        spacing = (float(geometry.slice_spacing or 1.0), *first.pixel_spacing)
    return Study(
        pixels=pixels,
        modality=kind,  # type: ignore[arg-type]
        intensity=intensity,  # type: ignore[arg-type]
        spacing=spacing,
        source_format="dicom-series" if len(files) > 1 else "dicom",
        metadata=metadata,
        warnings=notes,
        other_series=others,
    )
