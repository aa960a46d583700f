"""Patient-grouped splits: no patient is ever on both sides of a split."""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from lungsight.errors import InputError
from lungsight.train.data import Item


def _groups(items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([it.label for it in items])
    groups = np.array([it.patient_id for it in items])
    return labels, groups


def patient_folds(items: list[Item], k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, test) index pairs, stratified by label and grouped by patient."""
    labels, groups = _groups(items)
    n_patients = len(set(groups))
    if k < 2 or k > n_patients:
        raise InputError(f"cannot make {k} patient-grouped folds from {n_patients} patients")
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(items)), labels, groups)]


def validation_split(
    items: list[Item], idx: np.ndarray, fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (train, validation) by patient, the validation part holding about ``fraction``.

    When the rarest class has fewer images than ``1 / fraction``, or there are fewer patients, the validation part
    grows (up to one half), so that every class can still be represented in it and every part holds a patient.
    """
    labels, groups = _groups(items)
    rarest = min(Counter(labels[idx].tolist()).values())
    patients = len(set(groups[idx]))
    if patients < 2:
        raise InputError(f"too few patients ({patients}) to split off a validation part; at least 2 are needed")
    n_splits = max(2, min(round(1 / fraction), rarest, patients))
    skf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed + 1)
    tr, va = next(skf.split(np.zeros(len(idx)), labels[idx], groups[idx]))
    return idx[tr], idx[va]


def class_weights(items: list[Item], idx: np.ndarray, classes: list[str]) -> list[float]:
    """Inverse-frequency class weights normalised to mean 1 (the loss sees each class equally)."""
    counts = Counter(items[i].label for i in idx)
    raw = [len(idx) / (len(classes) * max(counts.get(c, 0), 1)) for c in classes]
    return [w * len(raw) / sum(raw) for w in raw]
