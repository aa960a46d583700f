"""Heat-map overlays of Grad-CAM maps on grey slices, drawn with PIL (no matplotlib) and written as PNGs."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont, features

from lungsight.fileio import atomic_write
from lungsight.report.png import encode_png

CAM_FLOOR = 0.05  # map values at or below this are left uncoloured
OUTLINE_RGB = (255, 0, 255)  # magenta: absent from both the grey slice and the jet colour map
PANEL_GAP = 4  # white pixels between the two panels of a saved overlay

# matplotlib's "jet" segment data (x, value) per channel, evaluated here without importing matplotlib.
_JET = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


@lru_cache(maxsize=8)
def _colour_table(cmap: str) -> np.ndarray:
    """256 x 3 uint8 lookup table of a colour map; "jet" is built in, other names come from matplotlib."""
    x = np.linspace(0.0, 1.0, 256)
    if cmap == "jet":
        channels = [np.interp(x, *zip(*_JET[c], strict=True)) for c in "rgb"]
        table = np.stack(channels, axis=1)
    else:
        import matplotlib

        table = matplotlib.colormaps[cmap](x)[:, :3]
    return np.round(table * 255.0).astype(np.uint8)


@lru_cache(maxsize=8)
def _blend_table(cmap: str, alpha: float) -> np.ndarray:
    """(256 * 256) x 3 uint8 table: row ``grey * 256 + cam`` is the blended colour (cam 0 leaves grey)."""
    colours = _colour_table(cmap).astype(np.float32)[None, :, :]
    grey = np.arange(256, dtype=np.float32)[:, None, None]
    weight = np.full((1, 256, 1), alpha, dtype=np.float32)
    weight[0, 0, 0] = 0.0
    table = grey + weight * (colours - grey)
    return np.clip(table + 0.5, 0, 255).astype(np.uint8).reshape(-1, 3)


def _resize(a: np.ndarray, shape: tuple[int, int], mode: str) -> np.ndarray:
    """Resize a 2-D array to ``shape`` with torch interpolation ("bilinear" or "nearest")."""
    if a.shape == shape:
        return a
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(t, size=shape, mode=mode, **kwargs)[0, 0].numpy()


def _unit(a: np.ndarray) -> np.ndarray:
    """``a`` clipped to [0, 1], NaN as 0 (what ``np.clip(np.nan_to_num(a), 0, 1)`` gives, in two passes)."""
    return np.minimum(np.fmax(a, 0.0), 1.0)


def _outline(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """One-pixel inner contour of a boolean mask (resized to ``shape`` by nearest neighbour)."""
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {m.shape}")
    m = _resize(m.astype(np.float32), shape, "nearest") > 0.5
    p = np.pad(m, 1, mode="edge")  # the image border is not a contour
    interior = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~interior


def overlay_image(
    slice01: np.ndarray,
    cam: np.ndarray | None,
    *,
    alpha: float = 0.4,
    cmap: str = "jet",
    mask_outline: np.ndarray | None = None,
) -> np.ndarray:
    """RGB uint8 image (H, W, 3) of a grey slice (values in [0, 1]), heat map blended where it exceeds 0.05.

    ``cam`` (values in [0, 1], any resolution) is resized bilinearly to the slice; ``None`` gives the plain
    slice.
    ``mask_outline``, a boolean mask (e.g. the lungs), is drawn as a thin magenta contour.
    """
    return _overlay_rgb(_grey8(slice01), cam, alpha, cmap, mask_outline)


def _grey8(slice01: np.ndarray) -> np.ndarray:
    """The slice's grey levels 0-255 (uint8: narrow integers convert several times faster than ``intp``)."""
    s = np.asarray(slice01, dtype=np.float32)
    if s.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {s.shape}")
    return (_unit(s) * 255.0 + 0.5).astype(np.uint8)


def _overlay_rgb(
    grey: np.ndarray, cam: np.ndarray | None, alpha: float, cmap: str, mask_outline: np.ndarray | None
) -> np.ndarray:
    """:func:`overlay_image` of a slice already turned into grey levels by :func:`_grey8`."""
    if cam is None:
        out = np.repeat(grey[..., None], 3, axis=2)
    else:
        c = np.asarray(cam, dtype=np.float32)
        if c.ndim != 2:
            raise ValueError(f"expected a 2-D map, got shape {c.shape}")
        c = _unit(_resize(c, grey.shape, "bilinear"))
        cam_idx = (c * 255.0 + 0.5).astype(np.uint16)
        cam_idx[c <= CAM_FLOOR] = 0
        rows = (grey.astype(np.intp) << 8) | cam_idx  # grey * 256 + cam: the blend table's row
        out = np.take(_blend_table(cmap, float(alpha)), rows, axis=0)
    if mask_outline is not None:
        out[_outline(mask_outline, grey.shape)] = OUTLINE_RGB
    return out


def _caption_strip(text: str, width: int, size: int) -> Image.Image:
    font = ImageFont.load_default(size=size) if features.check("freetype2") else ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if probe.textlength(text, font=font) > width - 8:
        while text and probe.textlength(text + "...", font=font) > width - 8:
            text = text[:-1]
        text += "..."
    _, top, _, bottom = probe.textbbox((0, 0), text, font=font)
    height = bottom - top + 8
    strip = Image.new("RGB", (width, height), (255, 255, 255))
    ImageDraw.Draw(strip).text((4, 4 - top), text, fill=(0, 0, 0), font=font)
    return strip


def save_overlay(
    slice01: np.ndarray,
    cam: np.ndarray | None,
    path: str | os.PathLike[str],
    caption: str | None = None,
    *,
    alpha: float = 0.4,
    cmap: str = "jet",
    mask_outline: np.ndarray | None = None,
) -> Path:
    """Write a PNG of [slice | overlay] side by side, with an optional caption strip below; returns the path.

    The image keeps the slice's resolution (no upscaling). Parent folders are created and the write is atomic.
    """
    path = Path(path)
    grey = _grey8(slice01)
    over = _overlay_rgb(grey, cam, alpha, cmap, mask_outline)
    h, w = grey.shape
    width = 2 * w + PANEL_GAP
    strip = _caption_strip(caption, width, size=min(22, max(11, round(h / 28)))) if caption else None
    panel = np.empty((h + (strip.height if strip else 0), width, 3), dtype=np.uint8)  # drawn once, in place
    for channel in range(3):  # a plane at a time: broadcasting into 3-byte pixels took four times as long
        panel[:h, :w, channel] = grey
    panel[:h, w : w + PANEL_GAP] = 255
    panel[:h, w + PANEL_GAP :] = over
    if strip:
        panel[h:] = np.asarray(strip)
    png = encode_png(panel)
    return atomic_write(path, lambda tmp: tmp.write_bytes(png))
