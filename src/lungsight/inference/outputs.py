"""Writing a prediction to disk: result.json, overlays/, slice_probabilities.svg (CT) and report.html.

Only these names inside ``out_dir`` are written (atomically); nothing else in the folder is touched.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lungsight.cores import usable_cores
from lungsight.explain.overlay import save_overlay
from lungsight.fileio import atomic_write_json, atomic_write_text, ensure_dir
from lungsight.report.html import write_report
from lungsight.report.svg import slice_chart

DISPLAY_MIN = 256
CHART_NAME = "slice_probabilities.svg"

if TYPE_CHECKING:
    from lungsight.inference.detector import Evidence, Prediction


def _display_size(slice01: np.ndarray, cam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Enlarge small slices (cropped volumes, thumbnails) to at least DISPLAY_MIN pixels for the report."""
    h, w = slice01.shape
    scale = DISPLAY_MIN / min(h, w)
    if scale <= 1:
        return slice01, cam
    size = (round(h * scale), round(w * scale))
    both = torch.from_numpy(np.stack([slice01, cam]).astype(np.float32))[:, None]
    big = F.interpolate(both, size=size, mode="bilinear", align_corners=False)[:, 0].numpy()
    return big[0], big[1]


def _display_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask resized (nearest) to the displayed image's shape."""
    if mask.shape == shape:
        return mask
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.interpolate(m, size=shape, mode="nearest")[0, 0].numpy() > 0.5


def _write_overlay(ev: Evidence, path: Path, xray: bool) -> None:
    slice01, cam = _display_size(ev.slice01, ev.cam)
    mask = None if ev.mask is None else _display_mask(ev.mask, slice01.shape)
    caption = f"{ev.label}  p({ev.label if xray else 'covid'})={ev.p:.3f}"
    share = ev.extra.get("lung_share")
    if share is not None:
        caption += f"  evidence in lungs {100 * share:.0f}%"
    save_overlay(slice01, cam, path, caption=caption, mask_outline=mask)


def write_outputs(pred: Prediction, out_dir: Path) -> Path:
    """Write every output of ``pred`` into ``out_dir``; returns the path of report.html.

    The overlays are drawn and encoded in worker threads (NumPy and ISA-L's deflate release the GIL, and the model
    is idle by now) while this thread writes the slice chart; result.json, which names the overlays, and the report,
    which embeds them, follow once they are all written.
    """
    ensure_dir(out_dir)
    result = pred.result
    xray = "slice_probabilities" not in result
    names = [f"overlays/{'xray' if xray else 'slice'}_{ev.index:04d}.png" for ev in pred.evidence]
    result["overlays"] = [
        {"index": ev.index, "label": ev.label, "p": ev.p, "file": rel, **ev.extra}
        for ev, rel in zip(pred.evidence, names, strict=True)
    ]
    workers = max(1, min(len(names), usable_cores(), 4))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lungsight-png") as pool:
        drawn = [
            pool.submit(_write_overlay, ev, out_dir / rel, xray) for ev, rel in zip(pred.evidence, names, strict=True)
        ]
        chart = slice_chart(result)  # None for an X-ray
        if chart is not None:
            atomic_write_text(out_dir / CHART_NAME, chart)
        for future in drawn:
            future.result()  # raises the first error, before result.json names the overlays
    atomic_write_json(out_dir / "result.json", result)
    return write_report(result, out_dir)
