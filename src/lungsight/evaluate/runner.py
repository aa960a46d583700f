"""``lungsight evaluate``: run a model over a labelled folder and write the evaluation."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from lungsight.errors import InputError
from lungsight.evaluate.summary import write_evaluation
from lungsight.fileio import atomic_write_csv
from lungsight.inference.detector import Detector
from lungsight.train.data import Item, load_unit, read_labels


def check_labels(items: list[Item], classes: list[str], csv_path: Path) -> None:
    """Every label must be one of the model's classes: a label it does not know (a typo, another spelling such
    as ``COVID``) would otherwise count silently as negative."""
    unknown = Counter(it.label for it in items if it.label not in classes)
    if unknown:
        found = ", ".join(f"{label!r} ({n} row{'s' * (n > 1)})" for label, n in unknown.most_common(5))
        raise InputError(
            f"{csv_path}: label(s) {found} not among the model's classes ({', '.join(classes)}); labels are "
            "compared exactly, case included"
        )


def training_data_warnings(items: list[Item], data: Path, training: dict[str, Any] | None) -> list[str]:
    """A warning when the images look like the model's own training data (the folder it was trained on, by path
    or by name, or images inside it): metrics on them measure fit, not how the model does on new patients."""
    source = (training or {}).get("data")
    if not source or int((training or {}).get("folds", 0) or 0) != 0:  # only a final fit has seen every image
        return []
    sources = [Path(s) for s in ([source] if isinstance(source, str) else source)]
    trained = {p.resolve() for p in sources}
    names = {p.name for p in sources}
    inside = sum(any(root in it.path.resolve().parents for root in trained) for it in items)
    here = data.resolve()
    if here in trained or here.name in names or inside:
        return [
            f"this model was trained on {', '.join(map(str, sources))} (its config's training data), and these "
            f"images come from it or share its name ({inside} of {len(items)} resolve inside it): the metrics "
            "measure how well it fits its own training data, not how it does on new patients; its "
            "cross-validation figures (model card) are the honest estimate"
        ]
    return []


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
    check_labels(items, det.classes, Path(data) / "labels.csv")
    positive = det.classes[det.positive]
    warnings = training_data_warnings(items, Path(data), det.config.get("training"))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
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
            "warnings": warnings,
        },
    )
