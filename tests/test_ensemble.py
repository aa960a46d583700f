"""Fold ensembles: mean and disagreement on a toy, uncertainty against errors, and the refusal of evaluation data that
the run's models were trained on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_tiny_model
from lungsight.cli import main
from lungsight.errors import InputError
from lungsight.evaluate.ensemble import (
    compare_ensemble,
    ensemble_gain_ci,
    ensemble_stats,
    evaluate_ensemble,
    uncertainty_vs_errors,
)
from lungsight.fileio import atomic_write_csv, atomic_write_json
from lungsight.train.data import Item
from lungsight.train.trainer import hold_out

A = np.array([[0.2, 0.8], [0.6, 0.4]])
B = np.array([[0.4, 0.6], [0.6, 0.4]])


def _h(p: list[float]) -> float:
    return float(-sum(x * np.log(x) for x in p))


def test_two_member_mean_sd_entropy_and_mutual_information() -> None:
    s = ensemble_stats(np.stack([A, B]), positive=1)
    assert s["mean"] == pytest.approx(np.array([[0.3, 0.7], [0.6, 0.4]]))
    assert s["sd_positive"] == pytest.approx([0.1, 0.0])
    assert s["entropy"] == pytest.approx([_h([0.3, 0.7]), _h([0.6, 0.4])])
    mi_first = _h([0.3, 0.7]) - (_h([0.2, 0.8]) + _h([0.4, 0.6])) / 2
    assert s["mutual_information"] == pytest.approx([mi_first, 0.0], abs=1e-12)
    assert mi_first > 0


def test_uncertainty_against_errors_by_hand() -> None:
    r = uncertainty_vs_errors([0.3, 0.2, 0.05, 0.1], [True, True, False, False])
    assert r["mean_on_errors"] == pytest.approx(0.25) and r["mean_on_correct"] == pytest.approx(0.075)
    assert r["error_detection_auc"] == pytest.approx(1.0)
    assert uncertainty_vs_errors([0.1, 0.2], [False, False])["error_detection_auc"] is None


def test_compare_ensemble_beats_members_that_err_differently() -> None:
    # each member is wrong on a different case; their mean is right on all four
    y = np.array([1, 1, 0, 0])
    m1 = np.array([[0.1, 0.9], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1]])
    m2 = np.array([[0.6, 0.4], [0.1, 0.9], [0.9, 0.1], [0.8, 0.2]])
    r = compare_ensemble(np.stack([m1, m2]), y, positive=1)
    assert r["ensemble"]["accuracy"] == 1.0 and r["single_mean"]["accuracy"] == 0.75
    assert r["members"] == 2 and r["n"] == 4
    assert r["uncertainty"]["sd_positive"]["n_errors"] == 0


def test_gain_interval_is_zero_for_identical_members_and_positive_for_complementary_ones() -> None:
    y = np.array([1, 1, 0, 0, 1, 0])
    m1 = np.array([[0.1, 0.9], [0.6, 0.4], [0.8, 0.2], [0.9, 0.1], [0.3, 0.7], [0.7, 0.3]])
    m2 = np.array([[0.6, 0.4], [0.1, 0.9], [0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.6, 0.4]])
    patients = ["a", "a", "b", "c", "d", "e"]
    same = ensemble_gain_ci(np.stack([m1, m1]), y, patients, n_boot=200)
    assert same["auc"] == [0.0, 0.0] and same["accuracy"] == [0.0, 0.0]
    gain = ensemble_gain_ci(np.stack([m1, m2]), y, patients, n_boot=200)
    assert gain["accuracy"][0] >= 0 and gain["accuracy"][1] > 0
    assert gain["resample_unit"] == "patient"


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8) // 2 + value).save(path)


@pytest.fixture()
def run_and_data(tmp_path: Path) -> tuple[Path, Path]:
    """A 2-fold run folder (random tiny models) trained on patients A and B, and a data folder with A, C and D."""
    data = tmp_path / "data"
    rows = []
    for pid, label in (("A", "covid"), ("C", "covid"), ("D", "non-covid"), ("E", "non-covid")):
        for i in range(2):
            name = f"{pid}_{i}.png"
            _png(data / "images" / name, 10 * i + ord(pid))
            rows.append({"file": name, "label": label, "patient_id": pid})
    atomic_write_csv(data / "labels.csv", rows)
    run = tmp_path / "run"
    for k in (1, 2):
        write_tiny_model(run / f"fold_{k}" / "best.safetensors", seed=k)
        atomic_write_json(run / f"fold_{k}" / "done.json", {"fold": k})
    trained = [
        {"file": "/elsewhere/A_0.png", "patient_id": "A", "label": "covid", "p": 0.5},
        {"file": "/elsewhere/B_0.png", "patient_id": "B", "label": "non-covid", "p": 0.5},
    ]
    atomic_write_csv(run / "cv_predictions.csv", trained)
    return run, data


def test_ensemble_refuses_data_the_run_trained_on(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = run_and_data
    with pytest.raises(InputError, match="optimistic"):
        evaluate_ensemble(run, tmp_path / "out", data=data)
    assert not (tmp_path / "out").exists()


def test_ensemble_command_refusal_is_one_line(
    run_and_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, data = run_and_data
    assert main(["ensemble", str(run), "--data", str(data), "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lungsight: error:") and "--unseen-only" in err and "\n" not in err


def test_ensemble_scores_only_unseen_patients(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = run_and_data
    out = tmp_path / "out"
    folds = [{"fold": "fold_1", "temperature": 2.0}, {"fold": "fold_2", "temperature": 0.5}]
    atomic_write_json(run / "calibration.json", {"folds": folds})
    assert main(["ensemble", str(run), "--data", str(data), "--out", str(out), "--unseen-only"]) == 0
    r = json.loads((out / "ensemble.json").read_text())
    ts = r["temperature_scaling"]
    assert ts["temperatures"] == [2.0, 0.5] and set(ts["ensemble_after"]) == {"ece", "ece_positive", "nll", "brier"}
    assert r["dropped_seen"] == 2 and r["n"] == 6 and r["patients"] == 3 and r["members"] == 2
    assert set(r["gain_ci95"]) >= {"auc", "accuracy"}
    with open(out / "ensemble_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {row["patient_id"] for row in rows} == {"C", "D", "E"}
    for row in rows:  # the stored mean and sd are those of the two members' columns
        m = [float(row["p_member_1"]), float(row["p_member_2"])]
        assert float(row["p_covid"]) == pytest.approx(np.mean(m))
        assert float(row["sd_positive"]) == pytest.approx(np.std(m))
    assert (out / "uncertainty.png").read_bytes()[:4] == b"\x89PNG"


def test_ensemble_without_data_needs_a_holdout(run_and_data: tuple[Path, Path], tmp_path: Path) -> None:
    run, data = run_and_data
    with pytest.raises(InputError, match="holdout"):
        evaluate_ensemble(run, tmp_path / "out")
    atomic_write_csv(
        run / "holdout.csv",
        [
            {"file": str(data / "images" / "C_0.png"), "label": "covid", "patient_id": "C"},
            {"file": str(data / "images" / "D_1.png"), "label": "non-covid", "patient_id": "D"},
        ],
    )
    r = evaluate_ensemble(run, tmp_path / "out")
    assert r["n"] == 2 and r["dropped_seen"] == 0 and r["data"].endswith("holdout.csv")


def test_hold_out_keeps_whole_patients_out_and_is_deterministic(tmp_path: Path) -> None:
    items = [
        Item(Path(f"/x/{p}_{i}.png"), "covid" if p % 2 else "non-covid", f"P{p}") for p in range(20) for i in range(3)
    ]
    rest = hold_out(items, 0.2, 0, tmp_path / "holdout.csv")
    with open(tmp_path / "holdout.csv", newline="") as f:
        held = list(csv.DictReader(f))
    held_patients = {r["patient_id"] for r in held}
    assert held_patients and not held_patients & {it.patient_id for it in rest}
    assert len(rest) + len(held) == len(items)
    assert {r["label"] for r in held} == {"covid", "non-covid"}
    assert hold_out(items, 0.2, 0, tmp_path / "again.csv") == rest
    with pytest.raises(InputError):
        hold_out(items, 1.5, 0, tmp_path / "bad.csv")
