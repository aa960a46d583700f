"""Where the service keeps things on disk, and for how long.

``<data_dir>/work/<job>/`` holds an upload only while it is being read (it is deleted right after, whatever
happened); ``<data_dir>/results/<job>/`` holds the de-identified outputs (result.json, report.html, overlays/,
slice_probabilities.svg) until they are older than the retention time. A result folder is written under a
hidden name and renamed into place, so a reader never sees half a result. At start, every leftover work folder
(from a crash) and every hidden partial result is deleted along with expired results.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger("lungsight.serve")

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def valid_job_id(job_id: str) -> bool:
    """Job ids are uuid4 hex strings; anything else never reaches the file system."""
    return bool(_JOB_ID.match(job_id))


class Storage:
    """The service's folders under ``data_dir``, and the retention sweep."""

    def __init__(self, data_dir: Path, keep_seconds: float) -> None:
        self.root = Path(data_dir)
        self.work = self.root / "work"
        self.results = self.root / "results"
        self.keep_seconds = keep_seconds
        for folder in (self.work, self.results):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)  # uploads and results are nobody else's business

    @contextmanager
    def work_dir(self, job_id: str) -> Iterator[Path]:
        """A fresh folder for one upload; deleted when the block ends, however it ends."""
        folder = self.work / job_id
        folder.mkdir(mode=0o700)
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def result_dir(self, job_id: str) -> Path:
        return self.results / job_id

    @contextmanager
    def writing_result(self, job_id: str) -> Iterator[Path]:
        """A hidden folder to write a result into; renamed to :meth:`result_dir` when the block succeeds."""
        partial = self.results / f".{job_id}.partial"
        partial.mkdir(mode=0o700)
        try:
            yield partial
            partial.rename(self.result_dir(job_id))
        finally:
            shutil.rmtree(partial, ignore_errors=True)

    def has_result(self, job_id: str) -> bool:
        return (self.result_dir(job_id) / "result.json").is_file()

    def delete_result(self, job_id: str) -> bool:
        folder = self.result_dir(job_id)
        existed = folder.is_dir()
        shutil.rmtree(folder, ignore_errors=True)
        return existed

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete results older than the retention time; returns the ids that were deleted."""
        limit = (time.time() if now is None else now) - self.keep_seconds
        expired = []
        for folder in self.results.iterdir():
            try:
                old = valid_job_id(folder.name) and folder.stat().st_mtime < limit
            except FileNotFoundError:  # deleted by a client meanwhile
                continue
            if old:
                shutil.rmtree(folder, ignore_errors=True)
                expired.append(folder.name)
        if expired:
            logger.info("retention: deleted %d expired result(s)", len(expired))
        return expired

    def clean_start(self) -> None:
        """Remove what a previous run may have left: upload folders, partial results, expired results."""
        for folder in (*self.work.iterdir(), *self.results.glob(".*")):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
            else:
                folder.unlink(missing_ok=True)
        self.sweep()
