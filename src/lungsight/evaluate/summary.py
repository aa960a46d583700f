"""From per-slice probabilities to the evaluation a paper reports: slice and patient metrics under every rule,
patient-bootstrap 95 % confidence intervals, ROC curves and confusion matrices."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lungsight.evaluate.metrics import METRICS, PatientScores, binary_metrics, bootstrap_ci, patient_scores
from lungsight.evaluate.plots import plot_confusion, plot_roc
from lungsight.fileio import atomic_write_json, ensure_dir
from lungsight.inference.rules import RULES


def _evaluate(
    patient_ids: Sequence[str],
    y: Sequence[int],
    p: Sequence[float],
    rule: str,
    rule_kw: dict[str, Any],
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, PatientScores]]:
    """The metrics dict and, per rule, the patient scores it was computed from (reused for the pictures)."""
    threshold = rule_kw["slice_threshold"]
    pids, y_arr, p_arr = np.asarray(patient_ids), np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    table = {"patient_id": list(pids), "label": list(y_arr), "prob": list(p_arr)}
    scores = {r: patient_scores(table, r, **rule_kw) for r in RULES}
    rules = {r: binary_metrics(s.y_true, s.score, y_pred=s.decision.astype(int)) for r, s in scores.items()}
    chosen = scores[rule]
    ci_slice = bootstrap_ci(y_arr, p_arr, pids, threshold=threshold, n_boot=n_boot, seed=seed)
    ci_patient = bootstrap_ci(chosen.y_true, chosen.score, n_boot=n_boot, seed=seed, y_pred=chosen.decision.astype(int))
    metrics = {
        "slice": binary_metrics(y_arr, p_arr, threshold),
        "patient": rules[rule],
        "patient_rule": rule,
        "patient_rules": rules,
        "ci95": {
            "slice": {k: ci_slice[k] for k in METRICS},
            "patient": {k: ci_patient[k] for k in METRICS},
            "method": f"percentile bootstrap, {n_boot} resamples of patients",
        },
        "n_patients": len(set(pids.tolist())),
    }
    return metrics, scores


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
    return _evaluate(patient_ids, y, p, rule, kw, n_boot, seed)[0]


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
    metrics_name: str = "metrics.json",
) -> dict[str, Any]:
    """Compute :func:`slice_and_patient_metrics` and write ``metrics_name``, ``roc.png``, ``confusion.png`` and
    ``confusion_patient.png`` into ``out_dir``."""
    out_dir = Path(out_dir)
    ensure_dir(out_dir)
    kw = {"slice_threshold": slice_threshold}
    m, scores = _evaluate(patient_ids, y, p, rule, kw, n_boot, seed=0)
    m |= extra or {}
    y_arr, p_arr = np.asarray(y, dtype=int), np.asarray(p, dtype=float)
    curves = {"slice": (y_arr, p_arr)} | {f"patient ({r})": (s.y_true, s.score) for r, s in scores.items()}
    plot_roc(curves, out_dir / "roc.png", title="ROC: slice and patient level")
    plot_confusion(
        y_arr,
        (p_arr >= slice_threshold).astype(int),
        classes,
        out_dir / "confusion.png",
        title=f"Slices (threshold {slice_threshold})",
    )
    plot_confusion(
        scores[rule].y_true,
        scores[rule].decision.astype(int),
        classes,
        out_dir / "confusion_patient.png",
        title=f"Patients ({rule})",
    )
    atomic_write_json(out_dir / metrics_name, m)
    return m
