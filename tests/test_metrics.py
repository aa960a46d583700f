"""Evaluation metrics, bootstrap intervals, patient scores and fold summaries against hand-computed values."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from lungsight.evaluate import (
    METRICS,
    binary_metrics,
    bootstrap_ci,
    fold_table_markdown,
    patient_scores,
    summarize_folds,
)
from lungsight.evaluate.metrics import _tie_bounds, _weighted_metrics, group_resamples
from lungsight.inference.rules import apply_rule

# y = [1, 1, 1, 0, 0, 0, 0]; at threshold 0.5: positives 0.9, 0.7 found, 0.3 missed; negative 0.6 flagged.
Y = [1, 1, 1, 0, 0, 0, 0]
S = [0.9, 0.7, 0.3, 0.6, 0.4, 0.2, 0.1]


def test_confusion_matrix_case_by_hand():
    m = binary_metrics(Y, S)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 3)
    assert (m["n"], m["n_pos"], m["n_neg"]) == (7, 3, 4)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(2 / 4)
    assert m["accuracy"] == pytest.approx(5 / 7)
    # AUC by counting the 3 × 4 positive-negative pairs ranked right: 0.9 → 4, 0.7 → 4, 0.3 → 2 (> 0.2, 0.1)
    assert m["auc"] == pytest.approx(10 / 12)
    assert set(m) == set(METRICS) | {"n", "n_pos", "n_neg", "tp", "fp", "tn", "fn"}


def test_auc_ties_count_one_half():
    s = [0.9, 0.7, 0.3, 0.6, 0.3, 0.2, 0.1]  # the missed positive now ties a negative at 0.3
    assert binary_metrics(Y, s)["auc"] == pytest.approx(10.5 / 12)


def test_threshold_is_inclusive_and_y_pred_overrides_it():
    assert binary_metrics([1, 0], [0.5, 0.49])["tp"] == 1
    m = binary_metrics(Y, S, threshold=0.8)
    assert (m["tp"], m["fp"]) == (1, 0)
    # decisions given directly (as for a patient rule); the score still drives the AUC
    m = binary_metrics(Y, S, y_pred=[1, 1, 1, 0, 0, 0, 0])
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (3, 0, 4, 0)
    assert m["auc"] == pytest.approx(10 / 12)


def test_undefined_values_are_none_and_json_ready():
    m = binary_metrics([0, 0, 0], [0.1, 0.2, 0.3])  # one class, no positive predictions
    assert m["auc"] is None
    assert m["sensitivity"] is None
    assert m["precision"] is None
    assert m["f1"] is None and m["iou"] is None
    assert m["specificity"] == 1.0 and m["accuracy"] == 1.0
    json.dumps(m, allow_nan=False)

    m = binary_metrics([1, 1], [0.9, 0.2])
    assert m["auc"] is None and m["specificity"] is None
    assert m["precision"] == 1.0 and m["sensitivity"] == 0.5

    m = binary_metrics([1, 0], [0.1, 0.2])  # positives exist but none predicted
    assert m["precision"] is None
    assert m["f1"] == 0.0 and m["iou"] == 0.0
    json.dumps(m, allow_nan=False)


def test_invalid_inputs():
    with pytest.raises(ValueError, match="empty"):
        binary_metrics([], [])
    with pytest.raises(ValueError, match="0 and 1"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="shape"):
        binary_metrics([0, 1], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        binary_metrics([0, 1], [0.1, float("nan")])


# ---------------------------------------------------------------- bootstrap


def _realistic(n: int = 600, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(0.25 + 0.35 * y + rng.normal(0, 0.2, n), 0, 1)
    return y, s


def test_weighted_resample_metrics_equal_metrics_on_the_resampled_rows():
    y, s = _realistic(200)
    s = np.round(s, 1)  # many ties
    order = np.argsort(s, kind="stable")
    start, end = _tie_bounds(s[order])
    rng = np.random.default_rng(3)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        w = np.bincount(idx, minlength=y.size).astype(float)[order][None, :]
        got = _weighted_metrics(w, y[order].astype(bool), (s >= 0.5)[order], start, end)
        want = binary_metrics(y[idx], s[idx])
        for m in METRICS:
            assert got[m][0] == pytest.approx(want[m], abs=1e-12), m


def test_bootstrap_contains_point_estimate_and_is_reproducible():
    y, s = _realistic()
    point = binary_metrics(y, s)
    ci = bootstrap_ci(y, s, n_boot=500, seed=7)
    for m in METRICS:
        lo, hi = ci[m]
        assert lo <= point[m] <= hi, m
        assert hi - lo < 0.2, m
    assert ci["n_boot_used"] == dict.fromkeys(METRICS, 500)
    assert ci["resample_unit"] == "row" and ci["n_boot"] == 500 and ci["alpha"] == 0.05
    assert bootstrap_ci(y, s, n_boot=500, seed=7) == ci
    assert bootstrap_ci(y, s, n_boot=500, seed=8)["auc"] != ci["auc"]
    json.dumps(ci, allow_nan=False)


def test_narrower_interval_with_larger_alpha():
    y, s = _realistic()
    wide = bootstrap_ci(y, s, n_boot=300, alpha=0.05)["auc"]
    narrow = bootstrap_ci(y, s, n_boot=300, alpha=0.5)["auc"]
    assert wide[0] <= narrow[0] <= narrow[1] <= wide[1]


def test_patient_bootstrap_wider_than_row_bootstrap_for_correlated_rows():
    # 30 patients × 20 slices: each patient's slices share one patient-level score, so the effective sample
    # size is 30, not 600; only resampling patients sees that.
    rng = np.random.default_rng(0)
    n_pat, per = 30, 20
    y_pat = np.arange(n_pat) % 2
    s_pat = np.clip(0.5 + 0.15 * (2 * y_pat - 1) + rng.normal(0, 0.2, n_pat), 0, 1)
    y = np.repeat(y_pat, per)
    s = np.clip(np.repeat(s_pat, per) + rng.normal(0, 0.01, n_pat * per), 0, 1)
    groups = np.repeat([f"P{i:03d}" for i in range(n_pat)], per)
    row = bootstrap_ci(y, s, n_boot=400, seed=1)
    pat = bootstrap_ci(y, s, groups, n_boot=400, seed=1)
    assert pat["resample_unit"] == "group"
    for m in ("auc", "accuracy", "sensitivity", "specificity"):
        row_w = row[m][1] - row[m][0]
        pat_w = pat[m][1] - pat[m][0]
        assert pat_w > 2.5 * row_w, (m, row_w, pat_w)


def test_bootstrap_skips_undefined_resamples():
    y = np.array([1] + [0] * 9)
    s = np.linspace(0.9, 0.0, 10)
    ci = bootstrap_ci(y, s, n_boot=400, seed=0)
    # about (9/10)^10 ≈ 35 % of resamples hold no positive row: no sensitivity or AUC there
    assert 150 < ci["n_boot_used"]["sensitivity"] < 350
    assert ci["n_boot_used"]["auc"] == ci["n_boot_used"]["sensitivity"]
    assert ci["n_boot_used"]["specificity"] == 400
    assert ci["sensitivity"] == [1.0, 1.0]

    ci = bootstrap_ci([0, 0, 0], [0.1, 0.2, 0.3], n_boot=50)
    assert ci["auc"] is None and ci["sensitivity"] is None
    assert ci["n_boot_used"]["auc"] == 0
    json.dumps(ci, allow_nan=False)


def test_bootstrap_speed():
    y, s = _realistic()
    groups = np.repeat(np.arange(60), 10)
    t0 = time.perf_counter()
    bootstrap_ci(y, s, n_boot=1000)
    bootstrap_ci(y, s, groups, n_boot=1000)
    assert time.perf_counter() - t0 < 4.0  # each well under 2 s


def test_bootstrap_invalid_arguments():
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_ci([0, 1], [0.1, 0.9], n_boot=0)
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([0, 1], [0.1, 0.9], alpha=1.0)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_ci([0, 1], [0.1, 0.9], groups=["a"])


# ---------------------------------------------------------------- patient scores


def test_patient_scores_groups_rows_and_applies_rule():
    rows = [
        ("A", 0, 0.1),
        ("A", 1, 0.7),
        ("B", 0, 0.2),
        ("A", 1, 0.8),
        ("B", 0, 0.3),
        ("A", 0, 0.2),
        ("C", 1, 0.9),
    ]
    ps = patient_scores(rows, "threshold-0")
    assert ps.patient_ids.tolist() == ["A", "B", "C"]
    assert ps.y_true.tolist() == [1, 0, 1]
    assert ps.score == pytest.approx([0.5, 0.0, 1.0])
    assert ps.decision.tolist() == [True, False, True]

    # consecutive with N = 2: A's positives (0.7, 0.8) are consecutive once B's rows are set aside
    ps = patient_scores(rows, "consecutive", consecutive_n=2)
    assert ps.decision.tolist() == [True, False, True]
    assert ps.score[0] == apply_rule([0.1, 0.7, 0.8, 0.2], "consecutive", consecutive_n=2).score

    ids, y_true, score, decision = patient_scores(
        {"patient_id": ["X", "X", "Y"], "label": [0, 0, 1], "prob": [0.6, 0.7, 0.2]}, "mean"
    )
    assert ids.tolist() == ["X", "Y"]
    assert y_true.tolist() == [0, 1]
    assert score == pytest.approx([0.65, 0.2])
    assert decision.tolist() == [True, False]
    m = binary_metrics(y_true, score, y_pred=decision)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 1, 0, 1)


def test_patient_scores_errors():
    with pytest.raises(ValueError, match="empty"):
        patient_scores([], "mean")
    with pytest.raises(ValueError, match="column"):
        patient_scores({"patient_id": [1], "prob": [0.2]}, "mean")
    with pytest.raises(ValueError, match="0 or 1"):
        patient_scores([("A", 2, 0.5)], "mean")


# ---------------------------------------------------------------- fold summaries


FOLDS = [
    {"fold": "f1", "accuracy": 0.8, "auc": 0.90, "sensitivity": None, "tp": 4},
    {"fold": "f2", "accuracy": 0.9, "auc": None, "sensitivity": 0.5, "tp": 6},
    {"fold": "f3", "accuracy": 1.0, "auc": 0.80, "sensitivity": None, "tp": 8},
]


def test_summarize_folds_by_hand():
    s = summarize_folds(FOLDS)
    assert "fold" not in s
    assert s["accuracy"]["mean"] == pytest.approx(0.9)
    # sample sd: sqrt((0.1² + 0² + 0.1²) / 2) = 0.1
    assert s["accuracy"]["sd"] == pytest.approx(0.1)
    assert s["accuracy"]["n"] == 3
    assert s["auc"] == {"mean": pytest.approx(0.85), "sd": pytest.approx(math.sqrt(0.005)), "n": 2}
    assert s["sensitivity"] == {"mean": 0.5, "sd": None, "n": 1}
    assert s["tp"]["mean"] == 6.0 and s["tp"]["sd"] == pytest.approx(2.0)
    assert summarize_folds([{"auc": None}]) == {"auc": {"mean": None, "sd": None, "n": 0}}


def test_fold_table_markdown():
    table = fold_table_markdown(FOLDS, metrics=("accuracy", "auc", "sensitivity", "tp"))
    lines = table.strip().splitlines()
    assert lines[0] == "| fold | accuracy | auc | sensitivity | tp |"
    assert len(lines) == 2 + 3 + 1
    assert lines[2] == "| f1 | 0.800 | 0.900 | – | 4 |"
    assert lines[-1] == "| mean ± sd | 0.900 ± 0.100 | 0.850 ± 0.071 | 0.500 | 6.000 ± 2.000 |"
    unnamed = fold_table_markdown([{"f1": 0.5}, {"f1": 0.7}], metrics=["f1"], digits=2)
    assert "| 1 | 0.50 |" in unnamed and "| 2 | 0.70 |" in unnamed
    assert "0.60 ± 0.14" in unnamed


def test_group_resamples_draw_whole_groups_as_many_as_there_are():
    groups = ["a", "a", "b", "c", "c", "c"]  # group sizes 2, 1, 3
    draws = list(group_resamples(groups, 50, seed=1))
    assert len(draws) == 50
    for idx in draws:
        drawn = [groups[i] for i in idx]
        # each group comes whole (2, 1 or 3 rows at a time), and exactly three groups are drawn
        counts = {g: drawn.count(g) for g in set(drawn)}
        assert all(n % {"a": 2, "b": 1, "c": 3}[g] == 0 for g, n in counts.items())
        assert sum(n // {"a": 2, "b": 1, "c": 3}[g] for g, n in counts.items()) == 3
    assert [d.tolist() for d in group_resamples(groups, 5, seed=1)] == [d.tolist() for d in draws[:5]]
