"""Named, verified models: the ones bundled with the package, and the ones in ``LUNGSIGHT_HOME``.

* Bundled models live in ``lungsight/pretrained/`` with their SHA-256 recorded in ``index.json``.
* ``LUNGSIGHT_HOME`` (default ``~/.cache/lungsight``) holds ``models/index.json`` and the files of models that were
  imported by hand (``lungsight models import``; for offline hospitals) or downloaded from an index entry's ``url``.
* Every file is checked against its recorded SHA-256 before it is loaded; a mismatch is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lungsight.errors import ModelError
from lungsight.fileio import atomic_write, atomic_write_text
from lungsight.models.registry import build_model
from lungsight.models.weights import read_checkpoint, sha256_file

BUNDLED = Path(str(resources.files("lungsight") / "pretrained"))


def lungsight_home() -> Path:
    return Path(os.environ.get("LUNGSIGHT_HOME", Path.home() / ".cache" / "lungsight")).expanduser()


def _home_index_path() -> Path:
    return lungsight_home() / "models" / "index.json"


def _read_index(path: Path) -> dict[str, dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else {}


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    sha256: str | None
    source: str  # "bundled", "home" or "file"
    url: str | None = None
    card: Path | None = None


def list_models() -> list[ModelEntry]:
    """Named models, home entries shadowing bundled ones of the same name."""
    entries: dict[str, ModelEntry] = {}
    for source, base, index in (
        ("bundled", BUNDLED, BUNDLED / "index.json"),
        ("home", lungsight_home() / "models", _home_index_path()),
    ):
        for name, e in _read_index(index).items():
            card = base / e["card"] if e.get("card") else None
            entries[name] = ModelEntry(name, base / e["file"], e.get("sha256"), source, e.get("url"), card)
    return sorted(entries.values(), key=lambda e: e.name)


def _download(entry: ModelEntry) -> None:
    if not entry.url:
        raise ModelError(f"model {entry.name!r}: file {entry.path} is missing and no download URL is recorded")

    def fetch(tmp: Path) -> None:
        try:
            with urllib.request.urlopen(entry.url, timeout=60) as r, open(tmp, "wb") as f:
                shutil.copyfileobj(r, f)
        except OSError as exc:  # URLError, timeouts and refused connections are OSErrors
            raise ModelError(
                f"model {entry.name!r}: download failed ({exc}); this machine may be offline - fetch "
                f"the file elsewhere and add it with 'lungsight models import {entry.name} FILE'"
            ) from exc
        if sha256_file(tmp) != entry.sha256:
            raise ModelError(f"model {entry.name!r}: downloaded file does not match the recorded SHA-256")

    atomic_write(entry.path, fetch)


def resolve(name_or_path: str | Path) -> ModelEntry:
    """Find a model by registered name or file path, downloading it if needed, and verify its SHA-256."""
    p = Path(name_or_path)
    if p.suffix == ".safetensors" or p.exists():
        if not p.is_file():
            raise ModelError(f"{p}: model file not found")
        return ModelEntry(p.stem, p, None, "file")
    found = {e.name: e for e in list_models()}
    if str(name_or_path) not in found:
        raise ModelError(
            f"unknown model {name_or_path!r}; available: {', '.join(sorted(found)) or 'none'} "
            "(or pass the path of a .safetensors model file)"
        )
    entry = found[str(name_or_path)]
    if not entry.sha256:  # a hand-edited index: nothing to check the file against, so it is not loaded
        raise ModelError(
            f"model {entry.name!r}: its index entry records no SHA-256, so the file cannot be verified; "
            f"add it with 'lungsight models import {entry.name} FILE', which records one"
        )
    if not entry.path.is_file():
        _download(entry)
    if sha256_file(entry.path) != entry.sha256:
        raise ModelError(
            f"model {entry.name!r}: {entry.path} does not match its recorded SHA-256; "
            "the file is damaged or was replaced - reinstall or re-import it"
        )
    return entry


def load_model(name_or_path: str | Path) -> tuple[nn.Module, dict[str, Any], ModelEntry]:
    """(model in eval mode, its config, its entry) for a named model or a model file."""
    entry = resolve(name_or_path)
    state, config = read_checkpoint(entry.path)
    if "classes" not in config:
        what = str(config.get("task", "not a classifier")).replace("-", " ")
        raise ModelError(
            f"model {entry.name!r} is a {what} model, not a classifier: give it where a segmenter is asked for "
            "(--segmenter, lungsight segment apply --model)"
        )
    model = build_model(config["arch"], len(config["classes"]), input_size=config["input_size"])
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(
            f"{entry.path}: weights do not fit architecture {config['arch']!r} ({str(exc).splitlines()[0]})"
        ) from exc
    # NHWC convolutions run 1.2-1.5x faster than NCHW on CPU for every bundled model (docs/speed.md); outputs agree.
    model.to(memory_format=torch.channels_last).eval()
    return model, config, entry


def import_model(name: str, file: Path, *, overwrite: bool = False) -> ModelEntry:
    """Copy a lungsight model file into ``LUNGSIGHT_HOME`` under ``name`` after checking that it loads."""
    file = Path(file)
    load_model(file)  # refuses files that are not complete lungsight models
    index_path = _home_index_path()
    index = _read_index(index_path)
    if name in index and not overwrite:
        raise ModelError(f"a model named {name!r} is already imported; pass --overwrite to replace it")
    target = lungsight_home() / "models" / f"{name}.safetensors"
    atomic_write(target, lambda tmp: shutil.copyfile(file, tmp))
    index[name] = {"file": target.name, "sha256": sha256_file(target)}
    atomic_write_text(index_path, json.dumps(index, indent=2))
    return next(e for e in list_models() if e.name == name)


def register_url(name: str, url: str, sha256: str) -> None:
    """Record a downloadable model (fetched on first use, then verified) in ``LUNGSIGHT_HOME``."""
    index_path = _home_index_path()
    index = _read_index(index_path)
    index[name] = {"file": f"{name}.safetensors", "sha256": sha256, "url": url}
    atomic_write_text(index_path, json.dumps(index, indent=2))
