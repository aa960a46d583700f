"""The view classifier ``xr-view`` (frontal / lateral chest X-ray / CT slice) and its training command.

What is honest to test here: the bundled model was fitted on all Cohen X-rays and covid-ct slices, so its right
answers on those images show that the whole path works (reading, windowing, resizing, the stored config), not that
it generalises; its out-of-fold figures are stored in the model and in xr-view.md. Its generalisation is tested on
images it never saw: every Actualmed X-ray (frontal) and slices of a real chest CT volume in the lung window.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lungsight.inference.view as view_module
from lungsight.cli import main
from lungsight.inference.view import classify_view, guess_image_modality
from lungsight.io import load_study
from lungsight.models.pretrained import BUNDLED, load_model
from lungsight.models.view import VIEW_CLASSES
from lungsight.models.weights import sha256_file
from lungsight.preprocess.window import to_unit


def _unit(path: Path, modality: str) -> np.ndarray:
    study = load_study(path, modality=modality)
    return to_unit(study.pixels[0], study.intensity)


def _cohen(shared_data: Path, view: str) -> list[tuple[str, Path]]:
    folder = shared_data / "cxr-cohen"
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        return [
            (row["patientid"], folder / "images" / row["file"]) for row in csv.DictReader(handle) if row["view"] == view
        ]


def test_bundled_model_is_registered_verified_and_small() -> None:
    entry = json.loads((BUNDLED / "index.json").read_text())["xr-view"]
    path = BUNDLED / entry["file"]
    assert sha256_file(path) == entry["sha256"]
    assert path.stat().st_size < 2_000_000
    assert (BUNDLED / entry["card"]).is_file()
    model, config, resolved = load_model("xr-view")
    assert resolved.source == "bundled"
    assert config["arch"] == "view-cnn" and config["classes"] == list(VIEW_CLASSES)
    assert (config["input_size"], config["in_chans"]) == (128, 1)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_model_card_reports_the_cross_validation_stored_in_the_model() -> None:
    _, config, _ = load_model("xr-view")
    cv = config["cv"]
    assert cv["folds"] == 5 and sum(map(sum, cv["confusion"])) == 1041
    card = (BUNDLED / "xr-view.md").read_text(encoding="utf-8")
    for value in (cv["accuracy"], cv["balanced_accuracy"], cv["recall"]["lateral"]):
        assert f"{value:.3f}" in card
    assert cv["recall"]["lateral"] >= 0.9


def test_right_on_real_images_of_its_final_fit(shared_data: Path, covid_ct_dir: Path) -> None:
    """These images were in the final fit (see module docstring)."""
    for _, path in _cohen(shared_data, "L")[:4]:
        assert classify_view(_unit(path, "XR")).kind == "lateral", path.name
    for view in ("PA", "AP", "AP Supine"):
        for _, path in _cohen(shared_data, view)[:2]:
            assert classify_view(_unit(path, "XR")).kind == "frontal", path.name
    for path in sorted(covid_ct_dir.glob("*/*"))[:: len(list(covid_ct_dir.glob("*/*"))) // 4][:4]:
        assert classify_view(_unit(path, "CT")).kind == "ct", path.name


def test_right_on_images_it_never_saw(shared_data: Path) -> None:
    actualmed = sorted((shared_data / "cxr-actualmed" / "images").glob("*.png"))
    assert len(actualmed) == 44
    kinds = [classify_view(_unit(path, "XR")).kind for path in actualmed]
    assert kinds == ["frontal"] * 44
    volume = load_study(shared_data / "ct-volume" / "chest_ct_cropped.nii.gz")
    for index in range(0, volume.n_slices, 10):
        result = classify_view(to_unit(volume.pixels[index], "hu"))
        assert result.kind == "ct" and result.source == "classifier", index


def test_guess_image_modality(shared_data: Path, covid_ct_dir: Path) -> None:
    assert guess_image_modality(_unit(sorted(covid_ct_dir.glob("*/*.png"))[0], "CT")) == "CT"
    assert guess_image_modality(_unit(_cohen(shared_data, "PA")[0][1], "XR")) == "XR"
    assert guess_image_modality(_unit(_cohen(shared_data, "L")[0][1], "XR")) == "XR"


def test_result_fields_and_input_checks() -> None:
    rng = np.random.default_rng(0)
    result = classify_view(rng.random((1, 90, 70), dtype=np.float32))
    assert set(result.probabilities) == set(VIEW_CLASSES)
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert result.p == result.probabilities[result.kind] == max(result.probabilities.values())
    assert result.as_dict()["source"] == "classifier"
    for bad in (np.zeros((2, 8, 8)), np.zeros(8), np.full((8, 8), np.nan)):
        with pytest.raises(ValueError, match="one finite"):
            classify_view(bad)


def test_model_is_loaded_once(monkeypatch: pytest.MonkeyPatch) -> None:
    first = view_module._model("xr-view")

    def no_reload(*_args: object) -> None:
        raise AssertionError("the view model was loaded again")

    monkeypatch.setattr("lungsight.models.pretrained.load_model", no_reload)
    assert view_module._model("xr-view") is first
    classify_view(np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64))


def _tiny_sources(shared_data: Path, root: Path) -> tuple[Path, Path]:
    """Small real subsets (symlinks): 4 lateral and 4 frontal Cohen patients, 4 covid-ct patients."""
    cohen = root / "cohen"
    (cohen / "images").mkdir(parents=True)
    rows = ["file,patientid,finding,view,modality"]
    for view in ("L", "PA"):
        seen: set[str] = set()
        for patient, path in _cohen(shared_data, view):
            if patient in seen or len(seen) == 4:
                continue
            seen.add(patient)
            (cohen / "images" / path.name).symlink_to(path)
            rows.append(f"{path.name},{patient},COVID-19,{view},X-ray")
    (cohen / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    ct = root / "ct"
    (ct / "images").mkdir(parents=True)
    source = shared_data / "covid-ct"
    with open(source / "labels.csv", newline="", encoding="utf-8") as handle:
        chosen: dict[str, dict[str, str]] = {}
        for row in csv.DictReader(handle):
            if len(chosen) < 4 and row["patient_id"] not in chosen:
                chosen[row["patient_id"]] = row
    lines = ["file,label,patient_id"]
    for n, row in enumerate(chosen.values()):
        name = f"{n}{Path(row['file']).suffix}"
        (ct / "images" / name).symlink_to(source / "images" / row["file"])
        lines.append(f"{name},{row['label']},{row['patient_id']}")
    (ct / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return cohen, ct


def test_train_view_command(shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cohen, ct = _tiny_sources(shared_data, tmp_path)
    out = tmp_path / "run"
    args = ["train-view", "--cohen", str(cohen), "--ct", str(ct), "--out", str(out)]
    threads = torch.get_num_threads()
    assert main([*args, "--folds", "2", "--epochs", "2", "--input-size", "64", "--batch-size", "8"]) == 0
    assert torch.get_num_threads() == threads  # the one-thread setting of training does not leak
    metrics = json.loads((out / "cv_metrics.json").read_text())
    assert metrics["pooled"]["n"] == 12 and metrics["counts"] == {"frontal": 4, "lateral": 4, "ct": 4}
    assert np.array(metrics["pooled"]["confusion"]).sum(axis=1).tolist() == [4, 4, 4]
    assert set(metrics["recall"]) == set(VIEW_CLASSES) and len(metrics["per_fold"]) == 2
    with open(out / "cv_predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12 and {r["fold"] for r in rows} == {"1", "2"}
    for fold in ("1", "2"):  # patient-grouped: no patient on both sides
        inside = {r["patient_id"] for r in rows if r["fold"] == fold}
        assert not inside & {r["patient_id"] for r in rows if r["fold"] != fold}
    assert (out / "confusion.png").stat().st_size > 0
    _, config, _ = load_model(out / "model.safetensors")
    assert config["cv"]["folds"] == 2 and config["training"]["epochs"] == 2 and config["input_size"] == 64
    result = classify_view(_unit(_cohen(shared_data, "L")[0][1], "XR"), model=str(out / "model.safetensors"))
    assert set(result.probabilities) == set(VIEW_CLASSES)

    capsys.readouterr()
    assert main(args) == 2
    assert "folder exists and is not empty" in capsys.readouterr().err
