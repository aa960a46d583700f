"""Binary evaluation metrics, bootstrap confidence intervals, patient-level scores and fold summaries.

Every value that is undefined for the data at hand (AUC with one class present, precision with no positive
predictions, ...) is ``None``, never NaN, so results can be written to JSON as they are. Definitions are in
``docs/evaluation.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from lungsight.inference.rules import apply_rule

METRICS: tuple[str, ...] = ("auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "iou")
COUNTS: tuple[str, ...] = ("n", "n_pos", "n_neg", "tp", "fp", "tn", "fn")
DEFAULT_TABLE_METRICS: tuple[str, ...] = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "iou",
    "auc",
)

# Upper bound on resamples × rows held in memory at once by the bootstrap.
_BOOT_CHUNK_ELEMENTS = 4_000_000


def _binary_labels(y_true: ArrayLike) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty: nothing to evaluate")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must contain only 0 and 1, got values {np.unique(y)[:10].tolist()}")
    return y.astype(bool)


def _scores(y_score: ArrayLike, n: int, name: str = "y_score") -> np.ndarray:
    s = np.asarray(y_score, dtype=float)
    if s.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) like y_true, got {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return s


def _predictions(y_score: np.ndarray, threshold: float, y_pred: ArrayLike | None) -> np.ndarray:
    if y_pred is None:
        return y_score >= threshold
    pred = np.asarray(y_pred)
    if pred.shape != y_score.shape:
        raise ValueError(f"y_pred must have shape {y_score.shape} like y_true, got {pred.shape}")
    if not np.isin(pred, (0, 1)).all():
        raise ValueError("y_pred must contain only 0/1 or booleans")
    return pred.astype(bool)


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num / den)


def binary_metrics(
    y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5, *, y_pred: ArrayLike | None = None
) -> dict[str, Any]:
    """Metrics of a binary classifier, the positive class being 1.

    Predictions are ``y_score >= threshold`` unless ``y_pred`` gives the decisions directly (as for patient
    rules whose decision is not a threshold on their score); ``y_score`` is then used for the AUC only.
    Returns ``auc, accuracy, sensitivity, specificity, precision, f1, iou`` (float, or ``None`` where
    undefined) and the counts ``n, n_pos, n_neg, tp, fp, tn, fn`` (int).
    """
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    pred = _predictions(s, threshold, y_pred)
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    tn = int(np.sum(~pred & ~y))
    fn = int(np.sum(~pred & y))
    n_pos, n_neg = tp + fn, tn + fp
    auc = float(roc_auc_score(y, s)) if n_pos and n_neg else None
    return {
        "auc": auc,
        "accuracy": _ratio(tp + tn, y.size),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "n": int(y.size),
        "n_pos": n_pos,
        "n_neg": n_neg,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _tie_bounds(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each position of an ascending array: index of the first and one past the last equal value."""
    n = sorted_scores.size
    new_group = np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1]))
    group_id = np.cumsum(new_group) - 1
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)
    return starts[group_id], ends[group_id]


def _weighted_metrics(
    weights: np.ndarray, y: np.ndarray, pred: np.ndarray, tie_start: np.ndarray, tie_end: np.ndarray
) -> dict[str, np.ndarray]:
    """Metrics for many resamples at once, each given as row weights (how often each row was drawn).

    ``weights`` is (resamples × rows) with the rows sorted by ascending score; ``tie_start``/``tie_end`` bound
    each row's group of equal scores. Undefined values are NaN. AUC is the Mann-Whitney statistic with ties
    counted one half, identical to ``roc_auc_score`` on the resampled rows.
    """
    yf = y.astype(float)
    pf = pred.astype(float)
    w_pos = weights * yf
    w_neg = weights - w_pos
    tp = w_pos @ pf
    n_pos = w_pos.sum(axis=1)
    fp = w_neg @ pf
    n_neg = w_neg.sum(axis=1)
    fn = n_pos - tp
    tn = n_neg - fp

    cum_neg = np.concatenate((np.zeros((weights.shape[0], 1)), np.cumsum(w_neg, axis=1)), axis=1)
    neg_below = cum_neg[:, tie_start]
    neg_tied = cum_neg[:, tie_end] - neg_below
    auc_num = np.sum(w_pos * (neg_below + 0.5 * neg_tied), axis=1)

    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "auc": auc_num / (n_pos * n_neg),
            "accuracy": (tp + tn) / (n_pos + n_neg),
            "sensitivity": tp / n_pos,
            "specificity": tn / n_neg,
            "precision": tp / (tp + fp),
            "f1": 2 * tp / (2 * tp + fp + fn),
            "iou": tp / (tp + fp + fn),
        }
    for values in out.values():
        values[~np.isfinite(values)] = np.nan
    return out


def check_bootstrap(n_boot: int, alpha: float) -> None:
    """Refuse a bootstrap of no resample or an interval level outside (0, 1)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def resample_units(groups: ArrayLike | None, n: int) -> tuple[np.ndarray, int]:
    """(unit of each of the ``n`` rows, number of units): a bootstrap resamples whole groups (patients) when
    ``groups`` (one id per row) is given, else single rows."""
    if groups is None:
        return np.arange(n), n
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups must have shape ({n},) like y_true, got {g.shape}")
    _, unit_of_row = np.unique(g, return_inverse=True)
    return unit_of_row, int(unit_of_row.max()) + 1


def resample_weights(unit_of_row: np.ndarray, n_units: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The bootstrap's resamples as row weights, in chunks of shape ``(k, rows)``: each resample draws
    ``n_units`` units with replacement, and every row weighs as often as its unit was drawn (a unit drawn twice
    brings all its rows twice). Chunks keep the weight matrices near ``_BOOT_CHUNK_ELEMENTS`` values."""
    rng = np.random.default_rng(seed)
    unit_p = np.full(n_units, 1.0 / n_units)
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // max(unit_of_row.size, n_units))
    for start in range(0, n_boot, chunk):
        size = min(chunk, n_boot - start)
        yield rng.multinomial(n_units, unit_p, size=size).astype(float)[:, unit_of_row]


def percentile_interval(values: np.ndarray, alpha: float) -> tuple[list[float] | None, int]:
    """The ``1 - alpha`` percentile interval of a bootstrap's values, NaN (undefined) resamples left out, and how
    many resamples it used; ``None`` when none was defined."""
    v = values[~np.isnan(values)]
    if not v.size:
        return None, 0
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return [float(lo), float(hi)], int(v.size)


def bootstrap_ci(
    y_true: ArrayLike,
    y_score: ArrayLike,
    groups: ArrayLike | None = None,
    *,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    y_pred: ArrayLike | None = None,
) -> dict[str, Any]:
    """Percentile bootstrap confidence intervals for every metric of :func:`binary_metrics`.

    Rows are resampled with replacement; when ``groups`` (e.g. patient ids, one per row) is given, whole
    groups are resampled instead and each drawn group brings all its rows (cluster bootstrap). Resamples where
    a metric is undefined are skipped for that metric. Returns ``{metric: [lo, hi] or None}`` for each metric,
    plus ``n_boot_used`` (``{metric: resamples used}``), ``n_boot``, ``alpha`` and ``resample_unit``
    (``"group"`` or ``"row"``).
    """
    check_bootstrap(n_boot, alpha)
    y = _binary_labels(y_true)
    s = _scores(y_score, y.size)
    pred = _predictions(s, threshold, y_pred)
    unit_of_row, n_units = resample_units(groups, y.size)

    order = np.argsort(s, kind="stable")
    y, pred, unit_of_row = y[order], pred[order], unit_of_row[order]
    tie_start, tie_end = _tie_bounds(s[order])

    collected: dict[str, list[np.ndarray]] = {m: [] for m in METRICS}
    for weights in resample_weights(unit_of_row, n_units, n_boot, seed):
        values = _weighted_metrics(weights, y, pred, tie_start, tie_end)
        for m in METRICS:
            collected[m].append(values[m])

    result: dict[str, Any] = {}
    used: dict[str, int] = {}
    for m in METRICS:
        result[m], used[m] = percentile_interval(np.concatenate(collected[m]), alpha)
    result["n_boot_used"] = used
    result["n_boot"] = int(n_boot)
    result["alpha"] = float(alpha)
    result["resample_unit"] = "group" if groups is not None else "row"
    return result


class PatientScores(NamedTuple):
    """Per-patient arrays, in order of each patient's first row."""

    patient_ids: np.ndarray
    y_true: np.ndarray
    score: np.ndarray
    decision: np.ndarray


def group_resamples(groups: ArrayLike, n_boot: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Row indices of ``n_boot`` cluster-bootstrap resamples: as many groups (patients) as there are, drawn with
    replacement, each bringing all its rows. For statistics that need the rows themselves (ECE, an ensemble's
    gain); :func:`bootstrap_ci` weights rows instead, which is faster for the confusion-matrix metrics."""
    g = np.asarray(groups)
    unit_of_row, n_units = resample_units(g, len(g))
    rows_of = [np.flatnonzero(unit_of_row == u) for u in range(n_units)]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.concatenate([rows_of[g] for g in rng.integers(0, len(rows_of), len(rows_of))])


def _columns(slice_table: Any) -> tuple[Sequence[Any], Sequence[Any], Sequence[Any]]:
    keys = ("patient_id", "label", "prob")
    if isinstance(slice_table, Mapping) or hasattr(slice_table, "columns"):
        missing = [k for k in keys if k not in slice_table]
        if missing:
            raise ValueError(f"slice table lacks column(s) {', '.join(missing)}; needs {', '.join(keys)}")
        return list(slice_table["patient_id"]), list(slice_table["label"]), list(slice_table["prob"])
    rows = list(slice_table)
    if any(len(r) != 3 for r in rows):
        raise ValueError("slice table rows must be (patient_id, label, prob)")
    if not rows:
        return [], [], []
    pids, labels, probs = zip(*rows, strict=True)
    return pids, labels, probs


def patient_scores(
    slice_table: Iterable[tuple[Any, int, float]] | Mapping[str, Sequence[Any]], rule: str, **kw: Any
) -> PatientScores:
    """Group slice rows by patient and apply a slice → patient rule to each patient.

    ``slice_table`` is either rows ``(patient_id, label, prob)`` or a mapping of the columns ``"patient_id"``,
    ``"label"`` and ``"prob"``, each patient's rows in slice (anatomical) order. A patient's label is the
    maximum of its slice labels. Keyword settings go to :func:`lungsight.inference.rules.apply_rule`.
    Returns ``PatientScores(patient_ids, y_true, score, decision)``.
    """
    pids, labels, probs = _columns(slice_table)
    if len(pids) == 0:
        raise ValueError("slice table is empty: no patients to score")
    by_patient: dict[Any, tuple[list[int], list[float]]] = {}
    for pid, label, prob in zip(pids, labels, probs, strict=True):
        if label not in (0, 1):
            raise ValueError(f"slice labels must be 0 or 1, got {label!r}")
        entry = by_patient.setdefault(pid, ([], []))
        entry[0].append(int(label))
        entry[1].append(float(prob))

    ids, y_true, score, decision = [], [], [], []
    for pid, (pl, pp) in by_patient.items():
        res = apply_rule(pp, rule, **kw)
        ids.append(pid)
        y_true.append(max(pl))
        score.append(res.score)
        decision.append(res.positive)
    return PatientScores(
        patient_ids=np.asarray(ids),
        y_true=np.asarray(y_true, dtype=int),
        score=np.asarray(score, dtype=float),
        decision=np.asarray(decision, dtype=bool),
    )


def _is_real(v: Any) -> bool:
    return isinstance(v, Real | np.number) and not isinstance(v, bool | np.bool_)


def summarize_folds(per_fold: list[Mapping[str, float | None]]) -> dict[str, dict[str, float | int | None]]:
    """Mean, sample standard deviation (ddof=1) and count of each numeric metric over folds.

    ``None`` (and NaN) values are ignored; ``sd`` is ``None`` with fewer than two values, ``mean`` with none.
    Keys holding anything other than numbers or ``None`` (e.g. a fold name) are left out.
    """
    keys: list[str] = []
    for fold in per_fold:
        keys.extend(k for k in fold if k not in keys)
    summary: dict[str, dict[str, float | int | None]] = {}
    for k in keys:
        present = [fold[k] for fold in per_fold if k in fold]
        if any(v is not None and not _is_real(v) for v in present):
            continue
        vals = np.array([float(v) for v in present if v is not None], dtype=float)
        vals = vals[~np.isnan(vals)]
        summary[k] = {
            "mean": float(vals.mean()) if vals.size else None,
            "sd": float(vals.std(ddof=1)) if vals.size >= 2 else None,
            "n": int(vals.size),
        }
    return summary


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, int | np.integer) and not isinstance(v, bool):
        return str(int(v))
    return f"{float(v):.{digits}f}"


def fold_table_markdown(
    per_fold: list[Mapping[str, float | None]],
    metrics: Sequence[str] = DEFAULT_TABLE_METRICS,
    *,
    digits: int = 3,
) -> str:
    """A Markdown table with one row per fold and a final ``mean ± sd`` row.

    A fold's row is labelled by its ``"fold"`` entry when it has one, else by its position (1, 2, ...).
    Missing or undefined values show as ``–``.
    """
    summary = summarize_folds(per_fold)
    lines = ["| fold | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for i, fold in enumerate(per_fold, start=1):
        label = fold.get("fold", i)
        lines.append(f"| {label} | " + " | ".join(_fmt(fold.get(m), digits) for m in metrics) + " |")
    cells = []
    for m in metrics:
        st = summary.get(m, {"mean": None, "sd": None})
        if st["mean"] is None:
            cells.append("–")
        elif st["sd"] is None:
            cells.append(f"{st['mean']:.{digits}f}")
        else:
            cells.append(f"{st['mean']:.{digits}f} ± {st['sd']:.{digits}f}")
    lines.append("| mean ± sd | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
