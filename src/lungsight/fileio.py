"""Atomic writes: every file lungsight produces is written to a temporary file beside it and renamed into place, so
a crash or a kill never leaves a half-written result, checkpoint or model."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lungsight.errors import OutputError

_NOT_A_FOLDER = "exists and is not a folder; give a folder for the output"


def check_output_folder(folder: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, an output folder that is an existing file (nothing is created here)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: {_NOT_A_FOLDER}")
    return folder


def ensure_dir(folder: str | os.PathLike[str]) -> Path:
    """Create ``folder`` (and its parents) if needed; a path that cannot be a folder is one clear error."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder}: {_NOT_A_FOLDER}") from None
    except OSError as exc:
        raise OutputError(f"{folder}: cannot create the output folder ({exc.strerror or exc})") from None
    return folder


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file next to ``path`` and rename it into place."""
    path = Path(path)
    ensure_dir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: could not write ({_why(exc, path.parent)})") from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # after writing (a writer may recreate the file): mkstemp's 0600 hides results
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError("unexpected pos ...")
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{path}: could not write ({_why(exc, path.parent)}); nothing was replaced") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _why(exc: BaseException, folder: Path) -> str:
    """The failure in words, with the free space on the disk of ``folder`` (a full disk is the usual cause)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
    try:
        free = shutil.disk_usage(folder).free / 2**20
    except OSError:
        return reason
    return f"{reason}; {free:,.0f} MiB free on that disk"


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def atomic_write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows with the union of their keys as columns, in first-seen order."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, keys)
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(path, buf.getvalue())
