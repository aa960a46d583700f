"""Bias audit: metrics and errors split by an image attribute, on crafted cases and on the real X-ray metadata."""

from __future__ import annotations

import csv
import json
from math import comb

import numpy as np
import pytest

from lungsight.evaluate.bias import (
    error_rate_test,
    group_report,
    group_report_markdown,
    group_values,
    write_group_report,
)
from test_multiclass import check_png

CLASSES = ["normal", "pneumonia", "covid"]


def _onehot_probs(pred: np.ndarray, k: int = 3) -> np.ndarray:
    p = np.full((pred.size, k), 0.1)
    p[np.arange(pred.size), pred] = 0.8
    return p


def _crafted() -> tuple[np.ndarray, np.ndarray, list, list[str]]:
    """Group A: 10 images of 5 patients, all right. Group B: 10 images of 5 patients, all wrong. Two images with no
    value (one right, one wrong) of one patient."""
    y_group = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    y = np.concatenate([y_group, y_group, [2, 2]])
    pred = np.concatenate([y_group, (y_group + 1) % 3, [2, 0]])
    values = ["A"] * 10 + ["B"] * 10 + [None, ""]
    patients = [f"A{i // 2}" for i in range(10)] + [f"B{i // 2}" for i in range(10)] + ["U", "U"]
    return y, _onehot_probs(pred), values, patients


def test_group_values_maps_missing_to_unknown():
    assert group_values(["M", " F ", None, float("nan"), "", "NaN", "n/a", "Unknown", 3]) == [
        "M",
        "F",
        *["unknown"] * 6,
        "3",
    ]


def test_group_report_on_a_group_that_is_all_wrong():
    y, p, values, patients = _crafted()
    r = group_report(y, p, CLASSES, values, patients, min_n=5, n_boot=200, name="sex")
    assert r["attribute"] == "sex" and r["n"] == 22
    a, b, unk = r["groups"]
    assert [g["value"] for g in r["groups"]] == ["A", "B", "unknown"]  # largest first, unknown last

    assert (a["n"], a["n_patients"], a["errors"], a["error_rate"]) == (10, 5, 0, 0.0)
    assert a["accuracy"] == 1.0 and a["balanced_accuracy"] == 1.0 and a["macro_auc"] == 1.0
    assert (b["errors"], b["error_rate"], b["accuracy"], b["balanced_accuracy"]) == (10, 1.0, 0.0, 0.0)
    assert b["recall"] == dict.fromkeys(CLASSES, 0.0)
    assert b["support"] == {"normal": 4, "pneumonia": 3, "covid": 3}
    assert b["share_of_images"] == pytest.approx(10 / 22)
    assert b["share_of_errors"] == pytest.approx(10 / 11)
    assert unk["share_of_errors"] == pytest.approx(1 / 11)

    # a group of 2 images is reported but flagged, with no interval
    assert unk["too_few"] and unk["note"] == "too few to compare (n < 5)" and unk["ci95"] is None
    assert not a["too_few"] and not b["too_few"]
    # no errors (or only errors): the bootstrap interval would be a point, the exact binomial one is 1 − 0.025^(1/10)
    assert a["ci95"]["error_rate"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 10)])
    assert b["ci95"]["error_rate"] == pytest.approx([0.025 ** (1 / 10), 1.0])
    assert a["ci95"]["accuracy"] == pytest.approx([0.025 ** (1 / 10), 1.0])
    assert a["ci95"]["error_rate_method"].startswith("Clopper-Pearson")

    # Table VI for covid: 8 images (3 A, 3 B, 2 unknown), 4 errors (3 in B, 1 unknown)
    cov = r["error_distribution"]["covid"]
    assert (cov["n"], cov["errors"]) == (8, 4)
    assert cov["share_of_images"] == pytest.approx({"A": 3 / 8, "B": 3 / 8, "unknown": 2 / 8})
    assert cov["share_of_errors"] == pytest.approx({"A": 0.0, "B": 3 / 4, "unknown": 1 / 4})

    # Fisher's exact test on A vs B (unknown left out): [[0, 10], [10, 0]] has two-sided p = 2 / C(20, 10)
    t = r["test"]
    assert t["groups"] == ["A", "B"] and t["table"] == [[0, 10], [10, 0]]
    assert t["test"].startswith("Fisher's exact")
    assert t["p_value"] == pytest.approx(2 / comb(20, 10))
    assert t["conclusion"].startswith("error rates differ")
    assert "images of one patient are not" in t["caveat"]
    json.dumps(r, allow_nan=False)


def test_bootstrap_interval_for_a_mixed_group():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80)
    pred = np.where(rng.random(80) < 0.75, y, (y + 1) % 3)
    patients = [f"P{i // 2}" for i in range(80)]
    r = group_report(y, _onehot_probs(pred), CLASSES, ["AP"] * 40 + ["PA"] * 40, patients, n_boot=300)
    for g in r["groups"]:
        ci = g["ci95"]
        assert ci["error_rate_method"] == "patient bootstrap"
        assert ci["error_rate"][0] <= g["error_rate"] <= ci["error_rate"][1]
        assert ci["error_rate"] == pytest.approx([1 - ci["accuracy"][1], 1 - ci["accuracy"][0]])
        assert ci["balanced_accuracy"][0] <= g["balanced_accuracy"] <= ci["balanced_accuracy"][1]


def test_more_than_two_groups_use_a_seeded_monte_carlo_exact_test():
    rng = np.random.default_rng(1)
    values = ["CR"] * 60 + ["DX"] * 60 + ["other"] * 60
    wrong = rng.random(180) < 0.2  # same error rate everywhere
    t = error_rate_test(values, wrong, seed=3)
    assert t["test"].startswith("Fisher-Freeman-Halton") and t["p_value"] > 0.05
    assert error_rate_test(values, wrong, seed=3) == t
    assert t["conclusion"].startswith("no evidence")
    wrong[:60] = True  # every CR image wrong
    assert error_rate_test(values, wrong, seed=3)["p_value"] < 0.001


def test_nothing_to_compare():
    t = error_rate_test(["M", "F", "M"], [False, False, False])
    assert t["p_value"] is None and t["test"] is None and "no errors" in t["conclusion"]
    t = error_rate_test(["M", "unknown", "M"], [True, False, False])
    assert t["p_value"] is None and "fewer than two" in t["conclusion"]


def test_invalid_inputs():
    y, p, values, patients = _crafted()
    with pytest.raises(ValueError, match="one attribute value"):
        group_report(y, p, CLASSES, values[:-1], patients)
    with pytest.raises(ValueError, match="min_n"):
        group_report(y, p, CLASSES, values, patients, min_n=0)


def test_markdown_and_files(tmp_path):
    y, p, values, patients = _crafted()
    r = group_report(y, p, CLASSES, values, patients, n_boot=100, name="view")
    md = group_report_markdown(r)
    assert md.startswith("# Errors and metrics by view")
    assert "| B | 10 | 5 | 10 | 1.000 [0.692, 1.000] * |" in md
    assert "too few to compare (n < 5)" in md
    assert "| covid | 8 | 4 | 37.5 / 0.0 | 37.5 / 75.0 | 25.0 / 25.0 |" in md
    assert "Fisher's exact test, two-sided on A, B: error rates differ" in md
    paths = write_group_report(tmp_path, "view", r)
    assert {k: v.name for k, v in paths.items()} == {
        "json": "bias_view.json",
        "md": "bias_view.md",
        "png": "bias_view.png",
    }
    assert json.loads(paths["json"].read_text())["groups"][1]["errors"] == 10
    check_png(paths["png"])


def test_real_cohen_metadata_sex_and_view(shared_data, tmp_path):
    """The audit on the real Cohen metadata (its sex and view columns, with their gaps), predictions made up."""
    meta = shared_data / "cxr-cohen" / "metadata.csv"
    if not meta.is_file():
        pytest.skip(f"{meta} is absent")
    with meta.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    finding = [r["finding"] for r in rows]
    y = np.array([2 if "COVID-19" in f else 0 if f.strip() == "No Finding" else 1 for f in finding])
    rng = np.random.default_rng(0)
    pred = np.where(rng.random(y.size) < 0.7, y, rng.integers(0, 3, y.size))
    p = _onehot_probs(pred)
    patients = [r["patientid"] for r in rows]
    seen = {}
    for key in ("sex", "view"):
        r = group_report(y, p, CLASSES, [row[key] for row in rows], patients, n_boot=100, name=key)
        seen[key] = {g["value"]: g["n"] for g in r["groups"]}
        expected: dict[str, int] = {}
        for row in rows:
            v = row[key].strip() or "unknown"
            expected[v] = expected.get(v, 0) + 1
        assert seen[key] == expected
        assert sum(g["errors"] for g in r["groups"]) == int((pred != y).sum())
        assert all(g["too_few"] == (g["n"] < 5) for g in r["groups"])
        assert r["test"]["p_value"] is not None
        write_group_report(tmp_path, key, r)
    assert {"M", "F"} <= set(seen["sex"]) and {"AP", "PA"} <= set(seen["view"])
    check_png(tmp_path / "bias_view.png")
