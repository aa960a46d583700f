"""Three-class metrics, patient bootstrap, fold summaries and the evaluation files, against hand-computed values and
scikit-learn."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from lungsight.errors import InputError
from lungsight.evaluate import binary_metrics
from lungsight.evaluate.multiclass import (
    CLASS_METRICS,
    OVERALL_METRICS,
    _sorted_views,
    _weighted_multiclass,
    multiclass_bootstrap_ci,
    multiclass_fold_table_markdown,
    multiclass_metrics,
    summarize_multiclass_folds,
    write_multiclass_evaluation,
)

CLASSES = ["normal", "pneumonia", "covid"]


def _probs_for(pred: list[int], k: int = 3, seed: int = 0) -> np.ndarray:
    """Random probabilities whose argmax is ``pred``."""
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 0.3, (len(pred), k))
    p[np.arange(len(pred)), pred] = 0.6 + rng.uniform(0.0, 0.3, len(pred))
    return p / p.sum(axis=1, keepdims=True)


def _realistic(n: int = 600, seed: int = 1, k: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def check_png(path: Path, min_side: int = 300, max_side: int = 1400) -> None:
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        w, h = im.size
        arr = np.asarray(im.convert("L"))
    assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
    assert arr.std() > 5  # not a blank canvas


# Hand case. Confusion (rows true, columns predicted):
#   normal     [3, 1, 0]   support 4, predicted 3
#   pneumonia  [0, 2, 1]   support 3, predicted 4
#   covid      [0, 1, 2]   support 3, predicted 3
Y_HAND = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PRED_HAND = [0, 0, 0, 1, 1, 1, 2, 2, 2, 1]


def test_three_class_case_by_hand():
    m = multiclass_metrics(Y_HAND, _probs_for(PRED_HAND), CLASSES)
    assert m["confusion"] == [[3, 1, 0], [0, 2, 1], [0, 1, 2]]
    assert m["n"] == 10 and m["classes"] == CLASSES
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["error_rate"] == pytest.approx(3 / 10)
    pc = m["per_class"]
    assert (pc["normal"]["ppv"], pc["normal"]["recall"], pc["normal"]["f1"]) == pytest.approx((1.0, 3 / 4, 6 / 7))
    assert (pc["pneumonia"]["ppv"], pc["pneumonia"]["recall"], pc["pneumonia"]["f1"]) == pytest.approx(
        (2 / 4, 2 / 3, 4 / 7)
    )
    assert (pc["covid"]["ppv"], pc["covid"]["recall"], pc["covid"]["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))
    assert [pc[c]["support"] for c in CLASSES] == [4, 3, 3]
    assert [pc[c]["predicted"] for c in CLASSES] == [3, 4, 3]
    # balanced accuracy: (3/4 + 2/3 + 2/3) / 3 = 25/36; geometric mean: (3/4 · 2/3 · 2/3)^(1/3) = (1/3)^(1/3)
    assert m["balanced_accuracy"] == pytest.approx(25 / 36)
    assert m["gmean_recall"] == pytest.approx((1 / 3) ** (1 / 3))
    assert m["macro_f1"] == pytest.approx((6 / 7 + 4 / 7 + 2 / 3) / 3)
    assert m["macro_ppv"] == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y_HAND, PRED_HAND))
    assert m["macro_f1"] == pytest.approx(f1_score(Y_HAND, PRED_HAND, average="macro"))
    # class names work as labels too
    assert multiclass_metrics([CLASSES[i] for i in Y_HAND], _probs_for(PRED_HAND), CLASSES) == m


def test_gmean_is_zero_when_a_class_is_never_recognised():
    y = [0, 0, 1, 1, 2, 2]
    pred = [0, 0, 1, 1, 1, 0]  # covid never predicted
    m = multiclass_metrics(y, _probs_for(pred), CLASSES)
    assert m["per_class"]["covid"]["recall"] == 0.0
    assert m["gmean_recall"] == 0.0
    assert m["balanced_accuracy"] == pytest.approx(2 / 3)
    assert m["per_class"]["covid"]["ppv"] is None  # nothing predicted covid
    assert m["per_class"]["covid"]["f1"] == 0.0


def test_auc_per_class_matches_sklearn_on_random_data():
    y, p = _realistic(500, seed=4)
    m = multiclass_metrics(y, p, CLASSES)
    for k, c in enumerate(CLASSES):
        assert m["per_class"][c]["auc"] == pytest.approx(roc_auc_score(y == k, p[:, k]), abs=1e-12)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))


def test_absent_class_is_left_out_of_the_macro_means():
    rng = np.random.default_rng(2)
    y = np.array([0] * 10 + [1] * 10)  # no covid image
    p = rng.dirichlet([1, 1, 1], size=20)
    p[:10, 0] += 0.5
    m = multiclass_metrics(y, p, CLASSES)
    cov = m["per_class"]["covid"]
    assert cov["auc"] is None and cov["recall"] is None and cov["support"] == 0
    aucs = [roc_auc_score(y == k, p[:, k]) for k in (0, 1)]
    assert m["macro_auc"] == pytest.approx(np.mean(aucs))
    recalls = [m["per_class"][c]["recall"] for c in ("normal", "pneumonia")]
    assert m["balanced_accuracy"] == pytest.approx(np.mean(recalls))
    assert m["gmean_recall"] == pytest.approx(math.sqrt(recalls[0] * recalls[1]))
    if cov["predicted"]:  # predicted but absent: a wrong answer, F1 0 counted in the macro F1
        assert cov["f1"] == 0.0 and cov["ppv"] == 0.0
    json.dumps(m, allow_nan=False)
    # a single class present: no AUC at all
    one = multiclass_metrics([1, 1, 1], _probs_for([1, 0, 1]), CLASSES)
    assert one["macro_auc"] is None and one["per_class"]["pneumonia"]["auc"] is None
    assert one["balanced_accuracy"] == pytest.approx(2 / 3) and one["gmean_recall"] == pytest.approx(2 / 3)


def test_binary_model_agrees_with_binary_metrics():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 200)
    s = np.clip(0.3 + 0.35 * y + rng.normal(0, 0.2, 200), 0.01, 0.99)
    s[s == 0.5] = 0.51  # at exactly 0.5 the argmax picks the first class, binary_metrics the positive one
    m = multiclass_metrics(y, s, ["non-covid", "covid"])  # 1-D: probability of the second class
    b = binary_metrics(y, s)
    assert m == multiclass_metrics(y, np.column_stack([1 - s, s]), ["non-covid", "covid"])
    assert m["accuracy"] == pytest.approx(b["accuracy"])
    assert m["per_class"]["covid"]["recall"] == pytest.approx(b["sensitivity"])
    assert m["per_class"]["non-covid"]["recall"] == pytest.approx(b["specificity"])
    assert m["per_class"]["covid"]["ppv"] == pytest.approx(b["precision"])
    assert m["per_class"]["covid"]["f1"] == pytest.approx(b["f1"])
    assert m["per_class"]["covid"]["auc"] == pytest.approx(b["auc"])
    assert m["balanced_accuracy"] == pytest.approx((b["sensitivity"] + b["specificity"]) / 2)


def test_invalid_inputs():
    p = _probs_for([0, 1])
    with pytest.raises(ValueError, match="empty"):
        multiclass_metrics([], np.zeros((0, 3)), CLASSES)
    with pytest.raises(ValueError, match="outside"):
        multiclass_metrics([0, 3], p, CLASSES)
    with pytest.raises(ValueError, match="not in"):
        multiclass_metrics(["normal", "cat"], p, CLASSES)
    with pytest.raises(ValueError, match="shape"):
        multiclass_metrics([0, 1, 2], p, CLASSES)
    with pytest.raises(ValueError, match="NaN"):
        multiclass_metrics([0, 1], np.array([[0.5, 0.5, np.nan], [0.1, 0.8, 0.1]]), CLASSES)
    with pytest.raises(ValueError, match="two classes"):
        multiclass_metrics([0], [[1.0]], ["normal"])
    with pytest.raises(ValueError, match="unique"):
        multiclass_metrics([0, 1], p, ["a", "a", "b"])


# ---------------------------------------------------------------- bootstrap


def test_weighted_resample_metrics_equal_metrics_on_the_resampled_rows():
    y, p = _realistic(150, seed=3)
    p = np.round(p, 1)  # many ties in the AUCs
    views = _sorted_views(y, p)
    correct = (p.argmax(1) == y).astype(float)
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        w = np.bincount(idx, minlength=y.size).astype(float)[None, :]
        overall, per_class = _weighted_multiclass(w, correct, views)
        want = multiclass_metrics(y[idx], p[idx], CLASSES)
        for key in OVERALL_METRICS:
            assert overall[key][0] == pytest.approx(want[key], abs=1e-12), key
        for k, c in enumerate(CLASSES):
            for key in CLASS_METRICS:
                assert per_class[k][key][0] == pytest.approx(want["per_class"][c][key], abs=1e-12), (c, key)


def test_bootstrap_contains_point_estimate_and_is_reproducible():
    y, p = _realistic()
    groups = np.repeat(np.arange(150), 4)
    point = multiclass_metrics(y, p, CLASSES)
    ci = multiclass_bootstrap_ci(y, p, groups, CLASSES, OVERALL_METRICS, n_boot=400, seed=7)
    for key in OVERALL_METRICS:
        lo, hi = ci[key]
        assert lo <= point[key] <= hi, key
        assert 0 < hi - lo < 0.2, key
    for c in CLASSES:
        for key in CLASS_METRICS:
            lo, hi = ci["per_class"][c][key]
            assert lo <= point["per_class"][c][key] <= hi, (c, key)
    assert ci["resample_unit"] == "group" and ci["n_boot"] == 400
    assert ci["n_boot_used"]["accuracy"] == 400
    assert multiclass_bootstrap_ci(y, p, groups, CLASSES, OVERALL_METRICS, n_boot=400, seed=7) == ci
    json.dumps(ci, allow_nan=False)


def test_bootstrap_narrows_with_more_patients():
    y, p = _realistic(200, seed=6)
    few = multiclass_bootstrap_ci(y, p, np.repeat(np.arange(50), 4), CLASSES, n_boot=400, seed=1)
    # the same images four times over, from four times as many patients
    y4, p4 = np.tile(y, 4), np.tile(p, (4, 1))
    many = multiclass_bootstrap_ci(y4, p4, np.repeat(np.arange(200), 4), CLASSES, n_boot=400, seed=1)
    for key in ("accuracy", "balanced_accuracy", "gmean_recall", "macro_auc", "macro_f1"):
        w_few, w_many = few[key][1] - few[key][0], many[key][1] - many[key][0]
        assert w_many < 0.7 * w_few, (key, w_few, w_many)  # about half, as 1/sqrt(4)


def test_bootstrap_skips_resamples_where_a_class_is_absent():
    y = np.array([0] * 10 + [1] * 9 + [2])  # one covid image
    p = _probs_for([*[0] * 10, *[1] * 9, 2])
    ci = multiclass_bootstrap_ci(y, p, None, CLASSES, n_boot=300, seed=0)
    used = ci["n_boot_used"]["per_class"]["covid"]["recall"]
    assert 160 < used < 230  # (19/20)^20 ≈ 36 % of resamples lack it, so about 192 have it
    assert ci["per_class"]["covid"]["auc"] == [1.0, 1.0]
    assert ci["n_boot_used"]["balanced_accuracy"] == 300  # averaged over the classes each resample has
    assert ci["resample_unit"] == "row"


def test_bootstrap_speed_and_arguments():
    y, p = _realistic()
    t0 = time.perf_counter()
    multiclass_bootstrap_ci(y, p, np.repeat(np.arange(60), 10), CLASSES, OVERALL_METRICS, n_boot=1000)
    assert time.perf_counter() - t0 < 5.0
    with pytest.raises(ValueError, match="unknown metric"):
        multiclass_bootstrap_ci(y, p, None, CLASSES, ("accuracy", "sensitivity"))
    with pytest.raises(ValueError, match="n_boot"):
        multiclass_bootstrap_ci(y, p, None, CLASSES, n_boot=0)
    with pytest.raises(ValueError, match="groups"):
        multiclass_bootstrap_ci(y, p, ["a"], CLASSES)


# ---------------------------------------------------------------- folds


def test_fold_summary_and_table():
    f1 = multiclass_metrics(Y_HAND, _probs_for(PRED_HAND), CLASSES)
    f2 = multiclass_metrics([0, 1, 2, 2], _probs_for([0, 1, 2, 2]), CLASSES)  # perfect
    s = summarize_multiclass_folds([f1, f2])
    assert s["accuracy"]["mean"] == pytest.approx((0.7 + 1.0) / 2)
    assert s["accuracy"]["sd"] == pytest.approx(np.std([0.7, 1.0], ddof=1))
    assert s["per_class"]["pneumonia"]["ppv"]["mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert s["per_class"]["covid"]["support"]["mean"] == pytest.approx(2.5)
    assert s["confusion_sum"] == [[4, 1, 0], [0, 3, 1], [0, 1, 4]]
    assert "classes" not in s and "confusion" not in s
    table = multiclass_fold_table_markdown([f1, f2])
    assert "| mean ± sd | 0.850 ± 0.212 |" in table
    assert "| pneumonia | 0.750 ± 0.354 |" in table


# ---------------------------------------------------------------- files


def test_write_multiclass_evaluation(tmp_path):
    y, p = _realistic(120, seed=8)
    patients = [f"P{i // 3:03d}" for i in range(120)]
    rng = np.random.default_rng(0)
    attrs = {
        "sex": rng.choice(["M", "F", ""], 120).tolist(),
        "source": ["cohen"] * 90 + ["actualmed"] * 30,
        "view": rng.choice(["AP", "PA"], 120).tolist(),
    }
    emb = np.eye(3)[y] * 4 + rng.normal(0, 1, (120, 3))
    out = tmp_path / "eval"
    m = write_multiclass_evaluation(
        out,
        y,
        p,
        CLASSES,
        patients,
        attributes=attrs,
        by=["sex", "source"],
        embeddings=emb,
        extra={"model": "x"},
        n_boot=200,
    )
    names = {f.name for f in out.iterdir()}
    assert names == {
        "metrics.json",
        "predictions.csv",
        "roc.png",
        "confusion.png",
        "tsne_class.png",
        "tsne_source.png",
        *(f"bias_{k}.{e}" for k in ("sex", "source") for e in ("json", "md", "png")),
    }
    for png in out.glob("*.png"):
        check_png(png)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert m["model"] == "x" and m["n_patients"] == 40
    assert m["accuracy"] == multiclass_metrics(y, p, CLASSES)["accuracy"]
    assert m["ci95"]["resample_unit"] == "group" and m["ci95"]["accuracy"][0] <= m["accuracy"]
    assert set(m["by"]) == {"sex", "source"}
    assert {g["value"] for g in m["by"]["sex"]["groups"]} == {"M", "F", "unknown"}

    with (out / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 120
    assert list(rows[0])[:8] == ["index", "patient", "true", "predicted", "correct", *(f"p_{c}" for c in CLASSES)]
    assert {"sex", "source", "view", "tsne_x", "tsne_y"} <= set(rows[0])
    assert rows[5]["patient"] == "P001" and rows[5]["true"] == CLASSES[y[5]]
    assert rows[5]["predicted"] == CLASSES[p[5].argmax()] and float(rows[5]["p_covid"]) == pytest.approx(p[5, 2])
    assert sum(int(r["correct"]) for r in rows) == round(m["accuracy"] * 120)


def test_write_without_source_or_embeddings_and_bad_by(tmp_path):
    y, p = _realistic(30, seed=9)
    patients = [f"P{i}" for i in range(30)]
    m = write_multiclass_evaluation(tmp_path / "a", y, p, CLASSES, patients, n_boot=50)
    assert "by" not in m
    assert {f.name for f in (tmp_path / "a").iterdir()} == {
        "metrics.json",
        "predictions.csv",
        "roc.png",
        "confusion.png",
    }
    write_multiclass_evaluation(tmp_path / "b", y, p, CLASSES, patients, embeddings=p, n_boot=50)
    assert (tmp_path / "b" / "tsne_class.png").is_file() and not (tmp_path / "b" / "tsne_source.png").exists()

    with pytest.raises(InputError, match=r"--by sensor: no such attribute .*known: sex"):
        write_multiclass_evaluation(
            tmp_path / "c", y, p, CLASSES, patients, attributes={"sex": ["M"] * 30}, by=["sensor"], n_boot=50
        )
    assert not (tmp_path / "c").exists()  # nothing written
    with pytest.raises(ValueError, match="attribute 'sex' has 2 values"):
        write_multiclass_evaluation(tmp_path / "d", y, p, CLASSES, patients, attributes={"sex": ["M", "F"]})
    with pytest.raises(ValueError, match="embeddings"):
        write_multiclass_evaluation(tmp_path / "e", y, p, CLASSES, patients, embeddings=np.zeros((3, 2)))
