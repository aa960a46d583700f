"""Recipes (validation, bundled files), the cached experiment runner and the generated bench report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lungsight.cli import main
from lungsight.errors import InputError
from lungsight.experiments import bundled_recipes, load_recipe, resolve_recipe_path, run_recipe, write_report
from lungsight.models.registry import MODELS

MINIMAL = {
    "name": "tiny",
    "paper": "002",
    "title": "tiny check",
    "task": "ct",
    "dataset": "covid-ct",
    "preprocessing": "lung window",
    "folds": 2,
    "rules": ["threshold-0", "consecutive"],
    "defaults": {"optimizer": "adamw", "lr": 0.001, "batch_size": 16, "augment": "none"},
    "quick": {"input_size": 32, "max_patients": 8, "epochs": 1},
    "entries": [{"name": "r18", "model": "resnet18"}],
    "data_differs": ["single slices, not series"],
    "paper_figures": [{"metric": "accuracy", "value": 0.985, "level": "slice"}],
}


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_bundled_recipes_validate_and_cover_the_papers_tables():
    recipes = {r.name: r for r in map(load_recipe, bundled_recipes())}
    assert sorted(recipes) == [f"paper-00{i}" for i in range(5)]
    models = {r.name: {e.model for e in r.entries} for r in recipes.values()}
    assert models["paper-000"] == {"vgg16-head", "alexnet", "inception-v3", "resnet50", "vgg19"}
    assert {"resnet50", "vgg16-head", "googlenet"} == models["paper-001"]
    assert models["paper-002"] == {"resnet50v2-fpn", "resnet50v2", "xception"}
    assert set(recipes["paper-002"].rules) >= {"threshold-0", "threshold-10"}
    assert recipes["paper-003"].primary_rule == "consecutive" and recipes["paper-003"].consecutive_n == 15
    assert {e.settings["scheme"] for e in recipes["paper-004"].entries} == {"raw", "cropped", "segmented"}
    for r in recipes.values():
        assert r.data_differs and r.paper_figures, r.name
        assert all(e.model in MODELS for e in r.entries)


def test_recipe_paths_resolve_to_the_bundled_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe_path("recipes/paper-003.yaml").name == "paper-003.yaml"
    assert resolve_recipe_path("paper-003") == resolve_recipe_path("recipes/paper-003.yaml")
    with pytest.raises(InputError, match="recipe not found"):
        resolve_recipe_path("recipes/paper-999.yaml")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"entries": [{"name": "x", "model": "lenet"}]}, r"entry 1 \(x\): unknown model 'lenet'"),
        ({"epochz": 3}, "unknown key 'epochz'"),
        ({"entries": [{"name": "x", "model": "resnet18", "lr": "fast"}]}, "'lr' must be int or float"),
        ({"defaults": {"optimizer": "rmsprop"}}, "optimizer 'rmsprop' is not one of"),
        ({"rules": ["majority"]}, "unknown rule 'majority'"),
        ({"entries": [{"name": "x", "model": "resnet18", "scheme": "raw"}]}, "'scheme' is an X-ray setting"),
        ({"folds": 1}, "folds must be at least 2"),
        ({"entries": []}, "non-empty list"),
        ({"paper_figures": [{"metric": "auc", "value": 0.9, "entry": "nope"}]}, "names entry 'nope'"),
    ],
)
def test_bad_recipes_fail_with_one_line_naming_the_file(tmp_path, change, message):
    path = _write(tmp_path, MINIMAL | change)
    with pytest.raises(InputError, match=message) as info:
        load_recipe(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("missing", ["dataset", "entries", "task"])
def test_missing_required_key(tmp_path, missing):
    path = _write(tmp_path, {k: v for k, v in MINIMAL.items() if k != missing})
    with pytest.raises(InputError, match=f"missing required key '{missing}'"):
        load_recipe(path)


def test_cli_reports_a_bad_recipe_as_one_line(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("name: [unclosed\n")
    assert main(["experiment", "run", str(path), "--data", str(tmp_path), "--out", str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("lungsight: error:") and "not valid YAML" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_quick_run_is_cached_and_reported(tmp_path, shared_data, capsys):
    recipe = _write(tmp_path, MINIMAL)
    bench = tmp_path / "bench"
    first = run_recipe(recipe, shared_data, bench, quick=True)
    run = bench / "tiny" / "r18"
    assert first["runs"]["r18"]["status"] == "trained"
    assert (run / "cv_metrics.json").is_file() and (run / "calibration.json").is_file()
    settings = json.loads((run / "run.json").read_text())
    assert (settings["folds"], settings["epochs"], settings["input_size"], settings["max_patients"]) == (2, 1, 32, 8)
    assert "--input-size 32" in first["runs"]["r18"]["train_command"]

    stamp = (run / "cv_metrics.json").stat().st_mtime_ns
    again = run_recipe(recipe, shared_data, bench, quick=True)
    assert again["runs"]["r18"]["status"] == "cached"
    assert (run / "cv_metrics.json").stat().st_mtime_ns == stamp

    found = write_report(bench, bench / "report.html")
    assert found["recipes"] == ["tiny"] and found["runs"] == 1
    assert main(["experiment", "report", str(bench), "--out", str(tmp_path / "cli" / "r.html")]) == 0
    assert (tmp_path / "cli" / "r.md").is_file()
    md = (bench / "report.md").read_text()
    assert "single slices, not series" in md  # the data-differs note
    assert "| accuracy | slice | 0.985 |" in md  # the paper's figure beside ours
    assert "patient (consecutive)" in md and "patient (threshold-0)" in md
    assert first["runs"]["r18"]["train_command"] in md
    page = (bench / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # roc, confusions, reliability embedded
    assert "ECE before" in page


def test_interrupted_run_resumes(tmp_path, shared_data):
    recipe = _write(tmp_path, MINIMAL)
    bench = tmp_path / "bench"
    run_recipe(recipe, shared_data, bench, quick=True)
    run = bench / "tiny" / "r18"
    for name in ("cv_metrics.json", "calibration.json"):
        (run / name).unlink()
    assert (run / "fold_1" / "best.safetensors").is_file() and not list(run.glob("fold_*/state.pt"))
    (run / "fold_2" / "done.json").unlink()  # as if killed during fold 2
    result = run_recipe(recipe, shared_data, bench, quick=True, keep_weights=False)
    assert result["runs"]["r18"]["status"] == "resumed"
    assert (run / "cv_metrics.json").is_file()
    # --no-weights: the finished entry keeps its predictions and metrics, not its fold models
    assert result["runs"]["r18"]["weights"].startswith("deleted") and not list(run.rglob("*.safetensors"))
    assert "--no-weights" in result["command"]
    assert write_report(bench, bench / "report.html")["runs"] == 1


def test_report_refuses_an_empty_bench(tmp_path):
    with pytest.raises(InputError, match="no recipe runs"):
        write_report(tmp_path, tmp_path / "report.html")


def test_report_includes_segmentation_and_speed_folders(tmp_path):
    seg = tmp_path / "unet"
    seg.mkdir()
    (seg / "summary.json").write_text(json.dumps({"best_val_dice": 0.789, "baseline_all_lung_dice": 0.1}))
    (seg / "run.json").write_text(json.dumps({"command": "lungsight segment train --layout nifti --out unet"}))
    speed = tmp_path / "bench" / "speed"
    speed.mkdir(parents=True)
    rows = [
        {"model": "ct-default", "input_px": 112, "slices": n, "seconds_per_study": n / 100, "threads": 1}
        for n in (20, 50)
    ]
    (speed / "speed.json").write_text(json.dumps({"study": "ex.nii.gz", "repeats": 2, "rows": rows}))
    found = write_report(tmp_path / "bench", tmp_path / "bench" / "report.html", extra=[seg])
    assert found["extras"]["segmentation"] == [str(seg)] and found["extras"]["speed"] == [str(speed)]
    md = (tmp_path / "bench" / "report.md").read_text()
    assert "| 0.789 |" in md and "lungsight segment train --layout nifti --out unet" in md
    assert "--models ct-default --slices 20 50 --repeats 2 --threads 1" in md
    with pytest.raises(InputError, match="--extra folder not found"):
        write_report(tmp_path / "bench", tmp_path / "r.html", extra=[tmp_path / "missing"])
