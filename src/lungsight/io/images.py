"""PNG, JPEG and TIFF images: single files, folders of slices, 16-bit TIFF slice folders (COVID-CTset).

Reading is two-pass: every file's header is probed first (size, bit depth, page count; nothing decoded) so
that the pixel limit is enforced before any decoding and the output array can be preallocated; then each
file is decoded into it. Folders are read in natural order (``s2`` before ``s10``).
"""

from __future__ import annotations

import re
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from lungsight.errors import MAX_PIXELS_HINT, InputContractError, InputError, UnsupportedInputError
from lungsight.study import Study

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
#: Mean spread between colour channels (grey levels) above which an RGB image is reported as coloured.
COLOUR_TOLERANCE = 2.0
#: ITU-R BT.601 luma weights, as used by Pillow's ``convert("L")``.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

_GREY8_MODES = frozenset({"1", "L", "LA"})
_COLOUR_MODES = frozenset({"P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_GREY16_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})

NameFn = Callable[[Path], str]


def natural_key(text: str) -> list[object]:
    """Sort key that orders embedded numbers numerically: ``s2`` < ``s10``."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


@dataclass
class _Probe:
    """What a file's header says, before any decoding."""

    path: Path
    kind: str  # "grey8", "grey16" (PNG), "tiff-u16", "tiff-i16", "tiff-float"
    size: tuple[int, int]  # (height, width)
    pages: int


def _limit(shown: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InputError(
            f"{shown}: {width}x{height} pixels exceeds the limit of {max_pixels:,} pixels ({MAX_PIXELS_HINT})"
        )


def _reason(exc: BaseException) -> str:
    """An exception as one short line: its type and the start of its message (image files carry no PHI)."""
    detail = " ".join(str(exc).split())[:120]
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _png_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR chunk, without Pillow."""
    with path.open("rb") as handle:
        head = handle.read(24)
    if len(head) == 24 and head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(width), int(height)
    return None


def _open_pil(path: Path, shown: str, max_pixels: int) -> Image.Image:
    """Open lazily (header only) and enforce the pixel limit before anything is decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        size = _png_size(path)
        found = re.search(r"\((\d+) pixels\)", str(exc))
        count = f"{size[0]}x{size[1]}" if size else (f"{int(found.group(1)):,}" if found else "too many")
        pillow_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
        hint = MAX_PIXELS_HINT if max_pixels < pillow_limit else "raise PIL.Image.MAX_IMAGE_PIXELS"
        raise InputError(
            f"{shown}: {count} pixels exceeds the limit of {min(max_pixels, pillow_limit):,} pixels ({hint})"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{shown}: not a readable image ({_reason(exc)})") from None
    try:
        _limit(shown, *image.size, max_pixels=max_pixels)
    except InputError:
        image.close()
        raise
    return image


def _probe(path: Path, shown: str, max_pixels: int) -> _Probe:
    if path.suffix.lower() in TIFF_SUFFIXES:
        return _probe_tiff(path, shown, max_pixels)
    with _open_pil(path, shown, max_pixels) as image:
        if image.mode in _GREY8_MODES or image.mode in _COLOUR_MODES:
            kind = "grey8"
        elif image.mode in _GREY16_MODES:
            kind = "grey16"
        else:
            raise UnsupportedInputError(f"{shown}: image mode {image.mode} is not supported")
        return _Probe(path, kind, (image.size[1], image.size[0]), 1)


def _tiff_layout(series: tifffile.TiffPageSeries) -> tuple[int, int, int, bool]:
    """(pages, height, width, is_colour) of a TIFF series."""
    shape, axes = tuple(series.shape), series.axes
    colour = axes.endswith("S") and shape[-1] in (3, 4)
    height, width = (shape[-3], shape[-2]) if colour else (shape[-2], shape[-1])
    pages = int(np.prod(shape[: -3 if colour else -2], dtype=np.int64))
    return pages, int(height), int(width), colour


def _probe_tiff(path: Path, shown: str, max_pixels: int) -> _Probe:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            pages, height, width, colour = _tiff_layout(series)
            dtype = np.dtype(series.dtype)
    except Exception as exc:
        raise InputError(f"{shown}: not a readable TIFF file ({type(exc).__name__})") from None
    _limit(shown, width, height, max_pixels)
    if dtype == np.uint8:
        kind = "grey8"
    elif colour:
        raise UnsupportedInputError(f"{shown}: colour TIFF with {dtype} samples is not supported (8-bit only)")
    elif dtype == np.uint16:
        kind = "tiff-u16"
    elif dtype == np.int16:
        kind = "tiff-i16"
    elif dtype.kind == "f":
        kind = "tiff-float"
    else:
        raise UnsupportedInputError(f"{shown}: TIFF with {dtype} samples is not supported")
    return _Probe(path, kind, (height, width), pages)


def _luminance(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """Grey by luminance, and the mean spread between channels (0 for a grey image stored as RGB)."""
    rgb = rgb[..., :3].astype(np.float32)
    spread = float((rgb.max(axis=-1) - rgb.min(axis=-1)).mean())
    return rgb @ LUMA, spread


def _decode(probe: _Probe, shown: str, max_pixels: int) -> tuple[np.ndarray, float]:
    """``(pages, height, width)`` float32 values of one file, and its colour spread."""
    spread = 0.0
    try:
        if probe.path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(probe.path) as tif:
                series = tif.series[0]
                _, height, width, colour = _tiff_layout(series)
                data = series.asarray()
            if colour:
                data, spread = _luminance(data)
            return data.reshape(-1, height, width).astype(np.float32), spread
        with _open_pil(probe.path, shown, max_pixels) as image:
            image.load()
            if image.mode in _GREY8_MODES:
                data = np.asarray(image.convert("L"), dtype=np.float32)
            elif image.mode in _COLOUR_MODES:
                data, spread = _luminance(np.asarray(image.convert("RGB")))
            else:
                data = np.asarray(image, dtype=np.float32)
                if data.min() < 0 or data.max() > 65535:
                    raise UnsupportedInputError(f"{shown}: 32-bit integer image values are not 16-bit grey levels")
    except (InputError, UnsupportedInputError):
        raise
    except Exception as exc:
        raise InputError(f"{shown}: truncated or corrupt image ({_reason(exc)})") from None
    return data[None], spread


def _resize(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32))
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)


def read_images(
    files: Sequence[Path],
    name: NameFn,
    root: Path,
    *,
    modality: str = "CT",
    tiff_intercept: float = -1024.0,
    max_pixels: int = 64_000_000,
) -> Study:
    """Read one image, or a folder of slices in natural order, into a :class:`Study`.

    ``root`` is the folder the slice labels are relative to; ``modality`` is ``"CT"`` or ``"XR"``.
    """
    ordered = sorted(files, key=lambda p: [natural_key(part) for part in p.relative_to(root).parts])
    if modality == "XR" and len(ordered) > 1:
        return _frontal_of_exam(ordered, name, root, tiff_intercept=tiff_intercept, max_pixels=max_pixels)
    probes = [_probe(p, name(p), max_pixels) for p in ordered]
    first = probes[0]
    for probe in probes:
        if probe.kind != first.kind:
            raise InputError(
                f"{name(probe.path)}: {probe.kind} image but {name(first.path)} is {first.kind}; "
                "all slices of one study must have the same bit depth"
            )
    notes: list[str] = []
    sizes = Counter(p.size for p in probes for _ in range(p.pages))
    target = sizes.most_common(1)[0][0]
    odd = [p for p in probes if p.size != target]
    if odd and sizes[target] == 1:  # every slice has its own size: the first one's is taken
        notes.append(
            f"the {sum(sizes.values())} slices all differ in size (e.g. {name(odd[0].path)}: "
            f"{odd[0].size[1]}x{odd[0].size[0]}); they were resized to {target[1]}x{target[0]}, the first slice's "
            "size, without keeping their aspect ratios"
        )
    elif odd:
        notes.append(
            f"{sum(p.pages for p in odd)} of {sum(sizes.values())} slices had another size "
            f"(e.g. {name(odd[0].path)}: {odd[0].size[1]}x{odd[0].size[0]}) and were resized to "
            f"{target[1]}x{target[0]}, the most common size"
        )
    pixels = np.empty((sum(p.pages for p in probes), *target), dtype=np.float32)
    labels: list[str] = []
    coloured: list[tuple[str, float]] = []
    k = 0
    for probe in probes:
        data, spread = _decode(probe, name(probe.path), max_pixels)
        if spread > COLOUR_TOLERANCE:
            coloured.append((name(probe.path), spread))
        label = probe.path.relative_to(root).as_posix()
        for page, plane in enumerate(data):
            pixels[k] = plane if plane.shape == target else _resize(plane, target)
            labels.append(label if len(data) == 1 else f"{label} #{page}")
            k += 1
    if coloured:
        notes.append(
            f"{len(coloured)} of {len(probes)} images have colour channels that differ (e.g. "
            f"{coloured[0][0]}, mean spread {coloured[0][1]:.1f} grey levels: annotations or a colour map?); "
            "converted to grey by luminance"
        )

    intensity = first.kind if first.kind in ("grey8", "grey16") else "hu"
    if first.kind == "tiff-u16":
        if modality == "XR":
            intensity = "grey16"
        else:
            pixels += np.float32(tiff_intercept)
            notes.append(
                f"16-bit TIFF values were converted to Hounsfield units as value + ({tiff_intercept:g}) "
                "(tiff_intercept); pass another tiff_intercept if the slices store HU differently"
            )
    elif first.kind in ("tiff-i16", "tiff-float"):
        if modality == "XR":
            raise UnsupportedInputError(f"{name(first.path)}: {first.kind} values are not an X-ray image format")
        notes.append(f"{first.kind} TIFF values were taken as Hounsfield units without conversion")

    all_tiff = all(p.path.suffix.lower() in TIFF_SUFFIXES for p in probes)
    source = "image" if len(probes) == 1 else ("tiff-folder" if all_tiff else "image-folder")
    return Study(
        pixels=pixels,
        modality=modality,  # type: ignore[arg-type]
        intensity=intensity,  # type: ignore[arg-type]
        slice_labels=labels,
        source_format=source,
        metadata={"n_slices": len(labels)},
        warnings=notes,
    )


#: An X-ray exam read from a folder or zip holds at most this many images (PA, lateral, a repeat ...).
MAX_EXAM_IMAGES = 6


def _frontal_of_exam(
    files: Sequence[Path], name: NameFn, root: Path, *, tiff_intercept: float, max_pixels: int
) -> Study:
    """The one frontal X-ray of a folder or zip of X-ray images (an exam with a PA and a lateral, say).

    Each image is read on its own (no resizing to a common size) and its view classified; the lateral ones are
    set aside with a warning naming them. No frontal image, or more than one, is refused with the files named.
    """
    from lungsight.inference.view import classify_view
    from lungsight.preprocess.window import to_unit

    where = name(root).removesuffix("/.")
    if len(files) > MAX_EXAM_IMAGES:
        raise InputContractError(
            f"{where}: {len(files)} images given as X-rays; an X-ray study is one frontal radiograph "
            f"(a folder may hold one exam of up to {MAX_EXAM_IMAGES} views): pass one image"
        )
    views: dict[str, list[Path]] = {}
    kept: Study | None = None  # only the first frontal image stays in memory
    for path in files:
        one = read_images([path], name, root, modality="XR", tiff_intercept=tiff_intercept, max_pixels=max_pixels)
        kind = classify_view(to_unit(one.pixels[0], one.intensity)).kind
        views.setdefault(kind, []).append(path)
        if kind == "frontal" and kept is None:
            kept = one
    frontal = views.get("frontal", [])
    others = ", ".join(
        f"{kind if kind != 'ct' else 'CT slice'}: {', '.join(name(p) for p in found)}"
        for kind, found in views.items()
        if kind != "frontal"
    )
    if kept is None:
        raise InputContractError(
            f"{where}: none of the {len(files)} images is a frontal chest X-ray by the view classifier ({others}); "
            "the X-ray model reads frontal (PA/AP) views only"
        )
    if len(frontal) > 1:
        raise InputContractError(
            f"{where}: {len(frontal)} frontal X-rays ({', '.join(name(p) for p in frontal)}); "
            "the X-ray model reads one at a time: pass one image"
        )
    study = kept
    study.warnings.insert(
        0,
        f"{name(frontal[0])} is the frontal view of this exam and the one classified; set aside by the view "
        f"classifier: {others}",
    )
    return study
