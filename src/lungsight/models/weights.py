"""Reading and writing weights safely: safetensors, or ``torch.load(weights_only=True)``; atomic writes; SHA-256."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from lungsight.errors import ModelError
from lungsight.fileio import atomic_write

CONFIG_KEY = "lungsight_config"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: Path) -> Path:
    return atomic_write(path, lambda p: torch.save(obj, p))


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a tensor-only ``.pt/.pth`` file (never unpickles arbitrary objects)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ModelError(f"{path}: not a readable weights file ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def save_checkpoint(model: torch.nn.Module, config: dict[str, Any], path: Path) -> Path:
    """Write a self-describing model file: weights plus the lungsight config in the safetensors header."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: json.dumps(config, sort_keys=True)}
    return atomic_write(Path(path), lambda p: save_file(state, str(p), metadata=meta))


def read_checkpoint_config(path: Path) -> dict[str, Any]:
    """The lungsight config in the header of a file written by :func:`save_checkpoint` (weights are not read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable lungsight model file ({exc})") from exc
    if CONFIG_KEY not in meta:
        raise ModelError(
            f"{path}: safetensors file has no lungsight config; import it with "
            "'lungsight models import NAME FILE --arch ARCH'"
        )
    return json.loads(meta[CONFIG_KEY])


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, config) of a file written by :func:`save_checkpoint`."""
    config = read_checkpoint_config(path)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{path}: not a readable lungsight model file ({exc})") from exc
    return state, config
