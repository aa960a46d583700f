"""Multi-class evaluation (paper 004): per-class PPV, recall, F1 and one-vs-rest AUC; accuracy, balanced accuracy,
geometric-mean recall and macro averages; patient-cluster bootstrap intervals; fold summaries; and the files an X-ray
evaluation writes (metrics, predictions, ROC curves, normalised confusion matrix, bias audit, t-SNE pictures).

The decision for an image is the class of highest probability (argmax; a tie goes to the class listed first). As
in :mod:`lungsight.evaluate.metrics`, every value undefined for the data at hand is ``None``, never NaN, so results
go to JSON unchanged. Definitions are in ``docs/evaluation.md`` ("Three-class X-ray evaluation"). Two classes work
too: a binary model is evaluated by the same code (probabilities of shape (n, 2), or (n,) for the second class).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, roc_auc_score

from lungsight.errors import InputError
from lungsight.evaluate.metrics import (
    _fmt,
    _tie_bounds,
    _weighted_metrics,
    check_bootstrap,
    fold_table_markdown,
    percentile_interval,
    resample_units,
    resample_weights,
    summarize_folds,
)
from lungsight.evaluate.plots import plot_confusion, plot_embedding, plot_multiclass_roc
from lungsight.fileio import atomic_write, atomic_write_csv, atomic_write_json, ensure_dir

#: Whole-model metrics, in the order paper 004's Table IV reports them (plus the macro means).
OVERALL_METRICS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "gmean_recall",
    "macro_auc",
    "macro_f1",
    "macro_ppv",
)
#: Per-class metrics (one class against the rest).
CLASS_METRICS: tuple[str, ...] = ("ppv", "recall", "f1", "auc")
DEFAULT_CI_KEYS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "gmean_recall", "macro_auc", "macro_f1")


def check_inputs(y_true: ArrayLike, probs: ArrayLike, classes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert: returns ``(y, p)`` with ``y`` class indices (n,) and ``p`` probabilities (n, k).

    ``y_true`` holds class indices into ``classes`` or the class names themselves. ``probs`` is (n, k) with one
    column per class; with two classes a 1-D array is read as the probability of ``classes[1]``. Rows need not
    sum to one (any scores work for the argmax and the AUC), but must be finite.
    """
    names = [str(c) for c in classes]
    k = len(names)
    if k < 2:
        raise ValueError(f"need at least two classes, got {names}")
    if len(set(names)) != k:
        raise ValueError(f"class names must be unique, got {names}")
    y_arr = np.asarray(y_true)
    if y_arr.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y_arr.shape}")
    if y_arr.size == 0:
        raise ValueError("y_true is empty: nothing to evaluate")
    if y_arr.dtype.kind in "biu":
        y = y_arr.astype(int)
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"y_true has class indices outside 0..{k - 1}")
    elif y_arr.dtype.kind in "UO":
        lookup = {c: i for i, c in enumerate(names)}
        unknown = sorted({str(v) for v in y_arr.tolist()} - lookup.keys())
        if unknown:
            raise ValueError(f"y_true has classes not in {names}: {', '.join(unknown[:5])}")
        y = np.array([lookup[str(v)] for v in y_arr.tolist()], dtype=int)
    else:
        raise ValueError(f"y_true must hold class indices or class names, got dtype {y_arr.dtype}")

    p = np.asarray(probs, dtype=float)
    if p.ndim == 1 and k == 2:
        p = np.column_stack([1.0 - p, p])
    if p.shape != (y.size, k):
        raise ValueError(f"probs must have shape ({y.size}, {k}) (one column per class), got {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError("probs contains NaN or infinite values")
    return y, p


def _ratio(num: float, den: float) -> float | None:
    return None if den == 0 else float(num / den)


def _mean(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _gmean(recalls: Sequence[float]) -> float | None:
    if not recalls:
        return None
    r = np.asarray(recalls, dtype=float)
    return 0.0 if (r == 0).any() else float(np.exp(np.mean(np.log(r))))


def multiclass_metrics(y_true: ArrayLike, probs: ArrayLike, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics of a k-class classifier whose decision is the argmax of ``probs``.

    Per class (one against the rest): ``ppv`` = TP / predicted, ``recall`` = TP / support,
    ``f1`` = 2 TP / (2 TP + FP + FN), ``auc`` = ROC AUC of that class's probability column (``None`` when the class
    is absent from ``y_true`` or is the only class present), ``support`` and ``predicted`` (counts).
    Overall: ``accuracy``; ``balanced_accuracy`` = arithmetic mean of the per-class recalls; ``gmean_recall`` =
    geometric mean of the per-class recalls, (r_1 · r_2 · … · r_m)^(1/m), which is 0 as soon as one class is never
    recognised; both over the m classes present in ``y_true``. ``macro_auc``, ``macro_f1`` and ``macro_ppv`` are the
    means of the per-class values that are defined. Also ``confusion`` (rows true, columns predicted, counts),
    ``classes``, ``n`` and ``error_rate``.
    """
    y, p = check_inputs(y_true, probs, classes)
    names = [str(c) for c in classes]
    n = y.size
    pred = p.argmax(axis=1)
    cm = confusion_matrix(y, pred, labels=list(range(len(names))))
    support, predicted, tp = cm.sum(axis=1), cm.sum(axis=0), np.diag(cm)

    per_class: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        fp, fn = predicted[k] - tp[k], support[k] - tp[k]
        per_class[name] = {
            "ppv": _ratio(tp[k], predicted[k]),
            "recall": _ratio(tp[k], support[k]),
            "f1": _ratio(2 * tp[k], 2 * tp[k] + fp + fn),
            "auc": float(roc_auc_score(y == k, p[:, k])) if 0 < support[k] < n else None,
            "support": int(support[k]),
            "predicted": int(predicted[k]),
        }
    recalls = [c["recall"] for c in per_class.values() if c["recall"] is not None]
    return {
        "accuracy": float(tp.sum() / n),
        "balanced_accuracy": _mean(recalls),
        "gmean_recall": _gmean(recalls),
        "macro_auc": _mean([c["auc"] for c in per_class.values()]),
        "macro_f1": _mean([c["f1"] for c in per_class.values()]),
        "macro_ppv": _mean([c["ppv"] for c in per_class.values()]),
        "error_rate": float((n - tp.sum()) / n),
        "per_class": per_class,
        "confusion": cm.tolist(),
        "classes": names,
        "n": int(n),
    }


class _Sorted(NamedTuple):
    """One class's one-vs-rest view of the rows, sorted by that class's probability (for the weighted AUC)."""

    order: np.ndarray
    is_class: np.ndarray
    predicted: np.ndarray
    tie_start: np.ndarray
    tie_end: np.ndarray


def _sorted_views(y: np.ndarray, p: np.ndarray) -> list[_Sorted]:
    pred = p.argmax(axis=1)
    views = []
    for k in range(p.shape[1]):
        order = np.argsort(p[:, k], kind="stable")
        start, end = _tie_bounds(p[order, k])
        views.append(_Sorted(order, (y == k)[order], (pred == k)[order], start, end))
    return views


def _row_nanmean(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its non-NaN entries; NaN for a row with none (without numpy's empty-slice warning)."""
    defined = ~np.isnan(values)
    count = defined.sum(axis=1)
    total = np.where(defined, values, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _weighted_multiclass(
    weights: np.ndarray, correct: np.ndarray, views: list[_Sorted]
) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """Overall and per-class metrics for many resamples at once, each given as row weights (resamples × rows).

    Per class this is :func:`lungsight.evaluate.metrics._weighted_metrics` on the one-vs-rest problem, so a
    resample's values equal :func:`multiclass_metrics` on the resampled rows. Undefined values are NaN.
    """
    per_class = []
    for v in views:
        m = _weighted_metrics(weights[:, v.order], v.is_class, v.predicted, v.tie_start, v.tie_end)
        per_class.append({"ppv": m["precision"], "recall": m["sensitivity"], "f1": m["f1"], "auc": m["auc"]})
    recall = np.column_stack([c["recall"] for c in per_class])
    with np.errstate(divide="ignore"):
        log_recall = np.log(recall)
    overall = {
        "accuracy": (weights @ correct) / weights.sum(axis=1),
        "balanced_accuracy": _row_nanmean(recall),
        "gmean_recall": np.exp(_row_nanmean(log_recall)),
        "macro_auc": _row_nanmean(np.column_stack([c["auc"] for c in per_class])),
        "macro_f1": _row_nanmean(np.column_stack([c["f1"] for c in per_class])),
        "macro_ppv": _row_nanmean(np.column_stack([c["ppv"] for c in per_class])),
    }
    return overall, per_class


def multiclass_bootstrap_ci(
    y_true: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None,
    classes: Sequence[str],
    keys: Sequence[str] = DEFAULT_CI_KEYS,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for the overall metrics ``keys`` and every per-class metric.

    As :func:`lungsight.evaluate.metrics.bootstrap_ci`: with ``groups`` (patient ids, one per image) whole patients
    are resampled and bring all their images (cluster bootstrap); without, images are. A resample where a metric
    is undefined (e.g. a class absent, so no recall or AUC for it) is skipped for that metric; balanced accuracy,
    geometric-mean recall and the macro means of a resample are taken over the classes defined in it, as in
    :func:`multiclass_metrics`. Returns ``{key: [lo, hi] or None}``, ``per_class: {class: {metric: [lo, hi] or
    None}}``, ``n_boot_used`` (same layout, resamples used), ``n_boot``, ``alpha`` and ``resample_unit``.
    """
    unknown = [k for k in keys if k not in OVERALL_METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(OVERALL_METRICS)}")
    check_bootstrap(n_boot, alpha)
    y, p = check_inputs(y_true, probs, classes)
    names = [str(c) for c in classes]
    unit_of_row, n_units = resample_units(groups, y.size)

    views = _sorted_views(y, p)
    correct = (p.argmax(axis=1) == y).astype(float)
    overall: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    per_class: list[dict[str, list[np.ndarray]]] = [{m: [] for m in CLASS_METRICS} for _ in names]
    for weights in resample_weights(unit_of_row, n_units, n_boot, seed):
        o, pc = _weighted_multiclass(weights, correct, views)
        for k in keys:
            overall[k].append(o[k])
        for store, values in zip(per_class, pc, strict=True):
            for m in CLASS_METRICS:
                store[m].append(values[m])

    result: dict[str, Any] = {}
    used: dict[str, Any] = {}
    for k in keys:
        result[k], used[k] = percentile_interval(np.concatenate(overall[k]), alpha)
    result["per_class"], used["per_class"] = {}, {}
    for name, store in zip(names, per_class, strict=True):
        pairs = {m: percentile_interval(np.concatenate(store[m]), alpha) for m in CLASS_METRICS}
        result["per_class"][name] = {m: ci for m, (ci, _) in pairs.items()}
        used["per_class"][name] = {m: u for m, (_, u) in pairs.items()}
    result["n_boot_used"] = used
    result["n_boot"] = int(n_boot)
    result["alpha"] = float(alpha)
    result["resample_unit"] = "group" if groups is not None else "row"
    return result


def summarize_multiclass_folds(per_fold: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean, sample sd (ddof=1) and count over folds of each overall and per-class metric.

    ``per_fold`` holds :func:`multiclass_metrics` results (extra numeric keys such as ``fold`` ids are summarised
    too, non-numeric ones left out). Returns :func:`lungsight.evaluate.metrics.summarize_folds`'s layout for the
    overall metrics, plus ``per_class: {class: {metric: {mean, sd, n}}}`` and ``confusion_sum`` (the folds'
    confusion matrices added up, when every fold has one of the same shape).
    """
    summary: dict[str, Any] = summarize_folds(per_fold)
    classes: list[str] = []
    for fold in per_fold:
        classes.extend(c for c in fold.get("per_class", {}) if c not in classes)
    summary["per_class"] = {
        c: summarize_folds([fold["per_class"][c] for fold in per_fold if c in fold.get("per_class", {})])
        for c in classes
    }
    matrices = [np.asarray(fold["confusion"]) for fold in per_fold if "confusion" in fold]
    if per_fold and len(matrices) == len(per_fold) and len({m.shape for m in matrices}) == 1:
        summary["confusion_sum"] = np.sum(matrices, axis=0).astype(int).tolist()
    return summary


def _mean_sd(stats: Mapping[str, Any] | None, digits: int) -> str:
    if not stats or stats["mean"] is None:
        return "–"
    if stats["sd"] is None:
        return _fmt(stats["mean"], digits)
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f}"


def multiclass_fold_table_markdown(
    per_fold: list[Mapping[str, Any]],
    metrics: Sequence[str] = ("accuracy", "balanced_accuracy", "gmean_recall", "macro_auc", "macro_f1"),
    class_metrics: Sequence[str] = CLASS_METRICS,
    *,
    digits: int = 3,
) -> str:
    """Two Markdown tables in the shape of paper 004's Table IV: overall metrics per fold with a ``mean ± sd`` row
    (:func:`lungsight.evaluate.metrics.fold_table_markdown`), then one row per class with each per-class metric as
    ``mean ± sd`` over the folds."""
    summary = summarize_multiclass_folds(per_fold)
    lines = ["| class | " + " | ".join(class_metrics) + " |", "|---|" + "---:|" * len(class_metrics)]
    for name, stats in summary["per_class"].items():
        lines.append(f"| {name} | " + " | ".join(_mean_sd(stats.get(m), digits) for m in class_metrics) + " |")
    return fold_table_markdown(per_fold, metrics, digits=digits) + "\n" + "\n".join(lines) + "\n"


def _file_key(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", key).strip("_") or "attribute"


def write_multiclass_evaluation(
    out_dir: Path,
    y_true: ArrayLike,
    probs: ArrayLike,
    classes: Sequence[str],
    groups: Sequence[str],
    *,
    attributes: Mapping[str, Sequence[Any]] | None = None,
    by: Sequence[str] = (),
    embeddings: ArrayLike | None = None,
    extra: dict[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    source_key: str = "source",
    min_n: int = 5,
    metrics_name: str = "metrics.json",
) -> dict[str, Any]:
    """Evaluate and write everything into ``out_dir``; returns the metrics dict (``metrics.json``'s content).

    ``metrics_name`` renames ``metrics.json`` (a cross-validation run writes ``cv_metrics.json``).

    Files: ``metrics.json`` (:func:`multiclass_metrics`, ``ci95`` from the patient bootstrap, ``n_patients``, a
    ``by`` entry per audited attribute, and ``extra``); ``predictions.csv`` (one row per image: index, patient,
    true and predicted class, correct, one probability column per class, every attribute, and the t-SNE
    coordinates when ``embeddings`` are given); ``roc.png`` (one-vs-rest curve per class, macro AUC);
    ``confusion.png`` (row-normalised, counts shown); per key of ``by``: ``bias_<key>.json/.md/.png``
    (:func:`lungsight.evaluate.bias.group_report`); with ``embeddings`` (n × d penultimate-layer features):
    ``tsne_class.png`` and, when ``attributes`` has ``source_key``, ``tsne_source.png`` (colour: source, marker:
    class). ``groups`` are patient ids, one per image. A ``by`` key missing from ``attributes`` raises
    :class:`lungsight.errors.InputError` before anything is written.
    """
    from lungsight.evaluate.bias import group_report, group_values, write_group_report
    from lungsight.evaluate.embedding import tsne_2d

    y, p = check_inputs(y_true, probs, classes)
    names = [str(c) for c in classes]
    n = y.size
    patients = [str(g) for g in groups]
    if len(patients) != n:
        raise ValueError(f"groups must give one patient id per image ({n}), got {len(patients)}")
    attrs = {str(k): group_values(v) for k, v in (attributes or {}).items()}
    for key, values in attrs.items():
        if len(values) != n:
            raise ValueError(f"attribute {key!r} has {len(values)} values for {n} images")
    missing = [k for k in by if k not in attrs]
    if missing:
        known = ", ".join(sorted(attrs)) or "none given"
        raise InputError(f"--by {', '.join(missing)}: no such attribute of these images (known: {known})")
    feats = None
    if embeddings is not None:
        feats = np.asarray(embeddings, dtype=float)
        if feats.ndim != 2 or feats.shape[0] != n:
            raise ValueError(f"embeddings must have shape ({n}, d), got {feats.shape}")

    out_dir = Path(out_dir)
    ensure_dir(out_dir)
    m = multiclass_metrics(y, p, names)
    ci = multiclass_bootstrap_ci(y, p, patients, names, OVERALL_METRICS, n_boot=n_boot, seed=seed)
    ci["method"] = f"percentile bootstrap, {n_boot} resamples of patients"
    m["ci95"] = ci
    m["n_patients"] = len(set(patients))

    pred = p.argmax(axis=1)
    rows: list[dict[str, Any]] = [
        {
            "index": i,
            "patient": patients[i],
            "true": names[y[i]],
            "predicted": names[pred[i]],
            "correct": int(pred[i] == y[i]),
        }
        | {f"p_{c}": float(p[i, k]) for k, c in enumerate(names)}
        | {key: values[i] for key, values in attrs.items()}
        for i in range(n)
    ]
    plot_multiclass_roc(y, p, names, out_dir / "roc.png", title="ROC, one class against the rest")
    atomic_write(
        out_dir / "confusion.png",
        lambda tmp: plot_confusion(y, pred, names, tmp, normalize=True, title="Confusion (row-normalised)"),
    )

    if by:
        m["by"] = {}
    for key in by:
        report = group_report(y, p, names, attrs[key], patients, min_n, n_boot=n_boot, seed=seed, name=key)
        write_group_report(out_dir, _file_key(key), report)
        m["by"][key] = report

    if feats is not None:
        xy = tsne_2d(feats, seed=seed)
        for row, (tx, ty) in zip(rows, xy.tolist(), strict=True):
            row["tsne_x"], row["tsne_y"] = tx, ty
        true_names = [names[i] for i in y]
        plot_embedding(xy, true_names, "t-SNE of the penultimate layer, by class", out_dir / "tsne_class.png")
        if source_key in attrs:
            plot_embedding(
                xy,
                attrs[source_key],
                f"t-SNE of the penultimate layer, by {source_key}",
                out_dir / "tsne_source.png",
                markers=true_names,
            )

    m |= extra or {}
    atomic_write_csv(out_dir / "predictions.csv", rows)
    atomic_write_json(out_dir / metrics_name, m)
    return m
