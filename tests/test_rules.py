"""Slice → patient decision rules, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lungsight.inference.rules import RULES, RuleResult, apply_all_rules, apply_rule


def _series(n: int, positive_at: list[int], hi: float = 0.9, lo: float = 0.1) -> np.ndarray:
    p = np.full(n, lo)
    p[positive_at] = hi
    return p


# ---------------------------------------------------------------- threshold rules (paper 002)


def test_ten_slices_one_positive_fires_threshold0_not_threshold10():
    p = _series(10, [4])
    r0 = apply_rule(p, "threshold-0")
    r10 = apply_rule(p, "threshold-10")
    assert r0.positive is True  # 1 > 0
    assert r10.positive is False  # 1 > 0.1 × 10 = 1.0 is false: exactly t positives is not positive
    assert r10.params["t"] == 1.0
    assert r0.n_positive == r10.n_positive == 1
    assert r0.score == r10.score == pytest.approx(0.1)


def test_ten_slices_two_positives_fires_threshold10():
    r = apply_rule(_series(10, [2, 7]), "threshold-10")
    assert r.positive is True  # 2 > 1.0
    assert r.score == pytest.approx(0.2)


def test_no_positive_slice_is_negative_for_threshold0():
    r = apply_rule(_series(7, []), "threshold-0")
    assert r.positive is False
    assert r.score == 0.0
    assert r.n_positive == 0


def test_threshold10_exact_boundary_is_robust_to_float_rounding():
    # 0.1 × 30 is 3.0000000000000004 in floating point; the rule must compare against exactly 3.
    p = _series(30, [0, 1, 2])
    assert apply_rule(p, "threshold-10").positive is False
    assert apply_rule(_series(30, [0, 1, 2, 3]), "threshold-10").positive is True
    # t = 0.1 × 25 = 2.5: 3 positives fire, 2 do not
    assert apply_rule(_series(25, [0, 1, 2]), "threshold-10").positive is True
    assert apply_rule(_series(25, [0, 1]), "threshold-10").positive is False


def test_slice_threshold_is_inclusive_and_configurable():
    p = np.array([0.5, 0.49, 0.2, 0.2])
    r = apply_rule(p, "threshold-0")
    assert r.n_positive == 1  # 0.5 ≥ 0.5
    r = apply_rule(p, "threshold-0", slice_threshold=0.6)
    assert r.n_positive == 0 and r.positive is False
    assert r.params["slice_threshold"] == 0.6


def test_t_fraction_setting():
    p = _series(10, [0, 1, 2])
    assert apply_rule(p, "threshold-10", t_fraction=0.3).positive is False  # 3 > 3 false
    assert apply_rule(p, "threshold-10", t_fraction=0.25).positive is True  # 3 > 2.5


# ---------------------------------------------------------------- consecutive rule (paper 003)


def test_consecutive_run_of_exactly_n_fires():
    p = _series(40, list(range(10, 25)))  # 15 in a row
    r = apply_rule(p, "consecutive")
    assert r.positive is True
    assert r.params["longest_run"] == 15
    assert r.params["n_eff"] == 15
    assert r.score == 1.0


def test_consecutive_run_broken_by_one_negative_does_not_fire():
    positives = list(range(5, 12)) + list(range(13, 21))  # runs of 7 and 8, slice 12 negative
    r = apply_rule(_series(40, positives), "consecutive")
    assert r.n_positive == 15
    assert r.params["longest_run"] == 8
    assert r.positive is False
    assert r.score == pytest.approx(8 / 15)
    # the threshold rules see the same 15 positives and fire
    assert apply_rule(_series(40, positives), "threshold-10").positive is True


def test_consecutive_n_eff_on_short_series():
    p = _series(5, [0, 1, 2, 3, 4])
    r = apply_rule(p, "consecutive")  # N = 15 but only 5 slices: N_eff = 5
    assert r.params == {"slice_threshold": 0.5, "consecutive_n": 15, "n_eff": 5, "longest_run": 5}
    assert r.positive is True and r.score == 1.0

    r = apply_rule(_series(5, [0, 1, 3, 4]), "consecutive")
    assert r.params["longest_run"] == 2
    assert r.positive is False
    assert r.score == pytest.approx(2 / 5)


def test_consecutive_custom_n_and_score_clipped():
    r = apply_rule(_series(20, list(range(0, 10))), "consecutive", consecutive_n=4)
    assert r.positive is True
    assert r.params["n_eff"] == 4 and r.params["longest_run"] == 10
    assert r.score == 1.0  # 10 / 4 clipped


def test_consecutive_run_at_series_end():
    r = apply_rule(_series(6, [3, 4, 5]), "consecutive", consecutive_n=3)
    assert r.params["longest_run"] == 3
    assert r.positive is True


# ---------------------------------------------------------------- mean rule


def test_mean_rule():
    r = apply_rule([0.2, 0.4, 0.9], "mean")
    assert r.score == pytest.approx(0.5)
    assert r.positive is True  # 0.5 ≥ 0.5
    r = apply_rule([0.2, 0.4, 0.8], "mean")
    assert r.score == pytest.approx(1.4 / 3)
    assert r.positive is False


# ---------------------------------------------------------------- single slice, all rules


@pytest.mark.parametrize("rule", RULES)
def test_single_positive_slice(rule):
    r = apply_rule([0.8], rule)
    assert r.n_slices == 1
    assert r.positive is True  # threshold-10: 1 > 0.1 × 1; consecutive: N_eff = 1


@pytest.mark.parametrize("rule", RULES)
def test_single_negative_slice(rule):
    r = apply_rule([0.3], rule)
    assert r.positive is False
    assert 0.0 <= r.score <= 1.0


# ---------------------------------------------------------------- errors and results


@pytest.mark.parametrize(
    ("probs", "match"),
    [
        ([], "no slice probabilities"),
        ([0.2, float("nan")], "NaN"),
        ([0.2, 1.2], r"\[0, 1\]"),
        ([-0.1, 0.5], r"\[0, 1\]"),
        ([[0.1, 0.2]], "1-D"),
    ],
)
def test_invalid_probabilities(probs, match):
    with pytest.raises(ValueError, match=match):
        apply_rule(probs, "threshold-0")


def test_invalid_settings():
    with pytest.raises(ValueError, match="unknown rule"):
        apply_rule([0.5], "majority")
    with pytest.raises(ValueError, match="slice_threshold"):
        apply_rule([0.5], "mean", slice_threshold=1.5)
    with pytest.raises(ValueError, match="consecutive_n"):
        apply_rule([0.5], "consecutive", consecutive_n=0)


def test_apply_all_rules_and_to_dict_are_json_ready():
    p = _series(10, [4])
    results = apply_all_rules(p, slice_threshold=0.5)
    assert tuple(results) == RULES
    assert all(isinstance(r, RuleResult) for r in results.values())
    assert [results[r].positive for r in RULES] == [True, False, False, False]
    d = results["consecutive"].to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["rule"] == "consecutive" and d["n_slices"] == 10 and d["n_positive"] == 1
