"""Calibration of predicted probabilities: expected calibration error (ECE), reliability diagrams, and temperature
scaling fitted on each fold's validation split and applied to that fold's held-out test predictions.

A model is calibrated when, of the cases it gives a confidence of 0.8, about 80 % are right. Cross-validation runs
store softmax probabilities, not logits; ``log p`` equals the logits up to a constant per row, and softmax ignores
such a constant, so ``softmax(log p / T)`` is exactly temperature scaling of the original logits.

Temperature scaling divides every logit by one scalar ``T > 0``: it changes the confidence but never the predicted
class or the ranking of the positive-class probability for two classes, so accuracy and AUC stay as they are while
ECE, negative log-likelihood (NLL) and Brier score can improve.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from lungsight.errors import InputError
from lungsight.evaluate.metrics import group_resamples
from lungsight.fileio import atomic_write_csv, atomic_write_json, atomic_write_text

EPS = 1e-12
LOG_T_BOUNDS = (-4.0, 4.0)  # T between 0.018 and 55: wider than any useful temperature


def _check(probs: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=float)
    t = np.asarray(y).astype(int)
    if p.ndim != 2 or p.shape[0] != t.size or p.shape[1] < 2:
        raise ValueError(f"probs must be (n, k >= 2) with n = len(y); got {p.shape} and {t.size} labels")
    if t.size and (t.min() < 0 or t.max() >= p.shape[1]):
        raise ValueError("labels must be class indices into the probability columns")
    return p, t


def _binned(score: np.ndarray, hit: np.ndarray, bins: int) -> dict[str, list[Any]]:
    """Equal-width bins on [0, 1] (bin ``i`` holds scores in ``(i/bins, (i+1)/bins]``, 0 goes to the first)."""
    if bins < 1:
        raise ValueError("bins must be at least 1")
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges[1:-1], score, side="left"), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    conf = np.bincount(which, weights=score, minlength=bins)
    acc = np.bincount(which, weights=hit.astype(float), minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(counts > 0, conf / np.maximum(counts, 1), np.nan)
        mean_acc = np.where(counts > 0, acc / np.maximum(counts, 1), np.nan)
    return {
        "edges": edges.tolist(),
        "count": counts.tolist(),
        "confidence": [None if math.isnan(v) else float(v) for v in mean_conf],
        "accuracy": [None if math.isnan(v) else float(v) for v in mean_acc],
    }


def _ece_of(table: dict[str, list[Any]]) -> float:
    n = sum(table["count"])
    if n == 0:
        return float("nan")
    return float(
        sum(
            c / n * abs(a - f)
            for c, a, f in zip(table["count"], table["accuracy"], table["confidence"], strict=True)
            if c
        )
    )


def reliability(probs: ArrayLike, y: ArrayLike, bins: int = 15) -> dict[str, list[Any]]:
    """Top-label reliability table: per equal-width confidence bin its edges, count, mean confidence (the top
    probability) and accuracy (share of rows whose top class is the true one). Empty bins hold ``None``."""
    p, t = _check(probs, y)
    return _binned(p.max(axis=1), p.argmax(axis=1) == t, bins)


def ece(probs: ArrayLike, y: ArrayLike, bins: int = 15) -> float:
    """Top-label expected calibration error: sum over bins of (bin share) x |accuracy - mean confidence|.

    For two classes the confidence is the probability of the predicted class (never below 0.5)."""
    return _ece_of(reliability(probs, y, bins))


def classwise_ece(probs: ArrayLike, y: ArrayLike, cls: int, bins: int = 15) -> float:
    """ECE of one class's probability (for two classes: the positive class): bins on ``probs[:, cls]``, each
    compared with the share of its rows that truly are ``cls``."""
    p, t = _check(probs, y)
    return _ece_of(_binned(p[:, cls], t == cls, bins))


def nll(probs: ArrayLike, y: ArrayLike) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at 1e-12)."""
    p, t = _check(probs, y)
    return float(-np.mean(np.log(np.clip(p[np.arange(t.size), t], EPS, 1.0))))


def brier(probs: ArrayLike, y: ArrayLike) -> float:
    """Brier score: for two classes the mean of (p_positive - y)^2 (positive = the last column); for more, the mean
    over rows of the squared distance between the probability vector and the one-hot truth."""
    p, t = _check(probs, y)
    if p.shape[1] == 2:
        return float(np.mean((p[:, 1] - (t == 1)) ** 2))
    return float(np.mean(np.sum((p - np.eye(p.shape[1])[t]) ** 2, axis=1)))


def logits_from_probs(probs: ArrayLike) -> np.ndarray:
    """``log p``: the logits up to a per-row constant (which softmax ignores); probabilities clipped at 1e-12."""
    return np.log(np.clip(np.asarray(probs, dtype=float), EPS, 1.0))


def apply_temperature(logits: ArrayLike, temperature: float) -> np.ndarray:
    """``softmax(logits / T)``."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return softmax(np.asarray(logits, dtype=float) / temperature, axis=1)


def _nll_logits(logits: np.ndarray, t: np.ndarray, temperature: float) -> float:
    return float(-np.mean(log_softmax(logits / temperature, axis=1)[np.arange(t.size), t]))


def fit_temperature(logits: ArrayLike, y: ArrayLike) -> float:
    """The ``T > 0`` that minimises the NLL of ``softmax(logits / T)`` on (``logits``, ``y``).

    NLL is convex in ``1/T``, so a bounded scalar search over ``log T`` finds the minimum. If the search does not
    beat ``T = 1`` (e.g. no data), 1 is returned: the fit never raises the NLL of the data it was fitted on."""
    z, t = _check(logits, y)
    if t.size == 0:
        return 1.0
    res = minimize_scalar(
        lambda log_t: _nll_logits(z, t, math.exp(log_t)),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    best = math.exp(float(res.x))
    return best if _nll_logits(z, t, best) <= _nll_logits(z, t, 1.0) else 1.0


def calibration_metrics(probs: ArrayLike, y: ArrayLike, positive: int, bins: int = 15) -> dict[str, float]:
    """ECE (top-label), classwise ECE of the positive class, NLL and Brier of one set of predictions."""
    return {
        "ece": ece(probs, y, bins),
        "ece_positive": classwise_ece(probs, y, positive, bins),
        "nll": nll(probs, y),
        "brier": brier(probs, y),
    }


def ece_change_ci(
    before: ArrayLike,
    after: ArrayLike,
    y: ArrayLike,
    groups: ArrayLike,
    bins: int = 15,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> list[float]:
    """Paired bootstrap interval of ``ECE(after) - ECE(before)`` on the same cases, resampling whole groups
    (patients), so that the slices of one patient move together. Negative: the change lowered the ECE."""
    pb, t = _check(before, y)
    pa, _ = _check(after, y)
    diffs = [ece(pa[idx], t[idx], bins) - ece(pb[idx], t[idx], bins) for idx in group_resamples(groups, n_boot, seed)]
    return [float(v) for v in np.percentile(diffs, [100 * alpha / 2, 100 * (1 - alpha / 2)])]


# ---------------------------------------------------------------- a cross-validation run folder


def read_prediction_csv(path: Path) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a ``predictions.csv``-style file and its class names (the ``p_<class>`` columns, in order)."""
    if not path.is_file():
        raise InputError(f"{path}: not found")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        classes = [c[2:] for c in reader.fieldnames or [] if c.startswith("p_")]
        rows = list(reader)
    if len(classes) < 2 or "label" not in (reader.fieldnames or []):
        raise InputError(f"{path}: expected columns label and p_<class> for at least two classes")
    return rows, classes


def probs_and_labels(rows: Sequence[dict[str, str]], classes: list[str], path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities ``(n, k)``, class indices) of prediction rows; an unknown label is an error naming ``path``."""
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise InputError(f"{path}: label(s) {', '.join(unknown)} are not among the classes {classes}")
    p = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=float).reshape(len(rows), len(classes))
    return p, np.array([classes.index(r["label"]) for r in rows], dtype=int)


def positive_index(classes: Sequence[str]) -> int:
    """The positive class: ``covid`` when present, else the last class (as the trainer stores it)."""
    return list(classes).index("covid") if "covid" in classes else len(classes) - 1


def _fold_dirs(run: Path) -> list[Path]:
    folds = sorted(
        (d for d in run.glob("fold_*") if d.is_dir() and (d / "done.json").is_file()),
        key=lambda d: int(d.name.split("_")[1]) if d.name.split("_")[1].isdigit() else 0,
    )
    if not folds:
        raise InputError(f"{run}: no completed folds (fold_*/done.json); is this a lungsight CV run folder?")
    return folds


def rebuild_val_predictions(run_dir: str | Path) -> list[Path]:
    """Write ``fold_k/val_predictions.csv`` for a CT run trained before the trainer saved them.

    Each fold's validation split is rebuilt from ``run.json`` (same data, seed, fold and validation split functions
    as the trainer) and scored with the fold's ``best.safetensors``. The rebuilt test split must hold exactly the
    images of the fold's ``predictions.csv``, or the data or the split code has changed since the run and nothing is
    written. Returns the files written (folds that already have one are left as they are).
    """
    import json

    import torch

    from lungsight.models.pretrained import load_model
    from lungsight.train.data import SliceDataset, read_labels
    from lungsight.train.splits import patient_folds, validation_split
    from lungsight.train.trainer import _subset_patients, _write_predictions, predict_items

    run = Path(run_dir)
    if not (run / "run.json").is_file():
        raise InputError(f"{run}: no run.json; not a lungsight run folder")
    cfg = json.loads((run / "run.json").read_text())
    if cfg.get("task", "ct") != "ct" or cfg.get("holdout"):
        raise InputError(f"{run}: only CT runs without --holdout can be rebuilt (newer runs save val predictions)")
    items = _subset_patients(read_labels(Path(cfg["data"])), cfg.get("max_patients"), cfg["seed"])
    plan = []
    for k, (train_idx, test_idx) in enumerate(patient_folds(items, cfg["folds"], cfg["seed"]), start=1):
        fold = run / f"fold_{k}"
        if (fold / "val_predictions.csv").is_file() or not (fold / "done.json").is_file():
            continue
        rows, _ = read_prediction_csv(fold / "predictions.csv")
        stored = sorted((Path(r["file"]).name, r["patient_id"]) for r in rows)
        if stored != sorted((items[i].path.name, items[i].patient_id) for i in test_idx):
            raise InputError(f"{fold}: the rebuilt test split differs from predictions.csv; cannot rebuild safely")
        plan.append((fold, k, validation_split(items, train_idx, cfg.get("val_fraction", 0.15), cfg["seed"] + k)[1]))
    written = []
    for fold, k, val_idx in plan:
        model, mcfg, _ = load_model(fold / "best.safetensors")
        classes = list(mcfg["classes"])
        ds = SliceDataset(
            [items[i] for i in val_idx],
            classes,
            mcfg["input_size"],
            mcfg["in_chans"],
            tuple(mcfg["mean"]),
            tuple(mcfg["std"]),
        )
        with torch.no_grad():
            probs = predict_items(model, ds, 32, 0)
        _write_predictions(fold / "val_predictions.csv", items, val_idx, probs, k, classes)
        written.append(fold / "val_predictions.csv")
    return written


def calibrate_run(run_dir: str | Path, bins: int = 15) -> dict[str, Any]:
    """Fit a temperature on each fold's ``val_predictions.csv``, apply it to that fold's ``predictions.csv``, and
    report ECE / NLL / Brier before and after, per fold and pooled over the held-out test predictions.

    Writes into the run folder: ``calibration.json`` (everything, with both reliability tables),
    ``calibration.md`` (a table), ``cv_predictions_calibrated.csv`` (the test predictions after scaling) and
    ``reliability.png`` (pooled, before and after). Returns the ``calibration.json`` content.
    """
    from lungsight.evaluate.plots import plot_reliability

    run = Path(run_dir)
    if not run.is_dir():
        raise InputError(f"{run}: not a folder")
    folds, pooled_before, pooled_after, pooled_y, calibrated_rows, patients = [], [], [], [], [], []
    classes: list[str] | None = None
    for d in _fold_dirs(run):
        val_path, test_path = d / "val_predictions.csv", d / "predictions.csv"
        if not val_path.is_file():
            raise InputError(
                f"{val_path}: not found; this run was trained before validation predictions were saved - "
                "train it again to calibrate it"
            )
        val_rows, val_classes = read_prediction_csv(val_path)
        test_rows, test_classes = read_prediction_csv(test_path)
        classes = classes or test_classes
        if val_classes != classes or test_classes != classes:
            raise InputError(f"{d}: class columns differ between folds or files ({val_classes} vs {test_classes})")
        pv, yv = probs_and_labels(val_rows, classes, val_path)
        pt, yt = probs_and_labels(test_rows, classes, test_path)
        pos = positive_index(classes)
        temperature = fit_temperature(logits_from_probs(pv), yv)
        pv_after = apply_temperature(logits_from_probs(pv), temperature)
        pt_after = apply_temperature(logits_from_probs(pt), temperature)
        folds.append(
            {
                "fold": d.name,
                "temperature": temperature,
                "n_val": int(yv.size),
                "n_test": int(yt.size),
                "val_nll_before": nll(pv, yv),
                "val_nll_after": nll(pv_after, yv),
                "before": calibration_metrics(pt, yt, pos, bins),
                "after": calibration_metrics(pt_after, yt, pos, bins),
            }
        )
        pooled_before.append(pt)
        pooled_after.append(pt_after)
        pooled_y.append(yt)
        patients += [r.get("patient_id") or r.get("file", "") for r in test_rows]
        for r, q in zip(test_rows, pt_after, strict=True):
            calibrated_rows.append(
                r | {"p": float(q[-1]), **{f"p_{c}": float(q[k]) for k, c in enumerate(classes)}, "T": temperature}
            )
    assert classes is not None
    pos = positive_index(classes)
    pb, pa, y = np.concatenate(pooled_before), np.concatenate(pooled_after), np.concatenate(pooled_y)
    temps = [f["temperature"] for f in folds]
    result = {
        "bins": bins,
        "classes": classes,
        "positive_class": classes[pos],
        "temperatures": temps,
        "folds": folds,
        "fold_mean": {
            w: {k: float(np.mean([f[w][k] for f in folds])) for k in folds[0][w]} for w in ("before", "after")
        },
        "pooled": {
            "n": int(y.size),
            "before": calibration_metrics(pb, y, pos, bins),
            "after": calibration_metrics(pa, y, pos, bins),
            "ece_change_ci95": ece_change_ci(pb, pa, y, patients, bins),
        },
        "reliability": {"before": reliability(pb, y, bins), "after": reliability(pa, y, bins)},
    }
    atomic_write_json(run / "calibration.json", result)
    atomic_write_csv(run / "cv_predictions_calibrated.csv", calibrated_rows)
    atomic_write_text(run / "calibration.md", calibration_markdown(result))
    plot_reliability(
        {
            "before": result["reliability"]["before"],
            f"after (median T {np.median(temps):.2f})": result["reliability"]["after"],
        },
        run / "reliability.png",
        title=f"Reliability, held-out folds pooled (n={y.size})",
    )
    return result


def calibration_markdown(result: dict[str, Any]) -> str:
    """The before/after table of :func:`calibrate_run` as Markdown."""
    head = (
        "| fold | T | n val | n test | val NLL before → after | ECE before → after | ECE(positive) before → after "
        "| NLL before → after | Brier before → after |\n|---|---|---|---|---|---|---|---|---|\n"
    )

    def cells(b: dict[str, float], a: dict[str, float]) -> str:
        return " | ".join(f"{b[k]:.3f} → {a[k]:.3f}" for k in ("ece", "ece_positive", "nll", "brier"))

    lines = [
        f"| {f['fold']} | {f['temperature']:.3f} | {f['n_val']} | {f['n_test']} | "
        f"{f['val_nll_before']:.3f} → {f['val_nll_after']:.3f} | {cells(f['before'], f['after'])} |"
        for f in result["folds"]
    ]
    m = result["fold_mean"]
    lines.append(f"| **mean of folds** | | | | | {cells(m['before'], m['after'])} |")
    p = result["pooled"]
    lines.append(f"| **pooled** | | | {p['n']} | | {cells(p['before'], p['after'])} |")
    lo, hi = p["ece_change_ci95"]
    return (
        f"# Temperature scaling ({result['bins']} equal-width bins; positive class {result['positive_class']})\n\n"
        + head
        + "\n".join(lines)
        + f"\n\nPooled ECE change (after - before): 95 % interval {lo:+.3f} to {hi:+.3f}"
        + " (paired bootstrap over patients).\n"
    )
