"""A hand-crafted baseline for the classifiers: texture features and a logistic regression.

A CNN trained from scratch on a few hundred images has to beat something simpler to be worth its cost. This is that
something: for each prepared X-ray (the same cache, scheme and lung mask the CNN trains on), or each CT slice (the
whole slice as the "mask"), 47 numbers -

* intensity inside the lung mask: mean, standard deviation, skewness, excess kurtosis and a 16-bin histogram;
* uniform local binary patterns (8 neighbours, radius 1) inside the mask: a 10-bin histogram;
* grey-level co-occurrence (32 levels, distances 1 and 3 px, 0 and 90 degrees): contrast, homogeneity, energy and
  correlation;
* the share of the frame the lung mask covers -

standardised, then a multinomial logistic regression (C = 0.1, classes weighted by inverse frequency), scored under
the same patient-grouped folds as ``lungsight train`` (:func:`lungsight.train.splits.patient_folds`).
``scripts/texture_baseline.py`` runs it on a CT or X-ray dataset.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from skimage.feature import graycomatrix, graycoprops, local_binary_pattern
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from lungsight.evaluate.multiclass import multiclass_metrics
from lungsight.train.splits import patient_folds

#: Names of the features, in the order :func:`texture_features` returns them.
FEATURE_NAMES: tuple[str, ...] = (
    "mean",
    "std",
    "skewness",
    "kurtosis",
    *(f"hist_{k:02d}" for k in range(16)),
    *(f"lbp_{k}" for k in range(10)),
    *(
        f"glcm_{p}_{d}px_{a}deg"
        for p in ("contrast", "homogeneity", "energy", "correlation")
        for d in (1, 3)
        for a in (0, 90)
    ),
    "lung_area",
)
MIN_MASK_PIXELS = 100


def texture_features(image01: np.ndarray, lung_mask: np.ndarray) -> np.ndarray:
    """The baseline's features of one prepared X-ray in [0, 1] and its lung mask (the whole frame if the mask is
    smaller than :data:`MIN_MASK_PIXELS`)."""
    img = np.clip(np.asarray(image01, dtype=np.float64), 0.0, 1.0)
    m = np.asarray(lung_mask, dtype=bool)
    if m.shape != img.shape:
        raise ValueError(f"mask shape {m.shape} differs from image shape {img.shape}")
    if m.sum() < MIN_MASK_PIXELS:
        m = np.ones_like(m)
    v = img[m]
    spread = v.std()
    shape = [stats.skew(v), stats.kurtosis(v)] if spread > 1e-6 else [0.0, 0.0]
    f = [v.mean(), spread, *shape, *(np.histogram(v, 16, (0.0, 1.0))[0] / v.size)]
    lbp = local_binary_pattern((img * 255).astype(np.uint8), 8, 1, "uniform")
    f += list(np.histogram(lbp[m], 10, (0, 10))[0] / m.sum())
    glcm = graycomatrix((img * 31).astype(np.uint8), [1, 3], [0, np.pi / 2], levels=32, symmetric=True, normed=True)
    for prop in ("contrast", "homogeneity", "energy", "correlation"):
        f += list(np.nan_to_num(graycoprops(glcm, prop).ravel()))
    f.append(m.mean())
    return np.asarray(f, dtype=np.float64)


def texture_baseline_cv(
    features: np.ndarray,
    labels: Sequence[str],
    records: Sequence[Any],
    classes: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
) -> dict[str, Any]:
    """Patient-grouped CV of the baseline: per-fold and pooled macro one-vs-rest AUC and per-class pooled AUC, as
    :func:`lungsight.evaluate.multiclass.multiclass_metrics` defines them (``None`` where undefined).

    ``records`` are what :func:`lungsight.train.splits.patient_folds` groups (``.label``, ``.patient_id``), in the
    order of ``features``.
    """
    classes = list(classes)
    y = np.array([classes.index(lab) for lab in labels])
    probs = np.zeros((len(y), len(classes)))
    per_fold = []
    for train_idx, test_idx in patient_folds(list(records), folds, seed):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000))
        model.fit(features[train_idx], y[train_idx])
        probs[test_idx] = model.predict_proba(features[test_idx])
        per_fold.append(multiclass_metrics(y[test_idx], probs[test_idx], classes)["macro_auc"])
    folds_ok = [a for a in per_fold if a is not None]
    pooled = multiclass_metrics(y, probs, classes)
    return {
        "folds": folds,
        "seed": seed,
        "n_images": len(y),
        "fold_macro_auc": per_fold,
        "macro_auc_mean": float(np.mean(folds_ok)) if folds_ok else float("nan"),
        "macro_auc_sd": float(np.std(folds_ok, ddof=1)) if len(folds_ok) > 1 else float("nan"),
        "pooled_macro_auc": pooled["macro_auc"],
        "pooled_auc_per_class": {c: m["auc"] for c, m in pooled["per_class"].items()},
        "probabilities": probs,
    }


def features_of_cache(files: Sequence[Path]) -> np.ndarray:
    """:func:`texture_features` of every prepared X-ray file (``lungsight.train.cxr.prepare_cache``)."""
    from lungsight.train.cxr import load_prepared

    return np.stack([texture_features(*load_prepared(f)[:2]) for f in files])
