"""Lung fields on frontal chest X-rays: one interface, a classical default that needs no masks, a trained U-Net.

Paper 004 crops and masks X-rays with a lung U-Net trained on manual masks. No X-ray lung masks ship with our data,
so the default here is a *classical* segmenter - thresholds and morphology, no learning - and a U-Net trained on
real masks (``lungsight segment train``, :mod:`lungsight.train.segmentation`) replaces it through
:func:`load_segmenter`. What the default is and how good it is, measured on the 471 frontal X-rays of
``cxr-cohen`` and ``cxr-actualmed``, is in ``docs/lung-fields.md``.

The classical segmenter works on the image resized to 256 x 256:

1. *padding*: near-black pixels connected to the image border (black frames, scanner padding) are outside the body;
2. *contrast*: CLAHE, then histogram equalisation inside the body, then a light Gaussian blur; this takes out the
   top-to-bottom brightness gradient of portable films that otherwise joins the apices to the dark neck and
   shoulders;
3. *dark*: the darkest of three multi-Otsu classes, minus a band around the mediastinum (the brightest column
   near the centre), which cuts the trachea's bridge between the lungs;
4. *split*: the dark mask cut at its narrow necks (watershed of its distance map, one basin per h-maximum of
   depth 2 px), which parts lungs from dark regions that touch them through gaps (the outside air beside the
   shoulders, the neck, text boxes); a region lying mostly in the image's outer 3 % band is outside air;
5. *one lung per side*: on each side of the mediastinum the region with the best area x position-prior score (a
   broad Gaussian around where lungs are in a frontal film) is grown by the touching regions of that side whose
   centre lies in the lung's envelope (its template ellipse, below, enlarged 1.4 times);
6. *shape*: each lung, cut to its envelope, becomes its convex hull, which fills holes and closes gaps: the
   opacities of COVID-19 are bright and would otherwise be left out of the lung.

When the result is implausible (:func:`mask_quality`), the segmenter falls back to an anatomical template (two
ellipses at the median lung position measured on the plausible classical masks, placed in the body's bounding
box) and says so: :class:`LungMask` ``.method == "template"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull
from skimage import draw, exposure, filters, morphology, segmentation

from lungsight.errors import InputError, ModelError
from lungsight.fileio import atomic_write, atomic_write_json
from lungsight.preprocess.transforms import fit_square
from lungsight.preprocess.window import to_unit

if TYPE_CHECKING:
    from lungsight.models.pretrained import ModelEntry

WORK_SIZE = 256  # the classical segmenter's working resolution (square)
PAD_LEVEL = 0.03  # near-black: within 3 % of the image's range above its minimum
MIDLINE_BAND = 0.03  # half-width of the mediastinum band removed from the dark mask, fraction of the width
NECK_DEPTH = 2.0  # px: dark regions joined through a neck at least this much narrower (in radius) are split
BORDER_BAND = 0.03  # outer band of the image, fraction of the side
MAX_BORDER_SHARE = 0.15  # a region with more of its pixels in the outer band is outside air
MIN_BODY = 0.3  # below this fraction of non-padding pixels the image is taken as all body (no box)
MIN_REGION_AREA = 0.002  # regions smaller than this fraction of the image are ignored
# Position prior: where the centre of each lung lies in a frontal film (fractions of height and width), and spread.
PRIOR_ROW, PRIOR_COLS, PRIOR_SD = 0.45, (0.30, 0.70), (0.20, 0.15)

# Plausibility (see docs/lung-fields.md for the distributions these bounds come from).
AREA_RANGE = (0.08, 0.60)  # lung area as a fraction of the image
MIN_BALANCE = 0.25  # smaller lung area / larger lung area
MIN_HEIGHT = 0.30  # the taller lung spans at least this fraction of the image height
MAX_COLUMN_OVERLAP = 0.25  # the lungs' column ranges overlap by at most this fraction of the narrower one

# Anatomical template: each lung's box as fractions of the body's bounding box (top, bottom, left, right), the
# medians over the plausible classical masks of the 471 frontal X-rays (scripts/measure_lung_fields.py).
TEMPLATE_BOXES = ((0.13, 0.75, 0.12, 0.43), (0.12, 0.74, 0.58, 0.87))
ENVELOPE_SCALE = 1.4  # a lung is clipped to its template ellipse enlarged this much about its centre


@runtime_checkable
class LungSegmenter(Protocol):
    """Anything that turns a frontal chest X-ray into a lung mask."""

    name: str

    def segment(self, image01: np.ndarray) -> np.ndarray:
        """``(H, W)`` grey image in [0, 1] (frontal CXR, white bones) -> ``(H, W)`` bool lung mask."""
        ...


@dataclass
class LungMask:
    """A lung mask with how it was obtained.

    Attributes:
        mask: ``(H, W)`` bool, both lungs.
        method: ``"classical"``, ``"unet"`` or ``"template"`` (the segmenter's own result was implausible).
        quality: :func:`mask_quality` of the segmenter's own result (before any fallback to the template).
    """

    mask: np.ndarray
    method: str
    quality: dict[str, Any] = field(default_factory=dict)

    @property
    def fell_back(self) -> bool:
        return self.method == "template"

    @property
    def note(self) -> str:
        """One line for the user when the mask is the template, else ``""``."""
        if not self.fell_back:
            return ""
        return f"lung segmentation implausible ({self.quality.get('reason', 'unknown')}); used the anatomical template"


def _check_image(image01: np.ndarray) -> np.ndarray:
    x = np.asarray(image01, dtype=np.float32)
    if x.ndim != 2 or min(x.shape) < 8:
        raise ValueError(f"expected a 2-D grey image of at least 8 x 8 pixels, got shape {x.shape}")
    return x if np.isfinite(x).all() else np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)


def to_work(image01: np.ndarray, size: int = WORK_SIZE) -> np.ndarray:
    """The image resized to ``size`` x ``size`` (bilinear, antialiased; the aspect ratio is not kept)."""
    return fit_square(_check_image(image01), size)[0].numpy()


def equalise(x: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
    """Histogram equalisation (:func:`skimage.exposure.equalize_hist`, 256 bins) computed from the pixels ``where``
    is True (all when None) and applied to those; 0 elsewhere. A constant region becomes mid-grey (0.5)."""
    x = np.asarray(x, dtype=np.float32)
    where = np.ones(x.shape, dtype=bool) if where is None else np.asarray(where, dtype=bool)
    out = np.zeros(x.shape, dtype=np.float32)
    if not where.any():
        return out
    values = x[where]
    if float(values.max() - values.min()) < 1e-6:
        out[where] = 0.5
    else:
        out[where] = exposure.equalize_hist(x, nbins=256, mask=where)[where]
    return out


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A bool mask resized to ``shape`` (bilinear on 0/1, thresholded at 0.5: smooth edges when enlarging)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask.copy()
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    shrink = shape[0] < mask.shape[0] or shape[1] < mask.shape[1]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0].numpy() >= 0.5


def _components(mask: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Label image and the pixel-index arrays (rows, cols) of each component, largest first."""
    lab, n = ndi.label(mask)
    if n == 0:
        return lab, []
    sizes = np.bincount(lab.ravel())[1:]
    order = np.argsort(-sizes, kind="stable") + 1
    objects = ndi.find_objects(lab)
    comps = []
    for k in order:
        sl = objects[k - 1]
        rr, cc = np.nonzero(lab[sl] == k)
        comps.append(np.stack([rr + sl[0].start, cc + sl[1].start]))
    return lab, comps


def keep_largest(mask: np.ndarray, n: int = 2) -> np.ndarray:
    """The ``n`` largest connected components of a bool mask, holes filled."""
    _, comps = _components(mask)
    out = np.zeros(mask.shape, dtype=bool)
    for rc in comps[:n]:
        out[rc[0], rc[1]] = True
    return ndi.binary_fill_holes(out)


def mask_quality(mask: np.ndarray) -> dict[str, Any]:
    """Is this a plausible pair of lungs on a frontal X-ray? Shape checks only; it cannot see anatomy.

    Returns ``area_fraction`` (lungs / image), ``n_components``, ``balance`` (smaller / larger lung area),
    ``left_share`` (image-left lung / both), ``height_fraction`` (the taller lung's row extent / image height),
    ``column_overlap`` (of the two lungs' column ranges, as a fraction of the narrower), ``ok``, ``check`` (the
    first failed check: empty, components, area, side_by_side, balance or height; ``""`` when ok) and ``reason``
    (one line for the user). Plausible means exactly two components side by side (column ranges overlapping by at
    most 25 % of the narrower), together covering 8-60 % of the image, neither smaller than a quarter of the other,
    the taller spanning 30 % of the height.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    h = mask.shape[0]
    _, comps = _components(mask)
    q: dict[str, Any] = {
        "area_fraction": float(mask.mean()),
        "n_components": len(comps),
        "balance": 0.0,
        "left_share": None,
        "height_fraction": 0.0,
        "column_overlap": None,
    }
    if comps:
        q["height_fraction"] = float(max(np.ptp(rc[0]) + 1 for rc in comps) / h)
    if len(comps) == 2:
        left, right = sorted(comps, key=lambda rc: rc[1].mean())
        a_l, a_r = left.shape[1], right.shape[1]
        q["balance"] = float(min(a_l, a_r) / max(a_l, a_r))
        q["left_share"] = float(a_l / (a_l + a_r))
        overlap = min(left[1].max(), right[1].max()) - max(left[1].min(), right[1].min()) + 1
        narrower = min(np.ptp(left[1]), np.ptp(right[1])) + 1
        q["column_overlap"] = float(max(overlap, 0) / narrower)
    check, reason = "", ""
    if not comps:
        check, reason = "empty", "empty mask"
    elif len(comps) != 2:
        check, reason = "components", f"{len(comps)} components, expected 2 (one lung each side)"
    elif not AREA_RANGE[0] <= q["area_fraction"] <= AREA_RANGE[1]:
        check = "area"
        reason = f"lungs cover {q['area_fraction']:.0%} of the image, expected {AREA_RANGE[0]:.0%}-{AREA_RANGE[1]:.0%}"
    elif q["column_overlap"] > MAX_COLUMN_OVERLAP:
        check, reason = "side_by_side", "the two components are not side by side"
    elif q["balance"] < MIN_BALANCE:
        check, reason = "balance", f"one lung is {q['balance']:.0%} of the other's area"
    elif q["height_fraction"] < MIN_HEIGHT:
        check = "height"
        reason = f"lungs span {q['height_fraction']:.0%} of the image height, expected at least {MIN_HEIGHT:.0%}"
    q.update(ok=not reason, check=check, reason=reason)
    return q


def _outside(x: np.ndarray) -> np.ndarray:
    """Near-black pixels connected to the border: black frames, padding, burnt-out air beside the body."""
    low = x <= x.min() + PAD_LEVEL * (x.max() - x.min())
    low = ndi.binary_dilation(low, morphology.disk(2).astype(bool))
    return low & ~segmentation.clear_border(low)


def body_box(image01: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right), exclusive ends, of the image without border-connected near-black padding."""
    x = to_work(image01)
    inside = ~_outside(x)
    h, w = image01.shape
    if inside.mean() < MIN_BODY:
        return 0, h, 0, w
    top, bottom, left, right = _box_of(inside)
    sy, sx = h / x.shape[0], w / x.shape[1]
    return int(top * sy), int(np.ceil(bottom * sy)), int(left * sx), int(np.ceil(right * sx))


def _box_of(inside: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.nonzero(inside.any(axis=1))[0], np.nonzero(inside.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _ellipses(shape: tuple[int, int], box: tuple[int, int, int, int], scale: float = 1.0) -> list[np.ndarray]:
    """The two template lungs (image-left first) as ellipses in ``box``, enlarged ``scale`` times about their centre."""
    top, bottom, left, right = box
    bh, bw = bottom - top, right - left
    out = []
    for t, b, lo, hi in TEMPLATE_BOXES:
        r0, r1 = top + t * bh, top + b * bh
        c0, c1 = left + lo * bw, left + hi * bw
        e = np.zeros(shape, dtype=bool)
        rr, cc = draw.ellipse((r0 + r1) / 2, (c0 + c1) / 2, scale * (r1 - r0) / 2, scale * (c1 - c0) / 2, shape=shape)
        e[rr, cc] = True
        out.append(e)
    return out


def template_mask(image01: np.ndarray) -> np.ndarray:
    """The anatomical fallback: two ellipses at the median lung boxes (:data:`TEMPLATE_BOXES`) in the body box."""
    image01 = _check_image(image01)
    left, right = _ellipses(image01.shape, body_box(image01))
    return left | right


def convex_hull(mask: np.ndarray) -> np.ndarray:
    """The convex hull of a bool mask's pixels (scipy's Qhull on the pixel centres, filled as a polygon)."""
    points = np.argwhere(mask)
    out = mask.copy()
    if len(points) < 3 or np.linalg.matrix_rank(points - points[0]) < 2:
        return out
    vertices = points[ConvexHull(points).vertices]
    rr, cc = draw.polygon(vertices[:, 0], vertices[:, 1], shape=mask.shape)
    out[rr, cc] = True
    return out


class ClassicalSegmenter:
    """The no-mask default: thresholds, morphology and convex hulls at 256 px (see the module docstring)."""

    name = "classical"

    def segment(self, image01: np.ndarray) -> np.ndarray:
        return self.segment_detail(image01).mask

    def segment_detail(self, image01: np.ndarray) -> LungMask:
        """The mask, how it was obtained, and the quality of the classical attempt."""
        image01 = _check_image(image01)
        small = self.segment_small(to_work(image01))
        quality = mask_quality(small)
        if not quality["ok"]:
            return LungMask(template_mask(image01), "template", quality)
        return LungMask(resize_mask(small, image01.shape), self.name, quality)

    def segment_small(self, x: np.ndarray) -> np.ndarray:
        """The classical lung mask of a ``WORK_SIZE`` square image (may be implausible; no fallback here)."""
        if float(np.ptp(x)) < 1e-3:
            return np.zeros(x.shape, dtype=bool)
        valid = ~_outside(x)
        if valid.mean() < MIN_BODY:
            return np.zeros(x.shape, dtype=bool)
        dark, mid = _dark_fields(x, valid)
        regions = _split(dark)
        stats = _region_stats(regions, mid)
        envelope = _ellipses(x.shape, _box_of(valid), ENVELOPE_SCALE)
        out = np.zeros(x.shape, dtype=bool)
        for side in (0, 1):
            chosen = _grow_lung(stats, _adjacent(regions), side, envelope[side])
            if not chosen:
                continue
            hull = convex_hull(np.isin(regions, chosen) & envelope[side])
            if side == 0:
                hull[:, mid:] = False
            else:
                hull[:, :mid] = False
            out |= hull
        return out


def _dark_fields(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, int]:
    """Steps 2-3: the dark class after CLAHE and equalisation, minus the mediastinum band; and the midline column."""
    h, w = x.shape
    eq = exposure.equalize_adapthist(x, kernel_size=w // 4)
    eq = filters.gaussian(exposure.equalize_hist(eq, mask=valid), sigma=2)
    central = np.where(valid, eq, 0.0)[int(0.2 * h) : int(0.8 * h), int(0.35 * w) : int(0.65 * w)]
    mid = int(0.35 * w) + int(np.argmax(central.mean(axis=0)))
    dark = (eq < filters.threshold_multiotsu(eq[valid], classes=3)[0]) & valid
    band = int(MIDLINE_BAND * w)
    dark[:, mid - band : mid + band] = False
    return ndi.binary_opening(dark, morphology.disk(2).astype(bool)), mid


def _split(dark: np.ndarray) -> np.ndarray:
    """Step 4: the dark mask cut at its narrow necks (watershed of the distance map from its h-maxima)."""
    dist = ndi.distance_transform_edt(dark)
    markers, _ = ndi.label(morphology.h_maxima(dist, NECK_DEPTH))
    return segmentation.watershed(-dist, markers, mask=dark)


def _region_stats(regions: np.ndarray, mid: int) -> dict[int, dict[str, float]]:
    """Area, centroid, side and share of pixels in the outer band of each region (regions below the minimum
    area are left out)."""
    h, w = regions.shape
    n = int(regions.max()) + 1
    rows, cols = np.indices(regions.shape)
    edge = int(np.ceil(BORDER_BAND * h))
    in_band = np.zeros(regions.shape, dtype=bool)
    in_band[:edge], in_band[-edge:], in_band[:, :edge], in_band[:, -edge:] = True, True, True, True
    flat = regions.ravel()
    area = np.bincount(flat, minlength=n).astype(float)
    cy = np.bincount(flat, rows.ravel(), n) / np.maximum(area, 1)
    cx = np.bincount(flat, cols.ravel(), n) / np.maximum(area, 1)
    band = np.bincount(flat, in_band.ravel(), n) / np.maximum(area, 1)
    return {
        k: {"area": area[k], "row": cy[k], "col": cx[k], "side": int(cx[k] >= mid), "border": band[k]}
        for k in range(1, n)
        if area[k] >= MIN_REGION_AREA * h * w
    }


def _adjacent(regions: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of region labels that touch (4-neighbourhood)."""
    pairs = set()
    for a, b in ((regions[:, :-1], regions[:, 1:]), (regions[:-1], regions[1:])):
        touch = (a != b) & (a > 0) & (b > 0)
        pairs |= set(zip(a[touch].tolist(), b[touch].tolist(), strict=True))
    return pairs | {(b, a) for a, b in pairs}


def _grow_lung(
    stats: dict[int, dict[str, float]], pairs: set[tuple[int, int]], side: int, envelope: np.ndarray
) -> list[int]:
    """Step 5: the best-scoring region of one side, grown by the touching regions of that side whose centre lies
    in the lung's envelope; regions mostly in the outer band (outside air) never take part."""
    h, w = envelope.shape
    cands = {k: v for k, v in stats.items() if v["side"] == side and v["border"] <= MAX_BORDER_SHARE}
    if not cands:
        return []

    def score(v: dict[str, float]) -> float:
        d2 = ((v["row"] / h - PRIOR_ROW) / PRIOR_SD[0]) ** 2 + ((v["col"] / w - PRIOR_COLS[side]) / PRIOR_SD[1]) ** 2
        return v["area"] * float(np.exp(-d2 / 2))

    chosen = [max(cands, key=lambda k: score(cands[k]))]
    frontier = list(chosen)
    while frontier:
        k = frontier.pop()
        for j, v in cands.items():
            if j not in chosen and (k, j) in pairs and envelope[int(v["row"]), int(v["col"])]:
                chosen.append(j)
                frontier.append(j)
    return chosen


def default_segmenter() -> ClassicalSegmenter:
    """The segmenter used when no trained U-Net is given: deterministic, about 40 ms of CPU per image (one core)."""
    return ClassicalSegmenter()


def _unet_entry(name_or_path: str | Path) -> ModelEntry:
    """The lung U-Net a segmenter name or path stands for: a file, or a bundled or imported model (verified
    against its recorded SHA-256)."""
    from lungsight.models.pretrained import list_models, resolve  # models sit above preprocess: imported when asked

    path = Path(name_or_path)
    if not path.is_file() and str(name_or_path) not in {e.name for e in list_models()}:
        raise ModelError(
            f"{path}: lung segmenter not found (give 'classical', 'xr-lungs' or a lung U-Net .safetensors file)"
        )
    return resolve(path if path.is_file() else str(name_or_path))


def load_segmenter(name_or_path: str | Path | None) -> LungSegmenter:
    """``None`` or ``"classical"`` -> the classical segmenter; the name of a bundled or imported lung U-Net
    (``"xr-lungs"``, verified against its recorded SHA-256) or the path of a lung U-Net ``.safetensors`` file ->
    that U-Net's segmenter."""
    if name_or_path is None or str(name_or_path) == "classical":
        return default_segmenter()
    from lungsight.models.unet import UNetSegmenter

    entry = _unet_entry(name_or_path)
    return UNetSegmenter.from_file(entry.path, name=None if entry.source == "file" else entry.name)


def segmenter_fingerprint(name_or_path: str | Path | None) -> str:
    """What identifies a segmenter's masks: ``"classical"``, or a U-Net's name or path with its file's SHA-256 (a
    retrained file under the same name or path gives other masks, so caches keyed on this are not reused)."""
    if name_or_path is None or str(name_or_path) == "classical":
        return "classical"
    from lungsight.models.weights import sha256_file

    entry = _unet_entry(name_or_path)
    return f"{name_or_path}:{entry.sha256 or sha256_file(entry.path)}"  # a named model's hash is verified already


def segment_detail(segmenter: LungSegmenter, image01: np.ndarray) -> LungMask:
    """:meth:`segment_detail` of segmenters that have it; for others, their mask with the template fallback."""
    detail = getattr(segmenter, "segment_detail", None)
    if callable(detail):
        return detail(image01)
    mask = np.asarray(segmenter.segment(image01), dtype=bool)
    quality = mask_quality(mask)
    if not quality["ok"]:
        return LungMask(template_mask(image01), "template", quality)
    return LungMask(mask, segmenter.name, quality)


def segment_file(path: Path, segmenter: LungSegmenter, out_dir: Path) -> LungMask:
    """Segment the lungs of one X-ray file and write ``lung_mask.png`` (0/255, the image's size),
    ``lung_overlay.png`` (the image with the mask's outline in magenta) and ``lung_mask.json`` (method, quality)
    into ``out_dir``. Nothing is written when the file cannot be read or holds more than one image."""
    from lungsight.io import load_study

    study = load_study(path, modality="XR")
    if study.n_slices != 1:
        raise InputError(f"{path}: {study.n_slices} images found; give one frontal chest X-ray")
    image01 = to_unit(study.pixels[0], study.intensity)
    detail = segment_detail(segmenter, image01)
    out_dir = Path(out_dir)
    mask8 = Image.fromarray(detail.mask.astype(np.uint8) * 255)
    atomic_write(out_dir / "lung_mask.png", lambda p: mask8.save(p, format="PNG"))
    overlay = segmentation.mark_boundaries(image01, detail.mask, color=(1.0, 0.0, 1.0), mode="thick")
    overlay8 = Image.fromarray((np.clip(overlay, 0.0, 1.0) * 255 + 0.5).astype(np.uint8))
    atomic_write(out_dir / "lung_overlay.png", lambda p: overlay8.save(p, format="PNG"))
    atomic_write_json(
        out_dir / "lung_mask.json",
        {
            "input": Path(path).name,
            "segmenter": segmenter.name,
            "method": detail.method,
            "note": detail.note,
            "area_fraction": float(detail.mask.mean()),
            "quality": detail.quality,
        },
    )
    return detail
