"""Measure a lung segmenter on every frontal X-ray of cxr-cohen and cxr-actualmed (no ground-truth masks exist).

Prints: the plausible-mask rate (:func:`lungsight.preprocess.lung_fields.mask_quality`), the fallback rate, the
reasons for implausible masks, area-fraction / balance / height distributions, the time per image (segmentation
only, full resolution in and out), each lung's median box in the body box (the template's numbers), and writes a
contact sheet of random overlays plus per-image rows to ``--out`` (outside the repository).

    .venv/bin/python scripts/measure_lung_fields.py --out /tmp/lungfields [--segmenter classical|FILE]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

import lungsight
from lungsight.fileio import atomic_write, atomic_write_csv, atomic_write_json
from lungsight.preprocess.lung_fields import body_box, load_segmenter, segment_detail
from lungsight.preprocess.window import to_unit

FRONTAL = ("PA", "AP", "AP Supine")
SOURCES = ("cxr-cohen", "cxr-actualmed")


def frontal_images(data: Path) -> list[tuple[Path, str, str]]:
    """(path, source, view) of every frontal image listed in the sources' metadata.csv."""
    found = []
    for source in SOURCES:
        with open(data / source / "metadata.csv", newline="") as f:
            for row in csv.DictReader(f):
                if row["view"] in FRONTAL:
                    found.append((data / source / "images" / row["file"], source, row["view"]))
    return found


def lung_boxes(mask: np.ndarray, box: tuple[int, int, int, int]) -> list[tuple[float, float, float, float]]:
    """Each lung's (top, bottom, left, right) as fractions of the body box, image-left lung first."""
    from scipy import ndimage as ndi

    top, bottom, left, right = box
    lab, _ = ndi.label(mask)
    boxes = []
    for sl in sorted(ndi.find_objects(lab), key=lambda s: s[1].start):
        boxes.append(
            (
                (sl[0].start - top) / (bottom - top),
                (sl[0].stop - top) / (bottom - top),
                (sl[1].start - left) / (right - left),
                (sl[1].stop - left) / (right - left),
            )
        )
    return boxes


def contact_sheet(items: list[tuple[np.ndarray, np.ndarray, str, bool]], path: Path, cols: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = int(np.ceil(len(items) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, (img, mask, title, fell_back) in zip(np.ravel(axes), items, strict=False):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.contour(mask, [0.5], colors="orange" if fell_back else "red", linewidths=1.2)
        ax.set_title(title, fontsize=7, color="darkorange" if fell_back else "black")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=80))
    plt.close(fig)


def percentiles(values: list[float]) -> str:
    q = np.percentile(values, [5, 25, 50, 75, 95])
    return " / ".join(f"{v:.3f}" for v in q)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("LUNGSIGHT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared/data"))
    ap.add_argument("--data", type=Path, default=default_data)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lungfields"))
    ap.add_argument("--segmenter", default="classical", help="'classical' or a lung U-Net .safetensors file")
    ap.add_argument("--sheet", type=int, default=24, help="overlays on the contact sheet")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    segmenter = load_segmenter(args.segmenter)
    images = frontal_images(args.data)
    rng = np.random.default_rng(args.seed)
    on_sheet = set(rng.choice(len(images), min(args.sheet, len(images)), replace=False).tolist())
    rows, sheet, boxes, times = [], [], [], []
    for k, (path, source, view) in enumerate(images):
        study = lungsight.load_study(path, modality="XR")
        image = to_unit(study.pixels[0], study.intensity)
        t0, c0 = time.perf_counter(), time.process_time()
        detail = segment_detail(segmenter, image)
        times.append((time.perf_counter() - t0, time.process_time() - c0, image.shape))
        q = detail.quality
        rows.append(
            {
                "file": f"{source}/{path.name}",
                "view": view,
                "height": image.shape[0],
                "width": image.shape[1],
                "method": detail.method,
                "ok": q["ok"],
                "check": q["check"],
                "reason": q["reason"],
                "area_fraction": q["area_fraction"],
                "n_components": q["n_components"],
                "balance": q["balance"],
                "left_share": q["left_share"],
                "height_fraction": q["height_fraction"],
                "seconds": times[-1][0],
            }
        )
        if q["ok"]:
            boxes.append(lung_boxes(detail.mask, body_box(image)))
        if k in on_sheet:
            sheet.append((image, detail.mask, f"{k} {view} {detail.method}", detail.fell_back))
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(args.out / "lung_fields.csv", rows)
    contact_sheet(sheet, args.out / "contact_sheet.png")

    n = len(rows)
    ok = [r for r in rows if r["ok"]]
    print(f"segmenter {segmenter.name}: {n} frontal images ({Counter(r['view'] for r in rows)})")
    print(f"plausible masks: {len(ok)}/{n} = {len(ok) / n:.1%}; fell back to the template: {n - len(ok)}")
    for view in FRONTAL:
        sub = [r for r in rows if r["view"] == view]
        print(f"  {view:9s}: plausible {sum(r['ok'] for r in sub)}/{len(sub)}")
    print("reasons for implausible masks:")
    for check, count in Counter(r["check"] for r in rows if not r["ok"]).most_common():
        print(f"  {count:4d}  {check}")
    print("distributions over plausible masks (5th / 25th / 50th / 75th / 95th percentile):")
    for key in ("area_fraction", "balance", "left_share", "height_fraction"):
        print(f"  {key:16s} {percentiles([r[key] for r in ok])}")
    wall, cpu = np.array([t[0] for t in times]), np.array([t[1] for t in times])
    big = np.array([t[:2] for t in times if max(t[2]) >= 1000])
    print(
        f"time per image (one thread), wall: median {np.median(wall) * 1e3:.1f} ms, 95th percentile "
        f"{np.percentile(wall, 95) * 1e3:.1f} ms; CPU: median {np.median(cpu) * 1e3:.1f} ms; "
        f"images with a side >= 1000 px ({len(big)}): median wall {np.median(big[:, 0]) * 1e3:.1f} ms, "
        f"CPU {np.median(big[:, 1]) * 1e3:.1f} ms"
    )
    if boxes:
        two = np.array([b for b in boxes if len(b) == 2])
        med = np.median(two, axis=0)
        print("median lung boxes in the body box (top, bottom, left, right), image-left lung first:")
        print("  " + ", ".join("(" + ", ".join(f"{v:.2f}" for v in box) + ")" for box in med))
    atomic_write_json(
        args.out / "summary.json",
        {
            "segmenter": segmenter.name,
            "n": n,
            "plausible": len(ok),
            "median_wall_ms": float(np.median(wall) * 1e3),
            "median_cpu_ms": float(np.median(cpu) * 1e3),
        },
    )
    print(f"written: {args.out / 'lung_fields.csv'}, {args.out / 'contact_sheet.png'}")


if __name__ == "__main__":
    main()
