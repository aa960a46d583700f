"""``lungsight evaluate``: run a model over a labelled folder and write the evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from lungsight.evaluate.summary import write_evaluation
from lungsight.fileio import atomic_write_csv
from lungsight.inference.detector import Detector
from lungsight.train.data import load_unit, read_labels


def evaluate_folder(
    data: Path,
    model: str | Path,
    out: Path,
    *,
    rule: str | None = None,
    batch_size: int = 16,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Predict every image listed in ``data/labels.csv`` and write metrics.json, predictions.csv, roc.png,
    confusion.png and confusion_patient.png into ``out``."""
    det = Detector.from_pretrained(model)
    items = read_labels(Path(data))
    positive = det.classes[det.positive]
    probs = []
    for i in tqdm(range(0, len(items), batch_size), desc="evaluate", unit="batch", disable=None):
        chunk = items[i : i + batch_size]
        probs.extend(det.image_probabilities([load_unit(it.path) for it in chunk], batch_size)[:, det.positive])
    rows = [
        {"file": str(it.path), "patient_id": it.patient_id, "label": it.label, "p": float(p)}
        for it, p in zip(items, probs, strict=True)
    ]
    out = Path(out)
    atomic_write_csv(out / "predictions.csv", rows)
    return write_evaluation(
        out,
        [r["patient_id"] for r in rows],
        [int(r["label"] == positive) for r in rows],
        probs,
        det.classes,
        rule=rule or det.config.get("default_rule", "threshold-10"),
        slice_threshold=det.config.get("slice_threshold", 0.5),
        n_boot=n_boot,
        extra={
            "model": {
                "name": det.entry.name if det.entry else None,
                "sha256": det.entry.sha256 if det.entry else None,
            },
            "data": str(data),
            "n_images": len(rows),
        },
    )
