"""How well a lung segmenter agrees with manual masks: Dice and IoU per image, a summary, and the worst cases.

``lungsight segment evaluate`` runs this on any image+mask folder of the layouts ``segment train`` reads
(:func:`lungsight.train.segmentation.discover_pairs`). Each image is segmented at its own size, exactly as
prediction does (:func:`lungsight.preprocess.lung_fields.segment_detail`, with the template fallback), and compared
with its manual mask resized to the image. Two baselines are scored on the same images: the anatomical template
alone (two ellipses placed in the body box, no information about the patient) and the all-lung mask.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from skimage import segmentation
from tqdm import tqdm

from lungsight.about import __version__
from lungsight.errors import InputError
from lungsight.fileio import atomic_write
from lungsight.preprocess.lung_fields import LungSegmenter, resize_mask, segment_detail, template_mask
from lungsight.preprocess.transforms import fit_square
from lungsight.train.segmentation import Pair, read_image_and_mask

MANUAL_RGB = (0.0, 1.0, 0.0)  # green: the manual mask's outline
PREDICTED_RGB = (1.0, 0.0, 1.0)  # magenta: the segmenter's, as in lungsight's other overlays


def mask_agreement(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice 2|P∩T| / (|P| + |T|) and IoU |P∩T| / |P∪T| of two boolean masks of the same shape (both 1.0 when
    both masks are empty)."""
    p, t = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if p.shape != t.shape:
        raise ValueError(f"masks differ in shape: {p.shape} and {t.shape}")
    inter = int(np.count_nonzero(p & t))
    total = int(np.count_nonzero(p)) + int(np.count_nonzero(t))
    if total == 0:
        return {"dice": 1.0, "iou": 1.0}
    return {"dice": 2.0 * inter / total, "iou": inter / (total - inter)}


def _stats(values: Iterable[float]) -> dict[str, float | None]:
    v = np.asarray(list(values), dtype=float)
    if v.size == 0:
        return {"mean": None, "median": None, "p5": None, "p25": None}
    return {
        "mean": float(v.mean()),
        "median": float(np.median(v)),
        "p5": float(np.percentile(v, 5)),
        "p25": float(np.percentile(v, 25)),
    }


def evaluate_segmenter(
    segmenter: LungSegmenter, pairs: list[Pair], *, keep_worst: int = 0
) -> tuple[list[dict[str, Any]], dict[str, Any], list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]]]:
    """Score ``segmenter`` on image+mask ``pairs``: per-image rows, a summary, and the ``keep_worst`` images with
    the lowest Dice as ``(name, image, manual mask, predicted mask, dice)`` for :func:`worst_cases_sheet`."""
    rows: list[dict[str, Any]] = []
    worst: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]] = []
    for pair in tqdm(pairs, desc="segmenting", unit="image", disable=None):
        image, truth = read_image_and_mask(pair)
        t0 = time.process_time()
        detail = segment_detail(segmenter, image)
        seconds = time.process_time() - t0
        got = mask_agreement(detail.mask, truth)
        rows.append(
            {
                "image": pair.image.name,
                "height": image.shape[0],
                "width": image.shape[1],
                "method": detail.method,
                "dice": got["dice"],
                "iou": got["iou"],
                "template_dice": mask_agreement(template_mask(image), truth)["dice"],
                "all_lung_dice": mask_agreement(np.ones_like(truth), truth)["dice"],
                "manual_area": float(truth.mean()),
                "predicted_area": float(detail.mask.mean()),
                "cpu_seconds": seconds,
            }
        )
        if keep_worst:
            worst.append((pair.image.name, image, truth, detail.mask, got["dice"]))
            worst.sort(key=lambda w: w[4])
            del worst[keep_worst:]
    summary: dict[str, Any] = {
        "segmenter": segmenter.name,
        "n_images": len(rows),
        "dice": _stats(r["dice"] for r in rows),
        "iou": _stats(r["iou"] for r in rows),
        "baselines": {
            "template_dice": _stats(r["template_dice"] for r in rows),
            "all_lung_dice": _stats(r["all_lung_dice"] for r in rows),
        },
        "by_method": {
            m: {"n": sum(r["method"] == m for r in rows), "dice": _stats(r["dice"] for r in rows if r["method"] == m)}
            for m in sorted({r["method"] for r in rows})
        },
        "area": {
            "manual": _stats(r["manual_area"] for r in rows),
            "predicted": _stats(r["predicted_area"] for r in rows),
        },
        "cpu_seconds_median": float(np.median([r["cpu_seconds"] for r in rows])) if rows else None,
        "worst_images": [w[0] for w in worst],
    }
    return rows, summary, worst


def worst_cases_sheet(
    worst: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, float]], path: Path, *, tile: int = 256, cols: int = 4
) -> Path:
    """A PNG grid of images with the manual outline (green) and the segmenter's (magenta), lowest Dice first.

    Tiles are numbered in the order of the summary's ``worst_images``, not named: file names can carry
    identifying text."""
    if not worst:
        raise ValueError("no images to draw")
    rows = -(-len(worst) // cols)
    sheet = np.full((rows * (tile + 18), cols * tile, 3), 255, dtype=np.uint8)
    captions = []
    for k, (_, image, truth, pred, dice) in enumerate(worst):
        small = fit_square(image[None], tile)[0].numpy()
        both = segmentation.mark_boundaries(
            np.stack([small] * 3, axis=-1), resize_mask(truth, (tile, tile)), color=MANUAL_RGB
        )
        both = segmentation.mark_boundaries(both, resize_mask(pred, (tile, tile)), color=PREDICTED_RGB)
        r, c = divmod(k, cols)
        top = r * (tile + 18)
        sheet[top : top + tile, c * tile : (c + 1) * tile] = (np.clip(both, 0, 1) * 255 + 0.5).astype(np.uint8)
        captions.append((c * tile + 4, top + tile + 2, f"#{k + 1}  Dice {dice:.2f}"))
    picture = Image.fromarray(sheet)
    draw = ImageDraw.Draw(picture)
    for x, y, text in captions:
        draw.text((x, y), text, fill=(0, 0, 0))
    return atomic_write(Path(path), lambda p: picture.save(p, format="PNG"))


def held_out_images(run: Path) -> set[str]:
    """The image names a ``lungsight segment train`` run held out for validation (its ``summary.json``)."""
    path = Path(run) / "summary.json"
    try:
        names = json.loads(path.read_text()).get("held_out_images")
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the run's summary ({exc})") from None
    if not isinstance(names, list) or not names:
        raise InputError(f"{path}: lists no held-out X-rays (a run of lungsight {__version__} or later on X-rays)")
    return {str(n) for n in names}
