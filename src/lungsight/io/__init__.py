"""Readers: a DICOM folder or file, a NIfTI volume, PNG/JPEG/TIFF images, or a zip of any of them → a Study.

:func:`load_study` decides what ``path`` is (folder, zip, NIfTI, image, otherwise DICOM), reads it with
the matching reader and applies the CT input contract (:mod:`lungsight.io.contract`) to CT studies.
See ``docs/input.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lungsight.errors import InputContractError, InputError
from lungsight.io.archive import extracted_zip
from lungsight.io.contract import check_ct_contract, check_xr_contract
from lungsight.io.dicom import list_dicom_series, read_dicom
from lungsight.io.images import IMAGE_SUFFIXES, read_images
from lungsight.io.nifti import read_nifti
from lungsight.study import SeriesInfo, Study

__all__ = ["check_ct_contract", "check_xr_contract", "list_series", "load_study", "series_among"]

logger = logging.getLogger("lungsight.io")

#: Files in a folder that are never read: notes and sidecars that travel with exported series.
IGNORED_SUFFIXES = frozenset({".txt", ".md", ".json", ".csv", ".xml", ".html", ".htm", ".pdf", ".ini", ".log", ".svg"})
#: A folder holding both is a lungsight output (``predict --out``), skipped with its overlays when it lies inside
#: the input: its PNGs are reports, not slices.
_OUTPUT_MARKERS = ("result.json", "report.html")
#: Entries never read, whatever their kind: OS clutter (compared lower-case).
IGNORED_NAMES = frozenset({"__macosx", "thumbs.db", "desktop.ini", "$recycle.bin"})
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")


def _kind(path: Path) -> str:
    """One of "zip", "nifti", "image", "dicom" (the rest goes to pydicom, which says if it is not DICOM)."""
    lower = path.name.lower()
    if lower.endswith((".nii", ".nii.gz")):
        return "nifti"
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return "image"
    if path.suffix.lower() == ".zip":
        return "zip"
    try:
        with path.open("rb") as handle:
            return "zip" if handle.read(4) in _ZIP_MAGIC else "dicom"
    except OSError:
        return "dicom"  # unreadable: the DICOM reader reports it with the file's name


def _listed(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (recursively), without hidden files, OS clutter, sidecar notes and lungsight's
    own output folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if dirpath != str(folder) and all(m in filenames for m in _OUTPUT_MARKERS):
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d.lower() not in IGNORED_NAMES)
        for filename in sorted(filenames):
            path = Path(dirpath, filename)
            if filename.startswith(".") or filename.lower() in IGNORED_NAMES:
                continue
            if path.suffix.lower() in IGNORED_SUFFIXES or not path.is_file():
                continue
            found.append(path)
    return found


@contextmanager
def _opened(path: Path, label: str) -> Iterator[Path]:
    """``path`` itself, or for a zip file the temporary folder that holds its contents while in use."""
    if not path.exists():
        raise InputError(f"{label}: no such file or folder")
    if path.is_file() and _kind(path) == "zip":
        with extracted_zip(path, label) as root:
            yield root
    else:
        yield path


def _namer(root: Path, label: str) -> Callable[[Path], str]:
    """How files under ``root`` are named in messages: ``<label>/<path relative to root>``."""
    return lambda p: f"{label}/{p.relative_to(root).as_posix()}"


def _read(
    target: Path,
    label: str,
    *,
    series_uid: str | None,
    modality: str | None,
    tiff_intercept: float,
    max_pixels: int,
) -> Study:
    """Read ``target`` (a file, or a folder of one kind of file)."""
    if target.is_file():
        kind = _kind(target)
        if kind == "nifti":
            return read_nifti(target, label, max_pixels=max_pixels)
        if kind == "image":
            return read_images(
                [target],
                lambda _: label,
                target.parent,
                modality=modality or "CT",
                tiff_intercept=tiff_intercept,
                max_pixels=max_pixels,
            )
        return read_dicom(
            [target], lambda _: label, label, series_uid=series_uid, modality=modality, max_pixels=max_pixels
        )

    files = _listed(target)
    if not files:
        skipped = next((p for p in sorted(target.rglob("*")) if p.is_file()), None)
        if skipped is None:
            raise InputError(f"{label}: empty folder (no files to read)")
        raise InputError(
            f"{label}: no DICOM, NIfTI or image file in it (only files that are never read, such as "
            f"{skipped.relative_to(target)}: notes, hidden files, lungsight outputs)"
        )
    name = _namer(target, label)
    by_kind: dict[str, list[Path]] = {}
    for path in files:
        by_kind.setdefault(_kind(path), []).append(path)
    if "zip" in by_kind:
        raise InputError(f"{name(by_kind['zip'][0])}: a zip inside a folder or zip is not read; extract it")
    if "nifti" in by_kind:
        if len(files) > 1:
            others = len(files) - len(by_kind["nifti"])
            raise InputError(
                f"{label}: holds {len(by_kind['nifti'])} NIfTI file(s) and {others} other file(s); "
                "pass one NIfTI volume"
            )
        return read_nifti(files[0], name(files[0]), max_pixels=max_pixels)
    if "image" in by_kind and "dicom" in by_kind:
        raise InputError(
            f"{label}: mixes DICOM ({name(by_kind['dicom'][0])}) and image files "
            f"({name(by_kind['image'][0])}); pass one kind"
        )
    if "image" in by_kind:
        return read_images(
            by_kind["image"],
            name,
            target,
            modality=modality or "CT",
            tiff_intercept=tiff_intercept,
            max_pixels=max_pixels,
        )
    return read_dicom(by_kind["dicom"], name, label, series_uid=series_uid, modality=modality, max_pixels=max_pixels)


def load_study(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    modality: str | None = None,
    tiff_intercept: float = -1024.0,
    max_pixels: int = 64_000_000,
) -> Study:
    """Read ``path`` (DICOM folder or file, NIfTI, PNG/JPEG/TIFF image or folder, or a zip) into a Study.

    Args:
        path: the input; a folder is read recursively, ignoring hidden files and notes (.txt, .json, ...).
        series_uid: for a DICOM folder with several series, the SeriesInstanceUID or the short
            ``series_id`` shown by :func:`list_series` (default: the largest axial CT series).
        modality: ``"CT"`` or ``"XR"``. For images it sets the modality (default ``"CT"``); for DICOM it
            also admits a series whose Modality tag is neither (e.g. OT); a DICOM or NIfTI of the other
            modality is refused with :class:`InputContractError`.
        tiff_intercept: added to unsigned 16-bit TIFF values to get Hounsfield units.
        max_pixels: largest number of pixels of one image or slice, checked before decoding.

    Raises:
        InputError, UnsupportedInputError, InputContractError: with a one-line message naming the file.
    """
    if modality not in (None, "CT", "XR"):
        raise ValueError(f"modality must be 'CT', 'XR' or None, not {modality!r}")
    source = Path(path)
    label = str(source)
    with _opened(source, label) as target:
        try:
            study = _read(
                target,
                label,
                series_uid=series_uid,
                modality=modality,
                tiff_intercept=tiff_intercept,
                max_pixels=max_pixels,
            )
        except MemoryError as exc:  # headers that describe more pixels than this machine holds
            raise InputError(f"{label}: the images its headers describe do not fit in memory ({exc})") from None
    if series_uid is not None and not study.source_format.startswith("dicom"):
        study.warnings.append("series_uid was ignored: the input is not DICOM")
    if modality is not None and study.modality != modality:
        if modality == "CT":
            check_ct_contract(study, label)
        raise InputContractError(f"{label}: this is a CT (Modality CT), the X-ray model cannot read it")
    if study.modality == "CT":
        check_ct_contract(study, label)
    logger.debug(
        "loaded %s: %s %s, %d slices, %d warnings",
        study.source_format,
        study.modality,
        study.intensity,
        study.n_slices,
        len(study.warnings),
    )
    return study


def list_series(path: str | os.PathLike[str]) -> list[SeriesInfo]:
    """The DICOM series found at ``path`` (folder, file or zip), largest first; ``[]`` for non-DICOM input.

    ``SeriesInfo.series_uid`` holds the short ``series_id`` (a sha256 prefix), which ``load_study`` accepts.
    """
    label = str(Path(path))
    with _opened(Path(path), label) as target:
        if target.is_file():
            return list_dicom_series([target], lambda _: label, label) if _kind(target) == "dicom" else []
        return series_among(_listed(target), target, label)


def series_among(files: list[Path], root: Path, label: str) -> list[SeriesInfo]:
    """The DICOM series that the DICOM files among ``files`` (under ``root``, named as ``label/...``) make up,
    largest first; ``[]`` when none of them is a DICOM image."""
    dicoms = [p for p in files if _kind(p) == "dicom"]
    if not dicoms:
        return []
    try:
        return list_dicom_series(dicoms, _namer(root, label), label)
    except InputError:  # no DICOM image among them
        return []
