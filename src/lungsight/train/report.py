"""The cross-validation summary of a training run: pooled out-of-fold metrics and a per-fold table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_curve

from lungsight.evaluate.metrics import METRICS, fold_table_markdown, summarize_folds
from lungsight.evaluate.summary import slice_and_patient_metrics, write_evaluation
from lungsight.fileio import atomic_write_csv, atomic_write_json, atomic_write_text


def write_cv_report(out: Path, rows: list[dict[str, Any]], classes: list[str], cfg: Any) -> dict[str, Any]:
    """Write cv_predictions.csv, cv_metrics.json, cv_table.md, roc.png and confusion.png into ``out``."""
    atomic_write_csv(out / "cv_predictions.csv", rows)
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
        per_fold_slice.append({"fold": k} | {h: m["slice"][h] for h in METRICS})
        per_fold_patient.append({"fold": k} | {h: m["patient"][h] for h in METRICS})
        atomic_write_json(out / f"fold_{k}" / "metrics.json", m)
    y_all = np.array([int(r["label"] == positive) for r in rows])
    p_all = np.array([float(r["p"]) for r in rows])
    operating = youden_operating_point(y_all, p_all)
    pooled = write_evaluation(
        out,
        [r["patient_id"] for r in rows],
        y_all,
        p_all,
        classes,
        metrics_name="cv_metrics.json",
        extra={
            "per_fold": {"slice": per_fold_slice, "patient": per_fold_patient},
            "mean_sd": {
                "slice": summarize_folds(per_fold_slice),
                "patient": summarize_folds(per_fold_patient),
            },
            "operating_point": operating,
            "model": cfg.model,
            "command": cfg.command,
        },
    )
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
    if operating:
        print(
            f"suggested operating threshold (Youden's J, out of fold): {operating['threshold']:.3f} "
            f"(sensitivity {operating['sensitivity']:.3f}, specificity {operating['specificity']:.3f}); "
            "pass it to the final fit with --slice-threshold",
            flush=True,
        )
    return pooled


def youden_operating_point(y: np.ndarray, p: np.ndarray) -> dict[str, float] | None:
    """The threshold maximising sensitivity + specificity - 1 on out-of-fold predictions (selected on the same
    predictions, so the sensitivity/specificity it reports are optimistic)."""
    if len(set(y.tolist())) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(y, p)
    k = int(np.argmax(tpr - fpr))
    return {
        "threshold": float(min(thresholds[k], 1.0)),
        "sensitivity": float(tpr[k]),
        "specificity": float(1 - fpr[k]),
        "method": "Youden's J on pooled out-of-fold slice probabilities",
    }
