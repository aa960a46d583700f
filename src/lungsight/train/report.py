"""The cross-validation summary of a training run: pooled out-of-fold metrics and a per-fold table."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from lungsight.evaluate.metrics import fold_table_markdown, summarize_folds
from lungsight.evaluate.summary import HEADLINE, slice_and_patient_metrics, write_evaluation
from lungsight.models.weights import atomic_write_text


def write_cv_report(out: Path, rows: list[dict[str, Any]], classes: list[str], cfg: Any) -> dict[str, Any]:
    """Write cv_predictions.csv, cv_metrics.json, cv_table.md, roc.png and confusion.png into ``out``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "cv_predictions.csv", buf.getvalue())
    positive = classes[-1]
    per_fold_slice, per_fold_patient = [], []
    folds = sorted({int(r["fold"]) for r in rows})
    for k in folds:
        fr = [r for r in rows if int(r["fold"]) == k]
        m = slice_and_patient_metrics(
            [r["patient_id"] for r in fr],
            [int(r["label"] == positive) for r in fr],
            [float(r["p"]) for r in fr],
            n_boot=200,
        )
        per_fold_slice.append({"fold": k} | {h: m["slice"][h] for h in HEADLINE})
        per_fold_patient.append({"fold": k} | {h: m["patient"][h] for h in HEADLINE})
        atomic_write_text(out / f"fold_{k}" / "metrics.json", json.dumps(m, indent=2, default=float))
    pooled = write_evaluation(
        out,
        [r["patient_id"] for r in rows],
        [int(r["label"] == positive) for r in rows],
        [float(r["p"]) for r in rows],
        classes,
        extra={
            "per_fold": {"slice": per_fold_slice, "patient": per_fold_patient},
            "mean_sd": {
                "slice": summarize_folds(per_fold_slice),
                "patient": summarize_folds(per_fold_patient),
            },
            "model": cfg.model,
            "command": cfg.command,
        },
    )
    (out / "metrics.json").replace(out / "cv_metrics.json")
    table = (
        f"# Cross-validation: {cfg.model}\n\nCommand: `{cfg.command}`\n\n## Slice level\n\n"
        f"{fold_table_markdown(per_fold_slice)}\n\n## Patient level (threshold-10)\n\n"
        f"{fold_table_markdown(per_fold_patient)}\n"
    )
    atomic_write_text(out / "cv_table.md", table)
    ms = pooled["mean_sd"]["slice"]
    print(
        f"CV slice AUC {ms['auc']['mean']:.3f} ± {ms['auc']['sd']:.3f} over {len(folds)} folds; "
        f"pooled out-of-fold slice AUC {pooled['slice']['auc']:.3f}; tables in {out / 'cv_table.md'}",
        flush=True,
    )
    return pooled
