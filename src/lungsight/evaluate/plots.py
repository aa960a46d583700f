"""Evaluation pictures: ROC curves, confusion matrices and per-slice probabilities along a series.

Figures are drawn on matplotlib's ``Figure`` directly (Agg renderer, no pyplot, no display, no global state),
so they are safe to make from a server thread. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

DPI = 110
FIGSIZE = (5.0, 4.0)


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=DPI, bbox_inches="tight")
    return out


def plot_roc(
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    path: str | Path,
    title: str = "ROC curve",
) -> Path:
    """One ROC curve per entry ``name: (y_true, y_score)``, AUC in the legend, and the chance diagonal.

    An entry with only one class present cannot have a ROC curve; it is listed in the legend as ``AUC n/a``.
    """
    if not curves:
        raise ValueError("no ROC curves to plot")
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for name, (y_true, y_score) in curves.items():
        y = np.asarray(y_true).astype(int)
        s = np.asarray(y_score, dtype=float)
        if np.unique(y).size < 2:
            ax.plot([], [], label=f"{name} (AUC n/a: one class)")
            continue
        fpr, tpr, _ = roc_curve(y, s)
        auc = roc_auc_score(y, s)
        ax.plot(fpr, tpr, linewidth=1.8, label=f"{name} (AUC {auc:.3f})")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def _class_indices(y: ArrayLike, labels: Sequence[str], name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.dtype.kind in "iub":
        idx = arr.astype(int)
        if idx.size and (idx.min() < 0 or idx.max() >= len(labels)):
            raise ValueError(f"{name} has class indices outside 0..{len(labels) - 1}")
        return idx
    lookup = {str(lab): i for i, lab in enumerate(labels)}
    unknown = sorted({str(v) for v in arr.tolist()} - lookup.keys())
    if unknown:
        raise ValueError(f"{name} has classes not in labels: {', '.join(unknown[:5])}")
    return np.array([lookup[str(v)] for v in arr.tolist()], dtype=int)


def plot_confusion(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    labels: list[str],
    path: str | Path,
    normalize: bool = False,
    title: str = "Confusion matrix",
) -> Path:
    """Confusion matrix (rows: true class, columns: predicted class) with the counts in the cells.

    Classes are given as indices into ``labels`` or as the label strings. With ``normalize`` the colours show
    the row-normalised fraction (per-class recall) and each cell shows the count and its row percentage.
    """
    if not labels:
        raise ValueError("labels must name at least one class")
    t = _class_indices(y_true, labels, "y_true")
    p = _class_indices(y_pred, labels, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    k = len(labels)
    cm = confusion_matrix(t, p, labels=list(range(k)))
    row_sums = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, row_sums, out=np.zeros(cm.shape, dtype=float), where=row_sums > 0)
    shown = frac if normalize else cm.astype(float)
    vmax = 1.0 if normalize else max(float(cm.max()), 1.0)

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    for i in range(k):
        for j in range(k):
            text = f"{cm[i, j]}\n({100 * frac[i, j]:.1f}%)" if normalize else f"{cm[i, j]}"
            colour = "white" if shown[i, j] > 0.55 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=10)
    ax.set_xticks(range(k), labels=labels)
    ax.set_yticks(range(k), labels=labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True values."""
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def plot_slice_probabilities(
    probs: ArrayLike,
    selected_mask: ArrayLike,
    slice_threshold: float,
    path: str | Path,
    labels: ArrayLike | None = None,
    title: str = "Per-slice COVID-19 probability",
) -> Path:
    """Per-slice positive-class probability along the series (anatomical order) with the slice threshold.

    Selected slices are drawn in colour (red at or above the threshold); slices dropped by slice selection are
    shaded grey, with their probability as grey dots where one was computed (NaN means none). ``labels``, when
    given, are per-slice ground-truth labels (0/1); positive ones are marked by a strip under the curve.
    """
    p = np.asarray(probs, dtype=float)
    sel = np.asarray(selected_mask, dtype=bool)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be a non-empty 1-D array, got shape {p.shape}")
    if sel.shape != p.shape:
        raise ValueError(f"selected_mask must have shape {p.shape} like probs, got {sel.shape}")
    x = np.arange(p.size)
    finite = np.isfinite(p)

    fig = Figure(figsize=(max(FIGSIZE[0], min(10.0, 3.0 + p.size / 40)), FIGSIZE[1]), dpi=DPI)
    ax = fig.subplots()
    for k, (a, b) in enumerate(_runs(~sel)):
        ax.axvspan(a - 0.5, b - 0.5, color="0.88", zorder=0, label="dropped by slice selection" if k == 0 else None)
    dropped = ~sel & finite
    if dropped.any():
        ax.plot(x[dropped], p[dropped], linestyle="none", marker="o", markersize=3, color="0.55")
    kept = sel & finite
    if kept.any():
        y_line = np.where(sel, p, np.nan)
        ax.plot(x, y_line, color="tab:blue", linewidth=1.2, zorder=2)
        pos = kept & (p >= slice_threshold)
        neg = kept & ~(p >= slice_threshold)
        ax.plot(
            x[neg],
            p[neg],
            linestyle="none",
            marker="o",
            markersize=3.5,
            color="tab:blue",
            zorder=3,
            label="selected slice",
        )
        ax.plot(
            x[pos],
            p[pos],
            linestyle="none",
            marker="o",
            markersize=4,
            color="tab:red",
            zorder=3,
            label="selected, positive",
        )
    ax.axhline(
        slice_threshold,
        color="tab:red",
        linestyle="--",
        linewidth=1,
        label=f"slice threshold {slice_threshold:g}",
    )
    ymin = -0.02
    if labels is not None:
        lab = np.asarray(labels)
        if lab.shape != p.shape:
            raise ValueError(f"labels must have shape {p.shape} like probs, got {lab.shape}")
        ymin = -0.12
        for k, (a, b) in enumerate(_runs(lab.astype(bool))):
            ax.fill_between(
                [a - 0.5, b - 0.5],
                -0.10,
                -0.05,
                color="tab:orange",
                linewidth=0,
                label="labelled positive" if k == 0 else None,
            )
    ax.set_xlim(-0.5, p.size - 0.5)
    ax.set_ylim(ymin, 1.02)
    ax.set_xlabel("slice index (anatomical order)")
    ax.set_ylabel("P(COVID-19)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="x-small", frameon=False)
    return _save(fig, path)
