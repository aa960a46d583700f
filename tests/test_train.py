"""Training on a small real subset of covid-ct: patient-disjoint folds, a model that beats chance out of fold,
atomic checkpoints, and resume after an interruption."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from lungsight.errors import InputError
from lungsight.train import TrainConfig, train
from lungsight.train.data import read_labels
from lungsight.train.splits import class_weights, patient_folds, validation_split


@pytest.fixture(scope="module")
def covid_ct(shared_data):
    path = shared_data / "covid-ct"
    if not (path / "labels.csv").is_file():
        pytest.skip("covid-ct is absent")
    return path


def test_folds_and_validation_split_never_share_a_patient(covid_ct):
    items = read_labels(covid_ct)
    folds = patient_folds(items, 5, seed=0)
    seen_test = set()
    for train_idx, test_idx in folds:
        tr = {items[i].patient_id for i in train_idx}
        te = {items[i].patient_id for i in test_idx}
        assert not tr & te
        sub_tr, val = validation_split(items, train_idx, 0.15, seed=1)
        assert not {items[i].patient_id for i in sub_tr} & {items[i].patient_id for i in val}
        assert 0.08 < len(val) / len(train_idx) < 0.25
        seen_test |= set(test_idx.tolist())
    assert seen_test == set(range(len(items)))  # every image is tested exactly once across folds


def test_a_validation_split_of_few_patients_grows_instead_of_failing(tmp_path):
    """Five patients with four images each cannot give a 15 % validation part by patient: it takes one of five
    (within one half), and one patient alone cannot be split at all."""
    from lungsight.train.data import Item

    items = [
        Item(tmp_path / f"{p}_{k}.png", "covid" if p % 2 else "non-covid", f"p{p}") for p in range(5) for k in range(4)
    ]
    idx = np.arange(len(items))
    tr, val = validation_split(items, idx, 0.15, seed=0)
    assert len(val) and len(tr) and not {items[i].patient_id for i in tr} & {items[i].patient_id for i in val}
    assert len({items[i].patient_id for i in val}) <= 2
    with pytest.raises(InputError, match=r"too few patients \(1\)"):
        validation_split(items, idx[:4], 0.15)


def test_class_weights_balance_the_loss(covid_ct):
    items = read_labels(covid_ct)
    idx = np.arange(len(items))
    w = class_weights(items, idx, ["non-covid", "covid"])
    n_cov = sum(it.label == "covid" for it in items)
    n_non = len(items) - n_cov
    assert w[0] * n_non == pytest.approx(w[1] * n_cov)  # each class contributes equally
    assert np.mean(w) == pytest.approx(1.0)


def test_labels_csv_errors_name_the_file(tmp_path):
    with pytest.raises(InputError, match=r"no labels\.csv"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label\nx.png,covid\n")
    with pytest.raises(InputError, match="missing column"):
        read_labels(tmp_path)
    (tmp_path / "labels.csv").write_text("file,label,patient_id\nx.png,covid,p1\n")
    with pytest.raises(InputError, match=r"x\.png does not exist"):
        read_labels(tmp_path)


@pytest.mark.slow
def test_small_cv_beats_chance_and_resumes(covid_ct, tmp_path, capsys):
    cfg = TrainConfig(
        data=str(covid_ct),
        model="resnet18",
        out=str(tmp_path / "run"),
        folds=2,
        epochs=6,
        input_size=64,
        augment="none",
        max_patients=200,
        patience=8,
        workers=0,
    )
    import lungsight.train.trainer as trainer_module

    finish = trainer_module.finish_fold

    def killed_in_fold_2(fold_dir, record):  # a kill after fold 2's last checkpoint, before it is marked complete
        if fold_dir.name == "fold_2":
            raise KeyboardInterrupt
        finish(fold_dir, record)

    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module, "finish_fold", killed_in_fold_2)
        with pytest.raises(KeyboardInterrupt):
            train(cfg)
    # a complete fold keeps its model but not its resumable state (weights + optimiser moments)
    assert (run / "fold_1" / "best.safetensors").is_file() and not (run / "fold_1" / "state.pt").exists()
    assert (run / "fold_2" / "state.pt").is_file() and not (run / "fold_2" / "done.json").exists()
    # an existing run is never overwritten without --resume
    with pytest.raises(InputError, match="pass --resume"):
        train(cfg)
    capsys.readouterr()
    pooled = train(TrainConfig(**{**cfg.__dict__, "command": "lungsight train ... --resume"}), resume=True)
    log = capsys.readouterr().out
    assert "[fold 1/2] already complete" in log and "[fold 2/2] resuming after epoch 6" in log
    assert not (run / "fold_2" / "state.pt").exists()
    # measured 0.708 out of fold with this setting; chance is 0.5
    assert pooled["slice"]["auc"] > 0.6, pooled["slice"]
    for name in ("run.json", "cv_metrics.json", "cv_predictions.csv", "cv_table.md", "roc.png", "confusion.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "cv_metrics.json").read_text())
    assert set(metrics["slice"]) >= {"auc", "accuracy", "sensitivity", "specificity", "precision", "f1", "iou"}
    assert set(metrics["patient_rules"]) == {"threshold-0", "threshold-10", "consecutive", "mean"}
    assert 0.0 < metrics["operating_point"]["threshold"] <= 1.0
    assert metrics["ci95"]["slice"]["auc"][0] <= metrics["slice"]["auc"] <= metrics["ci95"]["slice"]["auc"][1]
    assert f"Command: `{cfg.command}`" in (run / "cv_table.md").read_text()  # the run's command, not the resume's
    with open(run / "fold_1" / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == 6
    assert not list(run.rglob("*.tmp"))
    # resuming with other settings is refused
    with pytest.raises(InputError, match="different settings"):
        train(TrainConfig(**{**cfg.__dict__, "epochs": 7}), resume=True)
    shutil.rmtree(run)


def test_youden_operating_point_hand_computed():
    from lungsight.train.report import youden_operating_point

    op = youden_operating_point(np.array([0, 0, 1, 1, 1]), np.array([0.1, 0.6, 0.55, 0.7, 0.9]))
    # at 0.7: tpr 2/3, fpr 0 -> J 0.667; at 0.55: tpr 1, fpr 1/2 -> J 0.5
    assert op["threshold"] == pytest.approx(0.7)
    assert op["sensitivity"] == pytest.approx(2 / 3) and op["specificity"] == 1.0
    assert youden_operating_point(np.array([1, 1]), np.array([0.2, 0.9])) is None


def test_unavailable_imagenet_weights_fail_before_a_run_folder_exists(covid_ct, tmp_path, monkeypatch):
    from lungsight.errors import WeightsUnavailableError

    def offline(*a, **k):
        raise OSError("Name or service not known")

    monkeypatch.setattr("lungsight.models.architectures.timm.create_model", offline)
    cfg = TrainConfig(
        data=str(covid_ct),
        model="resnet18",
        out=str(tmp_path / "run"),
        folds=2,
        epochs=1,
        pretrained="imagenet",
        max_patients=20,
    )
    with pytest.raises(WeightsUnavailableError, match="--pretrained none"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_onecycle_warms_up_then_decays_per_step(covid_ct, tmp_path):
    """The fine-tuning schedule: the rate rises over the first 15 % of the steps, peaks at --lr, ends near zero."""
    cfg = TrainConfig(
        data=str(covid_ct),
        model="resnet18",
        out=str(tmp_path / "run"),
        folds=0,
        epochs=4,
        lr=1e-3,
        input_size=32,
        augment="none",
        scheduler="onecycle",
        batch_size=4,
        max_patients=16,
        threads=1,
    )
    train(cfg)
    with open(tmp_path / "run" / "full" / "history.csv", newline="") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f)]
    assert len(lrs) == 4
    assert lrs[0] == pytest.approx(1e-3, rel=0.3)  # the peak is reached within the first epoch (15 % of the steps)
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3] and lrs[3] < 1e-5


def test_a_resume_compares_data_folders_as_the_folders_they_are(tmp_path, monkeypatch):
    """The same data by another relative path resumes; the same text that means another folder from elsewhere
    does not; a run.json written before paths were recorded compares the text, as it did."""
    import json

    from lungsight.train.runs import RESOLVED, prepare_run_folder

    (tmp_path / "a" / "data").mkdir(parents=True)
    (tmp_path / "b" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    out = tmp_path / "run"
    prepare_run_folder(out, {"data": "data", "seed": 0}, False, ("data", "seed"), path_keys=("data",))
    (out / "fold_1").mkdir()
    run = json.loads((out / "run.json").read_text())
    assert run["data"] == "data" and run[RESOLVED] == {"data": str(tmp_path / "a" / "data")}
    monkeypatch.chdir(tmp_path)
    prepare_run_folder(out, {"data": "a/data", "seed": 0}, True, ("data", "seed"), path_keys=("data",))
    monkeypatch.chdir(tmp_path / "b")
    with pytest.raises(InputError, match=r"--resume with different settings \(data\)"):
        prepare_run_folder(out, {"data": "data", "seed": 0}, True, ("data", "seed"), path_keys=("data",))
    del run[RESOLVED]
    (out / "run.json").write_text(json.dumps(run))
    prepare_run_folder(out, {"data": "data", "seed": 0}, True, ("data", "seed"), path_keys=("data",))
