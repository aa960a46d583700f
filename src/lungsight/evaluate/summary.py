"""From per-slice probabilities to the evaluation a paper reports: slice and patient metrics under every rule,
patient-bootstrap 95 % confidence intervals, ROC curves and confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungsight.evaluate.metrics import binary_metrics, bootstrap_ci, patient_scores
from lungsight.evaluate.plots import plot_confusion, plot_roc
from lungsight.fileio import atomic_write_json
from lungsight.inference.rules import RULES

HEADLINE = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "iou")


def _headline(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in HEADLINE} | {k: m[k] for k in ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")}


def slice_and_patient_metrics(
    patient_ids: Sequence[str],
    y: Sequence[int],
    p: Sequence[float],
    *,
    rule: str = "threshold-10",
    slice_threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    rule_kw: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of slice probabilities ``p`` (positive class) with labels ``y`` (0/1), rows in slice order per
    patient. ``patient`` is reported for ``rule``; ``patient_rules`` holds every rule."""
    kw = {"slice_threshold": slice_threshold} | (rule_kw or {})
    pids, y_arr, p_arr = np.asarray(patient_ids), np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    table = {"patient_id": list(pids), "label": list(y_arr), "prob": list(p_arr)}
    out: dict[str, Any] = {"slice": _headline(binary_metrics(y_arr, p_arr, slice_threshold))}
    ci_slice = bootstrap_ci(y_arr, p_arr, pids, threshold=slice_threshold, n_boot=n_boot, seed=seed)
    rules: dict[str, Any] = {}
    ci_patient: dict[str, Any] = {}
    for r in RULES:
        ps = patient_scores(table, r, **kw)
        rules[r] = _headline(binary_metrics(ps.y_true, ps.score, y_pred=ps.decision.astype(int)))
        if r == rule:
            ci_patient = bootstrap_ci(ps.y_true, ps.score, n_boot=n_boot, seed=seed, y_pred=ps.decision.astype(int))
    out["patient"] = rules[rule]
    out["patient_rule"] = rule
    out["patient_rules"] = rules
    out["ci95"] = {
        "slice": {k: ci_slice[k] for k in HEADLINE},
        "patient": {k: ci_patient[k] for k in HEADLINE},
        "method": f"percentile bootstrap, {n_boot} resamples of patients",
    }
    out["n_patients"] = len(set(pids.tolist()))
    return out


def write_evaluation(
    out_dir: Path,
    patient_ids: Sequence[str],
    y: Sequence[int],
    p: Sequence[float],
    classes: list[str],
    *,
    rule: str = "threshold-10",
    slice_threshold: float = 0.5,
    extra: dict[str, Any] | None = None,
    n_boot: int = 1000,
) -> dict[str, Any]:
    """Compute :func:`slice_and_patient_metrics` and write ``metrics.json``, ``roc.png`` and ``confusion.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    m = slice_and_patient_metrics(patient_ids, y, p, rule=rule, slice_threshold=slice_threshold, n_boot=n_boot)
    m |= extra or {}
    y_arr, p_arr = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    table = {"patient_id": list(patient_ids), "label": list(y_arr), "prob": list(p_arr)}
    curves = {"slice": (y_arr, p_arr)}
    for r in RULES:
        ps = patient_scores(table, r, slice_threshold=slice_threshold)
        curves[f"patient ({r})"] = (ps.y_true, ps.score)
    plot_roc(curves, out_dir / "roc.png", title="ROC: slice and patient level")
    plot_confusion(
        y_arr,
        (p_arr >= slice_threshold).astype(int),
        classes,
        out_dir / "confusion.png",
        title=f"Slices (threshold {slice_threshold})",
    )
    ps = patient_scores(table, rule, slice_threshold=slice_threshold)
    plot_confusion(
        ps.y_true,
        ps.decision.astype(int),
        classes,
        out_dir / "confusion_patient.png",
        title=f"Patients ({rule})",
    )
    atomic_write_json(out_dir / "metrics.json", m)
    return m
