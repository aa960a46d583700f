"""Ensembles of the k fold models of a cross-validation run, with their disagreement as uncertainty.

The ensemble's probability is the mean of its members' softmax outputs. Its uncertainty is the standard deviation of
the positive-class probability across members, and, for any number of classes, the predictive entropy ``H[mean p]``
and the mutual information ``H[mean p] - mean H[p_m]`` (the part of the entropy that comes from members disagreeing).

Honesty: every patient of a k-fold run was in the training data of k-1 fold models, so an ensemble scored on the
run's own data is optimistic. :func:`evaluate_ensemble` therefore refuses evaluation data that shares a patient id or a
file name with the run's ``cv_predictions.csv``; keep patients out before the CV run (``lungsight train --holdout``)
and score the ensemble on them.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

from lungsight.errors import InputError
from lungsight.evaluate.calibration import (
    apply_temperature,
    calibration_metrics,
    ece,
    logits_from_probs,
    positive_index,
)
from lungsight.evaluate.metrics import group_resamples, percentile_interval
from lungsight.fileio import atomic_write_csv, atomic_write_json
from lungsight.train.data import Item, SliceDataset, read_labels

EPS = 1e-12


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(p * np.log(np.clip(p, EPS, 1.0)), axis=-1)


def ensemble_stats(member_probs: ArrayLike, positive: int = -1) -> dict[str, np.ndarray]:
    """Mean probabilities and uncertainties of ``member_probs`` shaped ``(members, n, classes)``.

    Returns ``mean`` (n, classes), ``sd_positive`` (n; population sd of the positive-class probability across
    members), ``entropy`` (n; predictive entropy of the mean, in nats) and ``mutual_information`` (n; entropy of the
    mean minus the members' mean entropy: zero when all members agree)."""
    p = np.asarray(member_probs, dtype=float)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[2] < 2:
        raise ValueError(f"member_probs must be (members, n, classes >= 2), got {p.shape}")
    mean = p.mean(axis=0)
    entropy = _entropy(mean)
    return {
        "mean": mean,
        "sd_positive": p[:, :, positive].std(axis=0),
        "entropy": entropy,
        "mutual_information": np.maximum(entropy - _entropy(p).mean(axis=0), 0.0),
    }


def _auc(y: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(y, score)) if np.unique(y).size == 2 else None


def _class_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    """Positive-class AUC for two classes, macro one-vs-rest AUC for more (classes present only)."""
    if p.shape[1] == 2:
        return _auc(y == 1, p[:, 1])
    aucs = [_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    present = [a for a in aucs if a is not None]
    return float(np.mean(present)) if present else None


def uncertainty_vs_errors(uncertainty: ArrayLike, error: ArrayLike) -> dict[str, float | int | None]:
    """Mean uncertainty on wrong and correct predictions, and the AUC of the uncertainty as a detector of errors
    (0.5: no better than chance; ``None`` when there are no errors or no correct predictions)."""
    u = np.asarray(uncertainty, dtype=float)
    e = np.asarray(error).astype(bool)
    return {
        "n_errors": int(e.sum()),
        "n_correct": int((~e).sum()),
        "mean_on_errors": float(u[e].mean()) if e.any() else None,
        "mean_on_correct": float(u[~e].mean()) if (~e).any() else None,
        "error_detection_auc": _auc(e, u),
    }


def compare_ensemble(member_probs: ArrayLike, y: ArrayLike, positive: int = -1, bins: int = 15) -> dict[str, Any]:
    """Ensemble against its members on the same cases: AUC, accuracy and ECE of the ensemble, of each member and their
    mean, and every uncertainty measure on the ensemble's errors against its correct predictions."""
    p = np.asarray(member_probs, dtype=float)
    t = np.asarray(y).astype(int)
    stats = ensemble_stats(p, positive)
    members = [
        {"auc": _class_auc(t, m), "accuracy": float(np.mean(m.argmax(axis=1) == t)), "ece": ece(m, t, bins)} for m in p
    ]
    error = stats["mean"].argmax(axis=1) != t

    def mean_of(key: str) -> float | None:
        vals = [m[key] for m in members if m[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "n": int(t.size),
        "members": len(members),
        "ensemble": {
            "auc": _class_auc(t, stats["mean"]),
            "accuracy": float(np.mean(~error)),
            "ece": ece(stats["mean"], t, bins),
        },
        "single_mean": {k: mean_of(k) for k in ("auc", "accuracy", "ece")},
        "per_member": members,
        "uncertainty": {
            k: uncertainty_vs_errors(stats[k], error) for k in ("sd_positive", "entropy", "mutual_information")
        },
    }


def ensemble_gain_ci(
    member_probs: ArrayLike,
    y: ArrayLike,
    groups: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """Paired bootstrap interval of the ensemble's gain over the mean single member (ensemble minus member mean) in
    AUC and accuracy. Whole groups (patients) are resampled, so slices of one patient move together; resamples with
    one class only are skipped for the AUC."""
    p = np.asarray(member_probs, dtype=float)
    t = np.asarray(y).astype(int)
    mean = p.mean(axis=0)
    gains: dict[str, list[float]] = {"auc": [], "accuracy": []}
    for idx in group_resamples(groups, n_boot, seed):
        yy = t[idx]
        acc = [np.mean(m[idx].argmax(axis=1) == yy) for m in p]
        gains["accuracy"].append(float(np.mean(mean[idx].argmax(axis=1) == yy) - np.mean(acc)))
        auc_e = _class_auc(yy, mean[idx])
        aucs = [_class_auc(yy, m[idx]) for m in p]
        if auc_e is not None and all(a is not None for a in aucs):
            gains["auc"].append(auc_e - float(np.mean(aucs)))
    return {k: percentile_interval(np.asarray(g, dtype=float), alpha)[0] for k, g in gains.items()} | {
        "n_boot": n_boot,
        "resample_unit": "patient",
        "alpha": alpha,
    }


# ---------------------------------------------------------------- a CV run folder and unseen data


def fold_temperatures(run_dir: Path, files: Sequence[Path]) -> list[float] | None:
    """Each member's temperature from the run's ``calibration.json`` (``lungsight calibrate``), in the order of
    ``files``; ``None`` when the run was not calibrated or a member's fold is missing from it."""
    path = Path(run_dir) / "calibration.json"
    if not path.is_file():
        return None
    by_fold = {f["fold"]: f["temperature"] for f in json.loads(path.read_text())["folds"]}
    temps = [by_fold.get(f.parent.name) for f in files]
    return None if any(t is None for t in temps) else [float(t) for t in temps]


def member_files(run_dir: Path) -> list[Path]:
    """The ``best.safetensors`` of every completed fold (``done.json``) of a CV run, in fold order."""
    files = sorted(
        (f for f in Path(run_dir).glob("fold_*/best.safetensors") if (f.parent / "done.json").is_file()),
        key=lambda f: int(f.parent.name.split("_")[1]) if f.parent.name.split("_")[1].isdigit() else 0,
    )
    if not files:
        raise InputError(f"{run_dir}: no fold_*/best.safetensors; is this a lungsight CV run folder?")
    return files


def training_ids(run_dir: Path) -> tuple[set[str], set[str]]:
    """(patient ids, file names) of every image in the run's ``cv_predictions.csv`` - the data its models saw."""
    path = Path(run_dir) / "cv_predictions.csv"
    if not path.is_file():
        raise InputError(f"{path}: not found; the run's training data cannot be checked against the evaluation data")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {r["patient_id"] for r in rows}, {Path(r["file"]).name for r in rows}


def seen_mask(items: Sequence[Item], patients: set[str], files: set[str]) -> np.ndarray:
    """True for each item whose patient id or file name is among the run's training data (conservative: a file
    name shared by chance also counts)."""
    return np.array([it.patient_id in patients or it.path.name in files for it in items], dtype=bool)


def holdout_items(run_dir: Path) -> list[Item]:
    """The patients a run kept out of its folds (``holdout.csv`` written by ``lungsight train --holdout``)."""
    path = Path(run_dir) / "holdout.csv"
    if not path.is_file():
        raise InputError(
            f"{path}: not found; give --data, or train with --holdout 0.2 to keep patients out of the folds"
        )
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [r["file"] for r in rows if not Path(r["file"]).is_file()]
    if missing:
        raise InputError(f"{path}: {len(missing)} listed image(s) do not exist, e.g. {missing[0]}")
    return [Item(Path(r["file"]), r["label"], r["patient_id"]) for r in rows]


@torch.no_grad()
def member_predictions(files: Sequence[Path], items: Sequence[Item], batch: int = 32) -> tuple[np.ndarray, list[str]]:
    """Softmax outputs ``(members, n, classes)`` of each model file on ``items``, preprocessed as in training, and
    the class names (which every member must share)."""
    from lungsight.models.pretrained import load_model
    from lungsight.train.trainer import predict_items

    out, classes = [], None
    for f in files:
        model, cfg, _ = load_model(f)
        if classes is None:
            classes = list(cfg["classes"])
            unknown = sorted({it.label for it in items} - set(classes))
            if unknown:
                raise InputError(f"evaluation labels {unknown} are not among the model classes {classes}")
        elif list(cfg["classes"]) != classes:
            raise InputError(f"{f}: classes {cfg['classes']} differ from the other members' {classes}")
        ds = SliceDataset(
            list(items), classes, cfg["input_size"], cfg["in_chans"], tuple(cfg["mean"]), tuple(cfg["std"]), "none"
        )
        out.append(predict_items(model, ds, batch, 0))
    assert classes is not None
    return np.stack(out), classes


def evaluate_ensemble(
    run_dir: str | Path,
    out: str | Path,
    *,
    data: str | Path | None = None,
    unseen_only: bool = False,
    bins: int = 15,
) -> dict[str, Any]:
    """Score the ensemble of a CV run's fold models on data none of them saw, against the single members.

    ``data`` is a folder with ``labels.csv``; without it the run's ``holdout.csv`` is used. Evaluation images that
    share a patient id or a file name with the run's training data are refused, or with ``unseen_only`` dropped
    (their number is reported). When the run was calibrated (``calibration.json``), each member's validation-fitted
    temperature is also applied and ECE / NLL / Brier before and after are reported on these unseen patients.
    Writes ``ensemble.json``, ``ensemble_predictions.csv`` and ``uncertainty.png`` into ``out`` and returns the
    ``ensemble.json`` content.
    """
    from lungsight.evaluate.plots import plot_uncertainty

    run = Path(run_dir)
    files = member_files(run)
    items = read_labels(Path(data)) if data is not None else holdout_items(run)
    source = str(data) if data is not None else str(run / "holdout.csv")
    patients, names = training_ids(run)
    seen = seen_mask(items, patients, names)
    if seen.any() and not unseen_only:
        n_pat = len({it.patient_id for it, s in zip(items, seen, strict=True) if s})
        raise InputError(
            f"{source}: {int(seen.sum())} of {len(items)} images ({n_pat} patients) were in this run's training "
            "data (patient id or file name in cv_predictions.csv): an ensemble scored on them is optimistic. "
            "Pass --unseen-only to score only the unseen ones, or keep patients out "
            "before the CV run (lungsight train --holdout 0.2)"
        )
    kept = [it for it, s in zip(items, seen, strict=True) if not s]
    if not kept:
        raise InputError(f"{source}: every image was in this run's training data; nothing unseen to score")
    probs, classes = member_predictions(files, kept)
    pos = positive_index(classes)
    y = np.array([classes.index(it.label) for it in kept])
    result = {
        "run": str(run),
        "data": source,
        "members": [str(f) for f in files],
        "classes": classes,
        "positive_class": classes[pos],
        "dropped_seen": int(seen.sum()),
        "patients": len({it.patient_id for it in kept}),
    } | compare_ensemble(probs, y, pos, bins)
    result["gain_ci95"] = ensemble_gain_ci(probs, y, [it.patient_id for it in kept])
    temps = fold_temperatures(run, files)
    if temps is not None:  # the validation-fitted temperatures, judged on patients no fold saw
        scaled = np.stack([apply_temperature(logits_from_probs(m), t) for m, t in zip(probs, temps, strict=True)])
        members_before = [calibration_metrics(m, y, pos, bins) for m in probs]
        members_after = [calibration_metrics(m, y, pos, bins) for m in scaled]
        result["temperature_scaling"] = {
            "temperatures": temps,
            "members_before": {k: float(np.mean([m[k] for m in members_before])) for k in members_before[0]},
            "members_after": {k: float(np.mean([m[k] for m in members_after])) for k in members_after[0]},
            "ensemble_before": calibration_metrics(probs.mean(axis=0), y, pos, bins),
            "ensemble_after": calibration_metrics(scaled.mean(axis=0), y, pos, bins),
        }
    stats = ensemble_stats(probs, pos)
    out = Path(out)
    rows = [
        {
            "file": str(it.path),
            "patient_id": it.patient_id,
            "label": it.label,
            "p": float(stats["mean"][i, pos]),
            **{f"p_{c}": float(stats["mean"][i, k]) for k, c in enumerate(classes)},
            "sd_positive": float(stats["sd_positive"][i]),
            "entropy": float(stats["entropy"][i]),
            "mutual_information": float(stats["mutual_information"][i]),
            **{f"p_member_{m + 1}": float(probs[m, i, pos]) for m in range(len(files))},
        }
        for i, it in enumerate(kept)
    ]
    atomic_write_csv(out / "ensemble_predictions.csv", rows)
    atomic_write_json(out / "ensemble.json", result)
    plot_uncertainty(
        stats["sd_positive"],
        stats["mean"].argmax(axis=1) != y,
        out / "uncertainty.png",
        label=f"sd of p({classes[pos]}) across {len(files)} fold models",
    )
    return result
