"""Evaluation: metrics, bootstrap confidence intervals, patient-level scoring, fold summaries and pictures."""

from lungsight.evaluate.metrics import (
    COUNTS,
    DEFAULT_TABLE_METRICS,
    METRICS,
    PatientScores,
    binary_metrics,
    bootstrap_ci,
    fold_table_markdown,
    patient_scores,
    summarize_folds,
)
from lungsight.evaluate.plots import plot_confusion, plot_roc

__all__ = [
    "COUNTS",
    "DEFAULT_TABLE_METRICS",
    "METRICS",
    "PatientScores",
    "binary_metrics",
    "bootstrap_ci",
    "fold_table_markdown",
    "patient_scores",
    "plot_confusion",
    "plot_roc",
    "summarize_folds",
]
