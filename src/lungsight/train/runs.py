"""Run folders: created once with their settings in ``run.json``, and continued only with the same settings."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lungsight.errors import InputError
from lungsight.fileio import atomic_write_json, ensure_dir


def prepare_run_folder(
    out: Path,
    settings: Mapping[str, Any],
    resume: bool,
    resume_keys: Sequence[str],
    defaults: Mapping[str, Any] | None = None,
) -> Path:
    """Create ``out`` and write ``run.json``; refuse a non-empty folder unless resuming, and refuse to resume a
    run whose ``resume_keys`` settings differ from ``settings`` (compared as JSON, so tuples equal lists).
    ``defaults`` stand for keys that a run written by an older version does not have."""
    out = Path(out)
    run_json = out / "run.json"
    now = json.loads(json.dumps(dict(settings)))
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise InputError(f"{out}: folder exists and is not empty; pass --resume to continue it or a new --out")
        if not run_json.exists():
            raise InputError(f"{out}: not a lungsight run folder (no run.json); refusing to write into it")
        previous = json.loads(run_json.read_text())
        old = dict(defaults or {}) | previous
        changed = [k for k in resume_keys if old.get(k) != now.get(k)]
        if changed:
            raise InputError(f"{out}: --resume with different settings ({', '.join(changed)}); use a new --out")
        return out
    ensure_dir(out)
    atomic_write_json(run_json, now)
    return out
