"""Jobs: a bounded queue of de-identified studies waiting for inference, and the worker threads that answer them.

A submission is admitted only while the queue holds fewer than ``queue_limit`` studies and their pixels take less
than ``max_queued_bytes``; otherwise it is refused with 503 and Retry-After, so memory stays bounded however many
clients send at once. Each worker takes the oldest study, predicts under its model's lock, and writes the
de-identified outputs into the job's result folder. Job records live in memory and are forgotten with their
results after the retention time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lungsight.errors import InputContractError, LungsightError, UnsupportedInputError
from lungsight.serve.routing import ModelPool
from lungsight.serve.storage import Storage
from lungsight.study import Study

logger = logging.getLogger("lungsight.serve")


def status_for(exc: LungsightError) -> int:
    """HTTP status of a user-facing error: unreadable input 400, readable but refused input 422."""
    return 422 if isinstance(exc, (UnsupportedInputError, InputContractError)) else 400


class QueueFull(Exception):
    """The queue cannot take another study now; the client should retry later."""


@dataclass
class Job:
    """One submitted study, from upload to result."""

    id: str
    model: str
    modality: str
    study: Study | None
    created: float = field(default_factory=time.time)
    status: str = "queued"  # queued, running, done, failed
    error: str | None = None
    error_status: int | None = None
    finished_at: float | None = None
    deleted: bool = False
    timings_s: dict[str, float] = field(default_factory=dict)
    _callbacks: list[Callable[[], None]] = field(default_factory=list, init=False, repr=False)
    _done: bool = field(default=False, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def when_finished(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the worker thread) when the job is done or failed; at once if it already is."""
        with self._lock:
            if not self._done:
                self._callbacks.append(callback)
                return
        callback()

    def finish(self) -> None:
        with self._lock:
            self._done, callbacks, self._callbacks = True, self._callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:  # a waiter's problem must not stop the worker
                logger.exception("job %s: a completion callback failed", self.id)

    @property
    def nbytes(self) -> int:
        return self.study.pixels.nbytes if self.study is not None else 0

    def public(self) -> dict[str, Any]:
        """The job's status as the API shows it (no pixels, nothing identifying)."""
        out: dict[str, Any] = {
            "id": self.id,
            "status": self.status,
            "modality": self.modality,
            "model": self.model,
            "timings_s": {k: round(v, 4) for k, v in self.timings_s.copy().items()},  # a worker may be adding
        }
        if self.error:
            out["error"] = self.error
        return out


class JobQueue:
    """The bounded queue, the job records and the worker threads."""

    def __init__(
        self, pool: ModelPool, storage: Storage, *, workers: int, queue_limit: int, max_queued_bytes: int
    ) -> None:
        self.pool = pool
        self.storage = storage
        self.workers = workers
        self.queue_limit = queue_limit
        self.max_queued_bytes = max_queued_bytes
        self.jobs: dict[str, Job] = {}
        self._waiting: deque[Job] = deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"lungsight-worker-{i}", daemon=True) for i in range(self.workers)
        ]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Let the running jobs finish; queued ones are dropped (their uploads are gone already)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join()
        self._threads = []

    def submit(self, job: Job) -> None:
        with self._cond:
            if len(self._waiting) >= self.queue_limit or self._queued_bytes + job.nbytes > self.max_queued_bytes:
                raise QueueFull(f"{len(self._waiting)} studies are waiting; try again shortly")
            self.jobs[job.id] = job
            self._waiting.append(job)
            self._queued_bytes += job.nbytes
            self._cond.notify()

    def pending(self) -> int:
        with self._cond:
            return len(self._waiting)

    def get(self, job_id: str) -> Job | None:
        with self._cond:
            return self.jobs.get(job_id)

    def delete(self, job_id: str) -> bool:
        """Forget a job and delete its result; a running job's result is discarded when it finishes."""
        with self._cond:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                job.deleted = True
                if job in self._waiting:
                    self._waiting.remove(job)
                    self._queued_bytes -= job.nbytes
                    job.study = None
        return self.storage.delete_result(job_id) or job is not None

    def forget_older_than(self, cutoff: float) -> None:
        """Drop finished job records older than ``cutoff`` (their results go with the retention sweep)."""
        with self._cond:
            for job_id in [k for k, j in self.jobs.items() if j.finished_at is not None and j.finished_at < cutoff]:
                del self.jobs[job_id]

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            job.status = "running"
            job.timings_s["queued"] = time.time() - job.created
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            nbytes = job.nbytes
            try:
                self._run(job)
            except LungsightError as exc:
                job.status, job.error, job.error_status = "failed", " ".join(str(exc).split()), status_for(exc)
                logger.info("job %s failed: %s (%d)", job.id, type(exc).__name__, job.error_status)
            except Exception:
                job.status, job.error, job.error_status = "failed", "internal error while predicting", 500
                logger.exception("job %s: unexpected error", job.id)
            finally:
                job.study = None
                job.finished_at = time.time()
                with self._cond:
                    self._queued_bytes -= nbytes
                job.finish()

    def _run(self, job: Job) -> None:
        predictor, lock = self.pool.get(job.model)
        t0 = time.perf_counter()
        with lock:
            prediction = predictor.predict(job.study)
        job.study = None
        t1 = time.perf_counter()
        if job.deleted:
            return
        with self.storage.writing_result(job.id) as folder:
            prediction.save(folder)
        job.timings_s.update(predict=t1 - t0, save=time.perf_counter() - t1)
        job.status = "done"
        logger.info("job %s done in %.2f s (predict %.2f s)", job.id, sum(job.timings_s.values()), t1 - t0)
