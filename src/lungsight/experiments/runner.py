"""Run a recipe: every entry through the ordinary trainer, cached and resumable by run folder.

``BENCH/<recipe>/<entry>/`` is an ordinary ``lungsight train`` run folder. An entry whose folder holds
``cv_metrics.json`` is finished and reused as is; a folder without it is continued with ``resume=True`` (the
trainer refuses if its settings differ). CT entries are then temperature-scaled (``calibration.json`` and the
reliability diagram, :func:`lungsight.evaluate.calibration.calibrate_run`). ``BENCH/<recipe>/recipe.json`` holds
the resolved recipe, the profile, and for each entry the equivalent ``lungsight train`` command. With
``keep_weights=False`` each finished entry's fold models are deleted: the report reads only predictions and metrics.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from lungsight.errors import InputError
from lungsight.experiments.recipe import QUICK_PROFILE, Entry, Recipe, load_recipe
from lungsight.fileio import atomic_write_json, ensure_dir
from lungsight.train import TrainConfig, train

_FLAGS = {
    "folds": "--folds",
    "epochs": "--epochs",
    "batch_size": "--batch-size",
    "lr": "--lr",
    "optimizer": "--optimizer",
    "input_size": "--input-size",
    "augment": "--augment",
    "pretrained": "--pretrained",
    "scheduler": "--scheduler",
    "patience": "--patience",
    "min_epochs": "--min-epochs",
    "scheme": "--scheme",
    "max_patients": "--max-patients",
    "seed": "--seed",
    "slice_threshold": "--slice-threshold",
    "threads": "--threads",
}


def entry_settings(recipe: Recipe, entry: Entry, quick: bool) -> dict[str, Any]:
    """The training settings of ``entry`` under the full or the ``--quick`` profile."""
    s: dict[str, Any] = {"folds": recipe.folds, "seed": recipe.seed, "slice_threshold": recipe.slice_threshold}
    s |= entry.settings
    if quick:
        s |= QUICK_PROFILE | recipe.quick | entry.quick
    s.setdefault("pretrained", "none")
    return s


def train_command(recipe: Recipe, entry: Entry, settings: dict[str, Any], data: Path, out: Path, threads: int) -> str:
    """The ``lungsight train`` command line that trains exactly this entry into ``out``."""
    words = ["lungsight", "train", "--task", recipe.task, "--model", entry.model, "--data", str(data / recipe.dataset)]
    for extra in recipe.extra_datasets:
        words += ["--data", str(data / extra)]
    for key, value in (settings | {"threads": threads}).items():
        words += [_FLAGS[key], str(value)]
    words += ["--out", str(out), "--resume"]
    return shlex.join(words)


def _config(recipe: Recipe, entry: Entry, s: dict[str, Any], data: Path, out: Path, threads: int, cmd: str):
    train_keys = {k: v for k, v in s.items() if k not in ("pretrained",)}
    return TrainConfig(
        data=str(data / recipe.dataset),
        extra_data=[str(data / d) for d in recipe.extra_datasets],
        model=entry.model,
        out=str(out),
        task=recipe.task,
        pretrained=None if s["pretrained"] == "none" else "imagenet",
        threads=threads,
        cache=str(out.parent / "cache") if recipe.task == "cxr" else None,
        command=cmd,
        **train_keys,
    )


def run_entry(
    recipe: Recipe,
    entry: Entry,
    data: Path,
    bench: Path,
    *,
    quick: bool,
    threads: int,
    command: str,
    keep_weights: bool = True,
) -> dict[str, Any]:
    """Train (or reuse, or resume) one entry; returns its record for ``recipe.json``."""
    out = bench / recipe.name / entry.name
    settings = entry_settings(recipe, entry, quick)
    cmd = train_command(recipe, entry, settings, data, out, threads)
    record = {"entry": entry.name, "model": entry.model, "run": str(out), "settings": settings, "train_command": cmd}
    record |= {"experiment_command": command, "notes": entry.notes}
    t0 = time.perf_counter()
    if (out / "cv_metrics.json").is_file():
        print(f"[{recipe.name}/{entry.name}] cached: {out / 'cv_metrics.json'}", flush=True)
        record["status"] = "cached"
    else:
        resume = out.is_dir() and any(out.iterdir())
        print(f"[{recipe.name}/{entry.name}] {'resuming' if resume else 'training'}: {cmd}", flush=True)
        train(_config(recipe, entry, settings, data, out, threads, cmd), resume=resume)
        record["status"] = "resumed" if resume else "trained"
    if recipe.task == "ct" and not (out / "calibration.json").is_file():
        from lungsight.evaluate.calibration import calibrate_run

        calibrate_run(out)
    if not keep_weights:
        dropped = [f for f in out.glob("fold_*/best.safetensors") if (f.parent / "done.json").is_file()]
        for f in dropped:
            f.unlink()
        record["weights"] = "deleted (--no-weights)"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def run_recipe(
    recipe_path: str | Path,
    data: str | Path,
    bench: str | Path,
    *,
    quick: bool = False,
    threads: int = 1,
    only: list[str] | None = None,
    command: str | None = None,
    keep_weights: bool = True,
) -> dict[str, Any]:
    """Run every entry of a recipe (or the ``only`` ones) into ``bench``; write and return ``recipe.json``."""
    recipe = load_recipe(recipe_path)
    data, bench = Path(data), Path(bench)
    for name in [recipe.dataset, *recipe.extra_datasets]:
        if not (data / name).is_dir():
            raise InputError(f"{data / name}: dataset folder of recipe {recipe.name} not found (check --data)")
    entries = recipe.entries
    if only:
        unknown = sorted(set(only) - {e.name for e in entries})
        if unknown:
            raise InputError(f"{recipe.source}: no entry {unknown[0]!r}; entries: {', '.join(e.name for e in entries)}")
        entries = [e for e in entries if e.name in only]
    command = command or shlex.join(
        ["lungsight", "experiment", "run", str(recipe_path), "--data", str(data), "--out", str(bench)]
        + (["--quick"] if quick else [])
        + ([] if keep_weights else ["--no-weights"])
    )
    folder = bench / recipe.name
    ensure_dir(folder)
    path = folder / "recipe.json"
    previous = _read_json(path).get("runs", {}) if path.is_file() else {}
    result = {
        "recipe": recipe.as_dict(),
        "profile": "quick" if quick else "full",
        "quick_profile": QUICK_PROFILE if quick else None,
        "command": command,
        "data": str(data),
        "runs": previous,
    }
    for entry in entries:
        result["runs"][entry.name] = run_entry(
            recipe, entry, data, bench, quick=quick, threads=threads, command=command, keep_weights=keep_weights
        )
        atomic_write_json(path, result)  # after every entry, so an interrupted bench still lists what finished
    atomic_write_json(path, result)
    return result


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None
