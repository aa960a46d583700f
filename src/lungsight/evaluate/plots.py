"""Evaluation pictures: ROC curves, confusion matrices, and for the three-class X-ray evaluation one-vs-rest ROC
curves, the bias audit chart and embedding scatter plots. (The per-prediction slice-probability chart is SVG:
:mod:`lungsight.report.svg`.)

Figures are drawn on matplotlib's ``Figure`` directly (Agg renderer, no pyplot, no display, no global state),
so they are safe to make from a server thread. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from numpy.typing import ArrayLike
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from lungsight.fileio import atomic_write

DPI = 110
FIGSIZE = (5.0, 4.0)


def _save(fig: Figure, path: str | Path, tight: bool = True) -> Path:
    """Write the PNG through :func:`lungsight.fileio.atomic_write` (temporary file, then rename).

    ``tight`` crops the figure to what is drawn, which costs a second rendering; a figure whose margins are set
    by hand passes ``False``.
    """
    bbox = "tight" if tight else None
    return atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches=bbox))


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


def plot_multiclass_roc(
    y_true: ArrayLike,
    probs: ArrayLike,
    classes: Sequence[str],
    path: str | Path,
    title: str = "ROC, one class against the rest",
) -> Path:
    """One-vs-rest ROC curve of each class (its probability column against membership) with its AUC, the vertical
    mean of those curves, and the macro AUC (mean of the per-class AUCs) in the legend.

    ``y_true`` holds class indices into ``classes``; ``probs`` is (n, k). A class absent from ``y_true`` (or the
    only one present) has no curve and is listed as ``AUC n/a``.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.shape != (y.size, len(classes)):
        raise ValueError(f"probs must have shape ({y.size}, {len(classes)}), got {p.shape}")
    grid = np.linspace(0.0, 1.0, 201)
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    tprs, aucs = [], []
    for k, name in enumerate(classes):
        member = y == k
        if member.all() or not member.any():
            ax.plot([], [], label=f"{name} (AUC n/a: absent)" if not member.any() else f"{name} (AUC n/a: only class)")
            continue
        fpr, tpr, _ = roc_curve(member, p[:, k])
        aucs.append(roc_auc_score(member, p[:, k]))
        tprs.append(np.interp(grid, fpr, tpr))
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name} (AUC {aucs[-1]:.3f})")
    if tprs:
        mean_tpr = np.mean(tprs, axis=0)
        mean_tpr[0] = 0.0
        label = f"mean; macro AUC {np.mean(aucs):.3f}"
        ax.plot(grid, mean_tpr, color="black", linewidth=2.2, linestyle=":", label=label)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return _save(fig, path)


def plot_group_metrics(
    values: Sequence[str],
    n: Sequence[int],
    error_rate: Sequence[float],
    error_ci: Sequence[Sequence[float] | None],
    recall: Mapping[str, Sequence[float | None]],
    path: str | Path,
    *,
    too_few: Sequence[bool] | None = None,
    title: str = "Errors by group",
) -> Path:
    """Bias audit picture: left, the error rate of each group with its 95 % interval (whiskers) and n; right, the
    recall of each class within each group ("n/a" where the class is absent from the group).

    Groups flagged in ``too_few`` are drawn hatched and pale: reported, but too few to compare.
    """
    g = len(values)
    if not g or not (len(n) == len(error_rate) == len(error_ci) == g):
        raise ValueError("values, n, error_rate and error_ci must have the same, non-zero length")
    few = list(too_few) if too_few is not None else [False] * g
    x = np.arange(g)
    ticks = [f"{v}\n(n={k})" for v, k in zip(values, n, strict=True)]
    fig = Figure(figsize=(max(8.0, 2.0 + 1.4 * g), 4.0), dpi=DPI)
    ax_err, ax_rec = fig.subplots(1, 2)
    for i in range(g):
        ax_err.bar(
            x[i],
            error_rate[i],
            color="tab:red",
            alpha=0.35 if few[i] else 0.8,
            hatch="//" if few[i] else None,
            edgecolor="tab:red",
        )
        ci = error_ci[i]
        if ci is not None:
            ax_err.errorbar(
                x[i],
                error_rate[i],
                yerr=[[error_rate[i] - ci[0]], [ci[1] - error_rate[i]]],
                color="black",
                capsize=4,
                linewidth=1,
            )
    ax_err.set_xticks(x, labels=ticks, fontsize="small")
    ax_err.set_ylim(0, 1.02)
    ax_err.set_ylabel("error rate")
    ax_err.set_title("error rate (95 % CI)" + ("; hatched: too few" if any(few) else ""), fontsize="medium")
    ax_err.grid(axis="y", alpha=0.3)

    width = 0.8 / max(len(recall), 1)
    for j, (cls, vals) in enumerate(recall.items()):
        pos = x - 0.4 + width * (j + 0.5)
        ax_rec.bar(pos, [np.nan if v is None else v for v in vals], width, label=cls)
        for xi, v in zip(pos, vals, strict=True):
            if v is None:  # class absent from the group, told apart from a recall of 0
                ax_rec.text(xi, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="0.4")
    ax_rec.set_xticks(x, labels=ticks, fontsize="small")
    ax_rec.set_ylim(0, 1.02)
    ax_rec.set_ylabel("recall")
    ax_rec.set_title("recall per class", fontsize="medium")
    ax_rec.grid(axis="y", alpha=0.3)
    ax_rec.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title)
    return _save(fig, path)


_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")


def plot_embedding(
    xy: ArrayLike,
    labels: Sequence[str],
    title: str,
    path: str | Path,
    *,
    markers: Sequence[str] | None = None,
) -> Path:
    """Scatter of a 2-D embedding (e.g. t-SNE), one colour per label with a legend; labels in order of first
    appearance. ``markers``, when given, is a second label per point drawn as the marker shape (e.g. colour by
    source dataset, shape by class)."""
    pts = np.asarray(xy, dtype=float)
    labs = [str(v) for v in labels]
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"xy must have shape (n, 2) with n > 0, got {pts.shape}")
    if len(labs) != pts.shape[0]:
        raise ValueError(f"labels has {len(labs)} entries for {pts.shape[0]} points")
    shapes = [str(v) for v in markers] if markers is not None else [""] * len(labs)
    if len(shapes) != len(labs):
        raise ValueError(f"markers has {len(shapes)} entries for {len(labs)} points")
    colour_keys = list(dict.fromkeys(labs))
    shape_keys = list(dict.fromkeys(shapes))
    palette = matplotlib.colormaps["tab10" if len(colour_keys) <= 10 else "tab20"]
    colour_of = {k: palette(i % palette.N) for i, k in enumerate(colour_keys)}
    marker_of = {k: _MARKERS[i % len(_MARKERS)] for i, k in enumerate(shape_keys)}
    lab_arr, shape_arr = np.asarray(labs, dtype=object), np.asarray(shapes, dtype=object)

    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    size = 22 if pts.shape[0] <= 500 else 8
    for c in colour_keys:
        for s in shape_keys:
            sel = (lab_arr == c) & (shape_arr == s)
            if sel.any():
                ax.scatter(pts[sel, 0], pts[sel, 1], s=size, color=colour_of[c], marker=marker_of[s], alpha=0.8)
    handles = [Line2D([], [], linestyle="none", marker="o", color=colour_of[c], label=c) for c in colour_keys]
    if markers is not None:
        handles += [Line2D([], [], linestyle="none", marker=marker_of[s], color="0.3", label=s) for s in shape_keys]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    return _save(fig, path)


# ---------------------------------------------------------------- calibration and ensemble uncertainty pictures


def plot_reliability(
    tables: Mapping[str, Mapping[str, Sequence[float | int | None]]],
    path: str | Path,
    title: str = "Reliability diagram",
) -> Path:
    """Reliability diagram: per entry ``name: table`` (``edges``, ``count``, ``confidence``, ``accuracy`` as made by
    :func:`lungsight.evaluate.calibration.reliability`) the accuracy against the mean confidence of each non-empty
    bin, the diagonal of perfect calibration, and below it the number of cases per bin."""
    if not tables:
        raise ValueError("no reliability tables to plot")
    fig = Figure(figsize=(5.0, 5.6), dpi=DPI)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    for j, (name, t) in enumerate(tables.items()):
        edges = np.asarray(t["edges"], dtype=float)
        width = float(np.diff(edges).min()) / (len(tables) + 1)
        keep = [i for i, c in enumerate(t["count"]) if c]
        conf = [t["confidence"][i] for i in keep]
        acc = [t["accuracy"][i] for i in keep]
        ax.plot(conf, acc, marker="o", linewidth=1.6, label=name)
        ax_n.bar(edges[:-1] + (j + 0.5) * width, t["count"], width=width, align="edge", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.01, 1.01)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize="small")
    ax_n.set_xlabel("mean confidence in bin")
    ax_n.set_ylabel("cases")
    ax_n.grid(alpha=0.3)
    return _save(fig, path)


def plot_uncertainty(
    uncertainty: ArrayLike,
    error: ArrayLike,
    path: str | Path,
    label: str = "uncertainty",
    title: str = "Uncertainty on correct and wrong predictions",
) -> Path:
    """Histograms of an uncertainty measure for the correct and the wrong predictions (``error`` is boolean), each
    normalised to its own count so that the two shapes can be compared."""
    u = np.asarray(uncertainty, dtype=float)
    e = np.asarray(error).astype(bool)
    if u.shape != e.shape or not u.size:
        raise ValueError("uncertainty and error must have the same, non-zero length")
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    ax = fig.subplots()
    bins = np.linspace(0.0, max(float(u.max()), 1e-6), 21)
    for mask, name, colour in ((~e, "correct", "tab:blue"), (e, "wrong", "tab:red")):
        if mask.any():
            ax.hist(u[mask], bins=bins, density=True, alpha=0.55, color=colour, label=f"{name} (n={int(mask.sum())})")
    ax.set_xlabel(label)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)
