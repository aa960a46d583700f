"""The X-ray path end to end on real X-rays: training with CV and evidence shares, predicting, evaluating."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungsight import Detector, load_study
from lungsight.cli import main
from lungsight.errors import InputContractError
from lungsight.train import TrainConfig, train
from lungsight.train.cxr_data import read_cxr_folder


@pytest.fixture(scope="module")
def cxr_subset(shared_data: Path, tmp_path_factory) -> Path:
    """A small labels.csv folder of real frontal X-rays: 12 covid, 8 other-pneumonia, 8 normal patients' images."""
    records, _ = read_cxr_folder(shared_data / "cxr-cohen")
    actual, _ = read_cxr_folder(shared_data / "cxr-actualmed")
    chosen, per_class = [], {"covid": 12, "other-pneumonia": 8, "normal": 8}
    seen: set[str] = set()
    for r in records + actual:
        if per_class.get(r.label, 0) > 0 and r.patient_id not in seen:
            chosen.append(r)
            seen.add(r.patient_id)
            per_class[r.label] -= 1
    root = tmp_path_factory.mktemp("cxr-subset")
    (root / "images").mkdir()
    rows = []
    for r in chosen:
        name = f"{r.source}_{r.path.name}"
        shutil.copy(r.path, root / "images" / name)
        rows.append({"file": name, "label": r.label, "patient_id": r.patient_id, "sex": r.sex, "view": r.view})
    with open(root / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def _cfg(data: Path, out: Path, folds: int, scheme: str = "segmented") -> TrainConfig:
    return TrainConfig(
        data=str(data),
        model="covidnet",
        out=str(out),
        task="cxr",
        scheme=scheme,
        folds=folds,
        epochs=2,
        min_epochs=1,
        batch_size=8,
        lr=1e-3,
        input_size=64,
        augment="none",
    )


@pytest.fixture(scope="module")
def cxr_model(cxr_subset: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cxr-final") / "run"
    train(_cfg(cxr_subset, out, folds=0))
    return out / "model.safetensors"


@pytest.mark.slow
def test_cv_run_reports_three_class_metrics_and_evidence_in_lung(cxr_subset, tmp_path):
    out = tmp_path / "cv"
    train(_cfg(cxr_subset, out, folds=2))
    m = json.loads((out / "cv_metrics.json").read_text())
    assert {"accuracy", "balanced_accuracy", "gmean_recall", "macro_auc"} <= set(m)
    assert len(m["per_fold"]) == 2
    ev = m["evidence_in_lung"]
    assert ev["n"] == 28 and 0.0 <= ev["mean"] <= 1.0
    with open(out / "cv_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 28 and len({r["patient_id"] for r in rows}) == 28
    assert all(0.0 <= float(r["lung_share"]) <= 1.0 for r in rows if r["lung_share"])
    assert {"roc.png", "confusion.png", "cv_table.md"} <= {p.name for p in out.iterdir()}
    assert len(list((out / "cache").glob("*.npz"))) == 28  # each X-ray segmented and prepared once
    # a finished run resumes without retraining: every fold is already complete
    train(_cfg(cxr_subset, out, folds=2), resume=True)


def test_xray_prediction_reports_evidence_in_lung_and_writes_the_report(cxr_model, shared_data, tmp_path):
    records, _ = read_cxr_folder(shared_data / "cxr-cohen")
    study = load_study(records[0].path, modality="XR")
    pred = Detector.from_pretrained(cxr_model).predict(study)
    r = pred.result
    assert r["decision"]["label"] in r["probabilities"]
    assert abs(sum(r["probabilities"].values()) - 1.0) < 1e-4
    share = r["evidence"]["lung_share"]
    assert share is None or 0.0 <= share <= 1.0
    assert r["evidence"]["flagged"] == (share is None or share < r["evidence"]["flag_below"])
    report = pred.save(tmp_path / "out")
    html = report.read_text()
    assert "Evidence in the lungs" in html and "not a medical device" in html.lower()
    saved = json.loads((tmp_path / "out" / "result.json").read_text())
    assert saved["overlays"][0]["file"].startswith("overlays/xray_")
    assert (tmp_path / "out" / saved["overlays"][0]["file"]).is_file()


def test_lateral_xray_is_refused_by_the_xray_model(cxr_model, shared_data):
    meta = shared_data / "cxr-cohen" / "metadata.csv"
    with open(meta, newline="") as f:
        lateral = next(r["file"] for r in csv.DictReader(f) if r["view"] == "L")
    study = load_study(shared_data / "cxr-cohen" / "images" / lateral, modality="XR")
    with pytest.raises(InputContractError, match="lateral"):
        Detector.from_pretrained(cxr_model).predict(study)


def test_ct_study_is_refused_by_the_xray_model(cxr_model, ct_nifti_sm):
    with pytest.raises(InputContractError, match="X-ray model"):
        Detector.from_pretrained(cxr_model).predict(load_study(ct_nifti_sm))


def test_cli_predict_and_evaluate_with_an_xray_model(cxr_model, cxr_subset, tmp_path, capsys):
    image = sorted((cxr_subset / "images").iterdir())[0]
    assert main(["predict", str(image), "--model", str(cxr_model), "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert result["input"]["modality"] == "XR"  # the model's modality decided how the PNG/JPEG was read
    code = main(
        ["evaluate", "--data", str(cxr_subset), "--model", str(cxr_model), "--out", str(tmp_path / "e"), "--by", "sex"]
    )
    assert code == 0
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n"] + m["n_skipped"] >= 28
    assert (tmp_path / "e" / "bias_sex.md").is_file()
    with open(tmp_path / "e" / "predictions.csv", newline="") as f:
        shares = [float(r["lung_share"]) for r in csv.DictReader(f) if r["lung_share"]]
    assert shares and np.all((np.array(shares) >= 0) & (np.array(shares) <= 1))


def test_plain_xray_image_without_a_model_goes_to_cxr_default(shared_data, tmp_path):
    """A PNG says nothing about its modality: the view classifier routes it, and the default X-ray model answers."""
    image = sorted((shared_data / "cxr-actualmed" / "images").iterdir())[0]
    assert main(["predict", str(image), "--out", str(tmp_path / "p")]) == 0
    result = json.loads((tmp_path / "p" / "result.json").read_text())
    assert result["input"]["modality"] == "XR" and result["model"]["name"] == "cxr-default"
    assert set(result["probabilities"]) == {"normal", "other-pneumonia", "covid"}
    assert result["evidence"]["flagged"] == (result["evidence"]["lung_share"] < 0.5)
