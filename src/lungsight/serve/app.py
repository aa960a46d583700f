"""The web service: a JSON API (``/api/v1``, OpenAPI at ``/openapi.json``) and the upload page at ``/``.

A submission is streamed to disk, read and de-identified (``POST`` answers 4xx right away when the input is bad,
and the upload is deleted whatever happened), then queued as a de-identified Study for a worker thread; the
client polls the job or passes ``?wait=true``. See ``docs/service.md``.
"""

import asyncio
import contextlib
import hmac
import importlib
import json
import logging
import re
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from lungsight.about import DISCLAIMER, __version__
from lungsight.allocator import tune_malloc
from lungsight.errors import LungsightError
from lungsight.inference.outputs import CHART_NAME
from lungsight.inference.route import settle_image_modality
from lungsight.serve.jobs import Job, JobQueue, QueueFull, status_for
from lungsight.serve.routing import ModelPool, choose_modality, model_for
from lungsight.serve.settings import Settings
from lungsight.serve.storage import Storage, valid_job_id
from lungsight.serve.uploads import RequestError, Upload, read_upload, receive_upload
from lungsight.study import Study

logger = logging.getLogger("lungsight.serve")

STATIC = Path(str(resources.files("lungsight.serve") / "static"))
API = "/api/v1"
#: The page loads nothing from elsewhere; reports and images open as blob: URLs fetched with the token.
PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
    "script-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_OVERLAY_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}\.png$")
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "a DICOM zip, a NIfTI volume, a DICOM file, or one or more images "
                            "(PNG/JPEG/TIFF slices of one study); repeat the field for several files",
                        },
                        "modality": {
                            "type": "string",
                            "enum": ["CT", "XR"],
                            "description": "for plain images: CT slice(s) (default) or a chest X-ray",
                        },
                    },
                }
            }
        },
    }
}


class JobStatus(BaseModel):
    """A job as the API shows it."""

    id: str
    status: str
    modality: str | None = None
    model: str | None = None
    timings_s: dict[str, float] = {}
    error: str | None = None
    links: dict[str, str] = {}
    result: dict[str, Any] | None = None


class Service:
    """What one app instance owns: settings, storage, models, the job queue and the retention sweep."""

    def __init__(self, settings: Settings, pool: ModelPool | None = None) -> None:
        self.settings = settings
        self.storage = Storage(settings.data_dir, settings.keep_minutes * 60)
        self.pool = pool or ModelPool()
        self.queue = JobQueue(
            self.pool,
            self.storage,
            workers=settings.workers,
            queue_limit=settings.queue_limit,
            max_queued_bytes=settings.max_queued_bytes,
        )
        self.read_slots = asyncio.Semaphore(settings.readers)
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def start(self) -> None:
        torch.set_num_threads(self.settings.threads)
        self.storage.clean_start()
        self.queue.start()
        threading.Thread(target=self._warm_up, name="lungsight-warm-up", daemon=True).start()
        self._stop.clear()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="lungsight-retention", daemon=True)
        self._sweeper.start()

    def _warm_up(self) -> None:
        """Load the CT model and the output writers in the background, so the first study is answered as fast as
        the next ones (models are otherwise loaded when first needed)."""
        try:
            self.pool.get(self.settings.ct_model)
            importlib.import_module("lungsight.inference.outputs")  # the overlay and report writers
        except LungsightError as exc:
            logger.warning("CT model %r is not available: %s", self.settings.ct_model, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        self.queue.stop()

    def sweep(self, now: float | None = None) -> list[str]:
        """Delete expired results and forget their jobs."""
        now = time.time() if now is None else now
        expired = self.storage.sweep(now)
        self.queue.forget_older_than(now - self.storage.keep_seconds)
        return expired

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_seconds):
            self.sweep()

    def prepare(self, upload: Upload) -> tuple[Study, str]:
        """Read and de-identify the upload, and choose (and load) its model; runs in a worker thread."""
        modality = choose_modality(upload.fields.get("modality"))
        study = read_upload(upload, self.settings, modality)
        if modality is None:
            study = settle_image_modality(study, lambda m: read_upload(upload, self.settings, m))
        return study, model_for(study, self.settings, self.pool)

    def status(self, job_id: str) -> JobStatus:
        """The job's status; a result left on disk by an earlier run of the server counts as done."""
        job = self.queue.get(job_id)
        if job is None:
            if not self.storage.has_result(job_id):
                raise HTTPException(404, f"no study {job_id} (unknown, deleted or expired)")
            return JobStatus(id=job_id, status="done", links=_links(job_id, "done"))
        return JobStatus(**job.public(), links=_links(job_id, job.status))

    def result_file(self, job_id: str, relative: str) -> Path:
        """A file of a finished job's result folder, or the HTTP error that says why there is none."""
        job = self.queue.get(job_id)
        if job is not None and job.status == "failed":
            raise HTTPException(job.error_status or 500, job.error)
        if job is not None and job.status != "done":
            raise HTTPException(409, f"study {job_id} is {job.status}; poll {API}/studies/{job_id}")
        path = self.storage.result_dir(job_id) / relative
        if not path.is_file():
            raise HTTPException(404, f"no {relative} for study {job_id} (unknown, deleted, expired or not produced)")
        return path


def _links(job_id: str, status: str) -> dict[str, str]:
    base = f"{API}/studies/{job_id}"
    links = {"self": base}
    if status == "done":
        links |= {"result": f"{base}/result", "report": f"{base}/report", "plot": f"{base}/plot"}
    return links


def _job_id(job_id: str) -> str:
    if not valid_job_id(job_id):
        raise HTTPException(404, "no such study (job ids are 32 hexadecimal characters)")
    return job_id


def _auth_dependency(settings: Settings):
    bearer = HTTPBearer(auto_error=False, description="needed only when the server was started with a token")

    def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if settings.token is None:
            return
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(given.encode(), settings.token.encode()):
            raise HTTPException(
                401,
                "missing or wrong API token: send the header 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return require_token


def _api(service: Service) -> APIRouter:
    settings = service.settings
    router = APIRouter(prefix=API, dependencies=[Depends(_auth_dependency(settings))], tags=["studies"])

    @router.post(
        "/studies",
        status_code=202,
        response_model=JobStatus,
        response_model_exclude_none=True,
        openapi_extra=_UPLOAD_BODY,
        responses={
            200: {"description": "done (only with wait=true); the status carries the result"},
            400: {"description": "unreadable input"},
            401: {"description": "missing or wrong token"},
            413: {"description": "upload over the size or file-count limit"},
            415: {"description": "not multipart/form-data"},
            422: {"description": "readable but refused (e.g. lateral X-ray, no X-ray model)"},
            503: {"description": "queue full; retry after the Retry-After seconds"},
        },
    )
    async def submit(
        request: Request,
        wait: Annotated[bool, Query(description="answer when the result is ready (up to the wait limit)")] = False,
    ) -> Any:
        """Submit a study: a DICOM zip, NIfTI, DICOM file or image(s). Answers 202 with the job's status URL."""
        job_id = uuid.uuid4().hex
        t0 = time.perf_counter()
        try:
            with service.storage.work_dir(job_id) as folder:
                upload = await receive_upload(
                    request.headers.get("content-type", ""),
                    request.headers.get("content-length"),
                    request.stream(),
                    folder,
                    settings,
                )
                t1 = time.perf_counter()
                async with service.read_slots:
                    study, model = await run_in_threadpool(service.prepare, upload)
        except ClientDisconnect:
            logger.info("job %s: the client disconnected during the upload", job_id)
            raise HTTPException(400, "the client disconnected before the upload was complete") from None
        except RequestError as exc:
            logger.info("job %s refused (%d)", job_id, exc.status)
            raise HTTPException(exc.status, exc.message, headers=exc.headers) from None
        except LungsightError as exc:
            logger.info("job %s refused: %s (%d)", job_id, type(exc).__name__, status_for(exc))
            raise HTTPException(status_for(exc), " ".join(str(exc).split())) from None
        except Exception:
            logger.exception("job %s: unexpected error while reading the upload", job_id)
            raise HTTPException(500, "internal error while reading the upload") from None
        job = Job(job_id, model, study.modality, study)
        job.timings_s.update(upload=t1 - t0, read=time.perf_counter() - t1)
        try:
            service.queue.submit(job)
        except QueueFull as exc:
            logger.info("job %s refused: queue full (503)", job_id)
            raise HTTPException(503, f"the server is busy: {exc}", headers={"Retry-After": "5"}) from None
        logger.info("job %s queued: %s, %d slice(s), model %s", job_id, study.modality, study.n_slices, model)
        del study
        if not wait:
            return JSONResponse(service.status(job_id).model_dump(exclude_none=True), status_code=202)
        loop, finished = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:  # from the worker thread; the loop may be closed by then (shutdown)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(finished.set)

        job.when_finished(wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(finished.wait(), settings.wait_timeout_s)
        if job.status == "failed":
            raise HTTPException(job.error_status or 500, job.error)
        status = service.status(job_id)
        if job.status != "done":
            return JSONResponse(status.model_dump(exclude_none=True), status_code=202)
        status.result = json.loads(service.storage.result_dir(job_id).joinpath("result.json").read_text())
        return JSONResponse(status.model_dump(exclude_none=True), status_code=200)

    @router.get("/studies/{job_id}", response_model=JobStatus, response_model_exclude_none=True)
    def job_status(job_id: str) -> JobStatus:
        """queued, running, done (with links to the outputs) or failed (with the error)."""
        return service.status(_job_id(job_id))

    @router.get("/studies/{job_id}/result")
    def result(job_id: str) -> FileResponse:
        """result.json: decision, rules, probabilities, per-slice probabilities, overlays, timings, warnings."""
        return FileResponse(service.result_file(_job_id(job_id), "result.json"), media_type="application/json")

    @router.get("/studies/{job_id}/report", response_class=HTMLResponse)
    def report(job_id: str) -> FileResponse:
        """The self-contained HTML report (no scripts, no network)."""
        return FileResponse(service.result_file(_job_id(job_id), "report.html"), media_type="text/html")

    @router.get("/studies/{job_id}/plot")
    def plot(job_id: str) -> FileResponse:
        """The slice-probability chart of a CT study (SVG)."""
        return FileResponse(service.result_file(_job_id(job_id), CHART_NAME), media_type="image/svg+xml")

    @router.get("/studies/{job_id}/overlays/{name}")
    def overlay(job_id: str, name: str) -> FileResponse:
        """One Grad-CAM overlay (PNG) named in result.json's ``overlays``."""
        if not _OVERLAY_NAME.match(name):
            raise HTTPException(404, "no such overlay")
        return FileResponse(service.result_file(_job_id(job_id), f"overlays/{name}"), media_type="image/png")

    @router.delete("/studies/{job_id}", status_code=204)
    def delete(job_id: str) -> Response:
        """Forget the job and delete its result now instead of at the end of the retention time."""
        if not service.queue.delete(_job_id(job_id)):
            raise HTTPException(404, f"no study {job_id} (unknown, deleted or expired)")
        logger.info("job %s deleted", job_id)
        return Response(status_code=204)

    return router


def create_app(settings: Settings | None = None, pool: ModelPool | None = None) -> FastAPI:
    """The FastAPI app for ``settings``; ``pool`` lets tests or embedders supply models (default: named models)."""
    service = Service(settings or Settings(), pool)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tune_malloc()  # also when served by uvicorn's app factory rather than `lungsight serve`
        service.start()
        logger.info("lungsight %s serving; results kept %g min", __version__, service.settings.keep_minutes)
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(
        title="lungsight",
        version=__version__,
        description=f"COVID-19 / pneumonia / normal from chest CT series and X-rays, with Grad-CAM evidence. "
        f"{DISCLAIMER}",
        lifespan=lifespan,
    )
    app.state.service = service

    @app.middleware("http")
    async def log_and_protect(request: Request, call_next: Any) -> Response:
        """One log line per request (method, path, status, time: never a file name or a query string)."""
        t0 = time.perf_counter()
        response = await call_next(request)
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        logger.info(
            "%s %s %d %.0f ms",
            request.method,
            request.url.path[:200],
            response.status_code,
            1000 * (time.perf_counter() - t0),
        )
        return response

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get(f"{API}/health", tags=["service"])
    def health() -> dict[str, Any]:
        """Liveness: version, studies waiting, models loaded, whether a token is required (no auth needed)."""
        return {
            "status": "ok",
            "version": __version__,
            "queued": service.queue.pending(),
            "models_loaded": service.pool.loaded(),
            "token_required": service.settings.token is not None,
            "disclaimer": DISCLAIMER,
        }

    app.include_router(_api(service))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def run(settings: Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``settings`` with uvicorn until interrupted (the ``lungsight serve`` command)."""
    import uvicorn

    app = create_app(settings)
    # Zip extraction (lungsight.io.archive) uses the default temporary folder: keep it inside the data folder,
    # where the start-up clean removes anything a crash left.
    tempfile.tempdir = str(app.state.service.storage.work)
    logging.getLogger("lungsight.serve").setLevel(logging.INFO)
    uvicorn.run(app, host=host, port=port, access_log=False, log_level="info")
