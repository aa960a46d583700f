"""Run folders: created once with their settings in ``run.json``, and continued only with the same settings."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lungsight.errors import InputError
from lungsight.fileio import atomic_write_json, ensure_dir

#: ``run.json``'s record of the path settings as absolute paths, for a resume to compare.
RESOLVED = "resolved_paths"


def _resolved(value: Any) -> Any:
    """A path setting (a string or a list of them) as absolute, resolved path strings; anything else as it is."""
    if isinstance(value, str) and value:
        return str(Path(value).resolve())
    if isinstance(value, list):
        return [_resolved(v) for v in value]
    return value


def _saved_nothing(out: Path) -> bool:
    """Whether ``out`` is a run that stopped before it wrote anything but ``run.json`` (and empty folders), such as
    one whose first image failed to read: running the command again starts it afresh instead of asking for
    ``--resume``, as nothing can be lost."""
    return (out / "run.json").is_file() and all(p.is_dir() or p == out / "run.json" for p in out.rglob("*"))


def prepare_run_folder(
    out: Path,
    settings: Mapping[str, Any],
    resume: bool,
    resume_keys: Sequence[str],
    defaults: Mapping[str, Any] | None = None,
    path_keys: Sequence[str] = (),
) -> Path:
    """Create ``out`` and write ``run.json``; refuse a non-empty folder unless resuming, and refuse to resume a
    run whose ``resume_keys`` settings differ from ``settings`` (compared as JSON, so tuples equal lists).
    ``path_keys`` are compared as the files they lead to (resolved, recorded under :data:`RESOLVED`): the same data
    given by another relative path resumes, and the same text meaning another folder from elsewhere does not.
    ``defaults`` stand for keys that a run written by an older version does not have. A run that saved nothing
    but its ``run.json`` starts afresh without ``--resume``."""
    out = Path(out)
    run_json = out / "run.json"
    now = json.loads(json.dumps(dict(settings)))
    now_paths = {k: _resolved(now.get(k)) for k in path_keys}
    if out.exists() and any(out.iterdir()) and (resume or not _saved_nothing(out)):
        if not resume:
            raise InputError(f"{out}: folder exists and is not empty; pass --resume to continue it or a new --out")
        if not run_json.exists():
            raise InputError(f"{out}: not a lungsight run folder (no run.json); refusing to write into it")
        previous = json.loads(run_json.read_text())
        old = dict(defaults or {}) | previous
        old_paths = previous.get(RESOLVED) or {}

        def same(k: str) -> bool:
            if k in now_paths and k in old_paths:  # runs written before paths were recorded compare the text
                return old_paths[k] == now_paths[k]
            return old.get(k) == now.get(k)

        changed = [k for k in resume_keys if not same(k)]
        if changed:
            raise InputError(f"{out}: --resume with different settings ({', '.join(changed)}); use a new --out")
        return out
    ensure_dir(out)
    atomic_write_json(run_json, now | ({RESOLVED: now_paths} if now_paths else {}))
    return out
