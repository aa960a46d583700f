"""Everything an operator can set about the service, with defaults that are safe on a 2-core machine."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from lungsight.models.pretrained import lungsight_home

#: Environment variable that holds the API token when ``--token`` is not given.
TOKEN_ENV = "LUNGSIGHT_API_TOKEN"

MIB = 1024**2


def default_data_dir() -> Path:
    """``$LUNGSIGHT_HOME/serve``: results live there for the retention time, uploads only while being read."""
    return lungsight_home() / "serve"


@dataclass(frozen=True)
class Settings:
    """Configuration of one service instance.

    Attributes:
        data_dir: folder for per-job upload folders (``work/``, deleted right after reading) and de-identified
            results (``results/``, deleted after ``keep_minutes``).
        keep_minutes: how long results are kept; a sweep deletes older ones every ``sweep_seconds`` and at start.
        token: when set, every ``/api/`` request needs ``Authorization: Bearer <token>``.
        ct_model / xr_model: named models (or ``.safetensors`` paths) for CT and X-ray studies.
        max_upload_bytes: largest request body; the upload is streamed to disk and cut off at this size.
        max_files: most files in one upload request.
        max_zip_members / max_unpacked_bytes: limits on a zip's member count and its unpacked size.
        max_pixels: largest image or slice, in pixels, checked from the header before decoding.
        workers: inference threads (one study at a time per model, whatever the count).
        readers: uploads read and de-identified at the same time (each holds one decoded study in memory).
        queue_limit / max_queued_bytes: most studies waiting for inference, by count and by pixel memory;
            beyond either a submission gets 503 with Retry-After.
        torch_threads: set once when the service starts (default: every core but one, at least one: the other
            core reads uploads, writes results and answers requests while a study is predicted; on a shared
            machine more threads than free cores make inference several times slower, not faster).
        wait_timeout_s: longest a ``?wait=true`` submission waits for its result before answering 202.
    """

    data_dir: Path = field(default_factory=default_data_dir)
    keep_minutes: float = 60.0
    token: str | None = None
    ct_model: str = "ct-default"
    xr_model: str = "cxr-default"
    max_upload_bytes: int = 1024 * MIB
    max_files: int = 2000
    max_zip_members: int = 10_000
    max_unpacked_bytes: int = 4096 * MIB
    max_pixels: int = 64_000_000
    workers: int = 1
    readers: int = 2
    queue_limit: int = 64
    max_queued_bytes: int = 2048 * MIB
    torch_threads: int | None = None
    sweep_seconds: float = 60.0
    wait_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        for name in ("workers", "readers", "queue_limit", "max_files", "max_zip_members"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.keep_minutes <= 0:
            raise ValueError("keep_minutes must be positive")

    @property
    def threads(self) -> int:
        return self.torch_threads or max(1, (os.cpu_count() or 1) - 1)
