"""Calibration: hand-computed ECE, temperature fitting, and the calibrate command on a small fake CV run folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.special import softmax

from lungsight.cli import main
from lungsight.errors import InputError
from lungsight.evaluate.calibration import (
    apply_temperature,
    brier,
    calibrate_run,
    classwise_ece,
    ece,
    ece_change_ci,
    fit_temperature,
    logits_from_probs,
    nll,
    read_prediction_csv,
    rebuild_val_predictions,
    reliability,
)
from lungsight.evaluate.plots import plot_reliability
from lungsight.fileio import atomic_write_csv, atomic_write_json

# positive-class probabilities and truth of four cases; 5 bins of width 0.2 (no value lies on a bin edge)
P_POS = np.array([0.9, 0.75, 0.35, 0.55])
Y = np.array([1, 0, 0, 1])
PROBS = np.column_stack([1 - P_POS, P_POS])


def test_top_label_ece_by_hand() -> None:
    # top-label confidences 0.9 (right), 0.75 (wrong), 0.65 (right), 0.55 (right)
    # bin (0.4, 0.6]: 0.55, acc 1 -> 0.45; bin (0.6, 0.8]: mean conf 0.7, acc 0.5 -> 0.2; bin (0.8, 1]: 0.9, acc 1
    expected = 0.45 * 1 / 4 + 0.2 * 2 / 4 + 0.1 * 1 / 4
    assert ece(PROBS, Y, bins=5) == pytest.approx(expected)
    table = reliability(PROBS, Y, bins=5)
    assert table["count"] == [0, 0, 1, 2, 1]
    assert table["accuracy"][3] == pytest.approx(0.5) and table["confidence"][3] == pytest.approx(0.7)
    assert table["accuracy"][0] is None


def test_classwise_ece_of_the_positive_class_by_hand() -> None:
    # each case alone in its bin: |y - p| = 0.1, 0.75, 0.35, 0.45
    assert classwise_ece(PROBS, Y, 1, bins=5) == pytest.approx((0.1 + 0.75 + 0.35 + 0.45) / 4)


def test_nll_and_brier_by_hand() -> None:
    assert nll(PROBS, Y) == pytest.approx(-np.mean(np.log([0.9, 0.25, 0.65, 0.55])))
    assert brier(PROBS, Y) == pytest.approx(np.mean([0.01, 0.5625, 0.1225, 0.2025]))


def test_perfectly_calibrated_bins_give_zero_ece() -> None:
    probs = np.array([[0.25, 0.75]] * 4)
    assert ece(probs, [1, 1, 1, 0], bins=10) == pytest.approx(0.0)


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(true_t: float) -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(scale=3.0, size=(20000, 3))
    y = np.array([rng.choice(3, p=q) for q in softmax(z / true_t, axis=1)])
    assert fit_temperature(z, y) == pytest.approx(true_t, rel=0.06)


@pytest.mark.parametrize("seed", range(6))
def test_temperature_scaling_never_raises_the_nll_it_was_fitted_on(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 60))
    probs = softmax(rng.normal(scale=rng.uniform(0.1, 8), size=(n, 2)), axis=1)
    y = rng.integers(0, 2, n)
    z = logits_from_probs(probs)
    t = fit_temperature(z, y)
    after = apply_temperature(z, t)
    assert t > 0
    assert nll(after, y) <= nll(probs, y) + 1e-9
    assert (after.argmax(axis=1) == probs.argmax(axis=1)).all()  # the decision never changes


def test_ece_change_interval_is_zero_without_change() -> None:
    assert ece_change_ci(PROBS, PROBS, Y, ["a", "a", "b", "c"], bins=5, n_boot=50) == [0.0, 0.0]


def test_apply_temperature_refuses_non_positive_t() -> None:
    with pytest.raises(ValueError):
        apply_temperature(np.zeros((1, 2)), 0.0)


def test_reliability_plot_is_written(tmp_path: Path) -> None:
    out = plot_reliability({"model": reliability(PROBS, Y, bins=5)}, tmp_path / "r.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fold(d: Path, k: int, rng: np.random.Generator, n: int, *, val: bool = True) -> None:
    """A fold of an over-confident model: true probability softmax(z), stored probability softmax(3 z)."""

    def rows(m: int) -> list[dict[str, object]]:
        z = rng.normal(size=(m, 2))
        y = np.array([rng.choice(2, p=q) for q in softmax(z, axis=1)])
        p = softmax(3 * z, axis=1)
        labels = ["non-covid", "covid"]
        return [
            {
                "file": f"f{k}_{i}.png",
                "patient_id": f"P{k}_{i}",
                "label": labels[y[i]],
                "fold": k,
                "p": p[i, 1],
                "p_non-covid": p[i, 0],
                "p_covid": p[i, 1],
            }
            for i in range(m)
        ]

    fold = d / f"fold_{k}"
    atomic_write_csv(fold / "predictions.csv", rows(n))
    if val:
        atomic_write_csv(fold / "val_predictions.csv", rows(n))
    atomic_write_json(fold / "done.json", {"fold": k})


def test_calibrate_run_fits_each_fold_and_lowers_ece(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for k in (1, 2):
        _fold(tmp_path, k, rng, 400)
    (tmp_path / "fold_3").mkdir()  # an unfinished fold (no done.json) is left out
    r = calibrate_run(tmp_path, bins=10)
    assert [f["fold"] for f in r["folds"]] == ["fold_1", "fold_2"]
    assert all(2.0 < t < 4.5 for t in r["temperatures"])  # the stored probabilities were sharpened 3x
    assert r["pooled"]["after"]["ece"] < r["pooled"]["before"]["ece"]
    assert r["pooled"]["after"]["nll"] < r["pooled"]["before"]["nll"]
    assert r["pooled"]["ece_change_ci95"][1] < 0  # the drop is beyond resampling noise
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert saved["pooled"]["n"] == 800 and saved["positive_class"] == "covid"
    with open(tmp_path / "cv_predictions_calibrated.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 800 and float(rows[0]["p"]) == pytest.approx(float(rows[0]["p_covid"]))
    assert (tmp_path / "reliability.png").stat().st_size > 1000
    assert "pooled" in (tmp_path / "calibration.md").read_text()


def test_calibrate_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    _fold(tmp_path, 1, rng, 50)
    assert main(["calibrate", str(tmp_path), "--bins", "10"]) == 0
    out = capsys.readouterr().out
    assert "ECE" in out and "temperatures:" in out


def test_calibrate_command_without_validation_predictions_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _fold(tmp_path, 1, np.random.default_rng(3), 20, val=False)
    assert main(["calibrate", str(tmp_path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lungsight: error:") and "val_predictions.csv" in err and "\n" not in err
    assert main(["calibrate", str(tmp_path / "nothing")]) != 0


@pytest.mark.slow
def test_a_cv_run_with_holdout_writes_what_calibrate_and_ensemble_need(covid_ct_dir: Path, tmp_path: Path) -> None:
    from lungsight.train.trainer import TrainConfig, train

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(covid_ct_dir.parent),
        model="resnet18",
        out=str(run),
        folds=2,
        epochs=1,
        input_size=32,
        augment="none",
        max_patients=24,
        holdout=0.25,
        workers=0,
        threads=1,
    )
    train(cfg)
    with open(run / "holdout.csv", newline="") as f:
        held = {r["patient_id"] for r in csv.DictReader(f)}
    with open(run / "cv_predictions.csv", newline="") as f:
        trained = {r["patient_id"] for r in csv.DictReader(f)}
    assert held and trained and not held & trained
    for k in (1, 2):
        with open(run / f"fold_{k}" / "val_predictions.csv", newline="") as f:
            val = list(csv.DictReader(f))
        with open(run / f"fold_{k}" / "predictions.csv", newline="") as f:
            test = list(csv.DictReader(f))
        assert val and list(val[0]) == list(test[0])  # same columns as predictions.csv
        assert not {r["patient_id"] for r in val} & {r["patient_id"] for r in test}
    assert len(calibrate_run(run)["folds"]) == 2


@pytest.mark.slow
def test_rebuilt_validation_predictions_match_the_trainers(covid_ct_dir: Path, tmp_path: Path) -> None:
    from lungsight.train.trainer import TrainConfig, train

    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(covid_ct_dir.parent),
        model="resnet18",
        out=str(run),
        folds=2,
        epochs=1,
        input_size=32,
        augment="none",
        max_patients=16,
        workers=0,
        threads=1,
    )
    train(cfg)
    original = run / "fold_2" / "val_predictions.csv"
    kept = tmp_path / "kept.csv"
    original.rename(kept)
    assert rebuild_val_predictions(run) == [original]  # fold 1 already had its file
    (before, _), (after, _) = read_prediction_csv(kept), read_prediction_csv(original)
    assert [r["file"] for r in after] == [r["file"] for r in before]
    assert [float(r["p"]) for r in after] == pytest.approx([float(r["p"]) for r in before], abs=1e-5)
    # a fold whose stored test split no longer matches the data is refused
    (run / "fold_2" / "val_predictions.csv").unlink()
    rows = (run / "fold_2" / "predictions.csv").read_text().splitlines()
    (run / "fold_2" / "predictions.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(InputError, match="differs"):
        rebuild_val_predictions(run)
