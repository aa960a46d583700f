"""The JSON API on the real files: answers, errors, limits, privacy, retention, token, queue (FastAPI's TestClient)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from lungsight import Detector, load_study
from lungsight.fileio import atomic_write_json
from lungsight.serve import Settings, create_app
from lungsight.serve.routing import ModelPool
from test_io_images import png_header_only

API = "/api/v1"
PHI = ["doe", "jane", "ls-fixture-0042", "19700101", "fixture general hospital", "acc-fixture-77", "gregory"]
#: The client's file name, which must not reach anything the server writes, logs or answers.
CLIENT_NAME = "Doe_Jane_LS-FIXTURE-0042_scan.zip"


@pytest.fixture(scope="module")
def pool() -> ModelPool:
    """One model pool for the module's apps: ct-default is loaded once."""
    return ModelPool()


@contextmanager
def serving(data: Path, pool: ModelPool, **settings) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(data_dir=data, **settings), pool)) as client:
        yield client


@pytest.fixture
def client(tmp_path: Path, pool: ModelPool) -> Iterator[TestClient]:
    with serving(tmp_path / "data", pool) as c:
        yield c


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def zip_of(files: list[Path], path: Path, names: list[str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for i, f in enumerate(files):
            z.write(f, names[i] if names else f.name)
    return path


def post(client: TestClient, *paths: Path, name: str | None = None, wait: bool = False, **fields):
    handles = [p.open("rb") for p in paths]
    try:
        files = [("file", (name or p.name, h, "application/octet-stream")) for p, h in zip(paths, handles, strict=True)]
        return client.post(f"{API}/studies", params={"wait": "true"} if wait else None, files=files, data=fields)
    finally:
        for h in handles:
            h.close()


def finished(client: TestClient, job_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get(f"{API}/studies/{job_id}").json()
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s")


def assert_no_phi(texts: list[str], folder: Path) -> None:
    """No identifying value (nor the client's file name) in the texts, in text files, or (long ones) in any file."""
    text = "\n".join(texts).lower()
    raw = ""
    for f in files_under(folder):
        data = f.read_bytes().decode("latin-1")
        raw += data.lower()
        if f.suffix in (".json", ".html"):  # base64 images removed: random letters would match "doe"
            text += re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", data).lower()
    needles = [*PHI, CLIENT_NAME.lower(), "doe_jane"]
    leaked = [v for v in needles if v in text] + [v for v in needles if len(v) > 6 and v in raw]
    assert not leaked, f"identifying values reached the outputs: {leaked}"


def test_dicom_zip_with_phi_round_trip_is_right_and_leaks_nothing(
    tmp_path: Path, pool: ModelPool, ct_phi_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    study_zip = zip_of(sorted(ct_phi_dir.glob("*.dcm")), tmp_path / "study.zip")
    sop_uid = sorted(ct_phi_dir.glob("*.dcm"))[0].stem.removeprefix("CT.")  # member names carry UIDs
    answers: list[str] = []
    with caplog.at_level("DEBUG"), serving(data, pool) as client:
        r = post(client, study_zip, name=CLIENT_NAME)
        answers.append(r.text)
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] in ("queued", "running", "done") and re.fullmatch(r"[0-9a-f]{32}", job["id"])
        status = finished(client, job["id"])
        answers.append(json.dumps(status))
        assert status["status"] == "done", status
        assert {"upload", "read", "queued", "predict", "save"} <= set(status["timings_s"])
        result = client.get(status["links"]["result"]).json()
        answers.append(json.dumps(result))
        report = client.get(status["links"]["report"])
        assert report.headers["content-type"].startswith("text/html") and "not a medical device" in report.text
        plot = client.get(status["links"]["plot"])
        assert plot.headers["content-type"].startswith("image/svg+xml") and plot.content.startswith(b"<svg")
        assert result["overlays"]
        for overlay in result["overlays"]:
            png = client.get(f"{API}/studies/{job['id']}/overlays/{overlay['file'].split('/')[-1]}")
            assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
            assert Image.open(io.BytesIO(png.content)).size[0] >= 256
    expected = Detector.from_pretrained("ct-default").predict(load_study(ct_phi_dir)).result
    assert result["decision"]["label"] == expected["decision"]["label"]
    for cls, p in expected["probabilities"].items():
        assert result["probabilities"][cls] == pytest.approx(p, abs=1e-4)
    assert result["input"]["n_slices"] == 20 and result["input"]["source_format"] == "dicom-series"
    assert [s["label"] for s in result["slice_probabilities"]] == [f"slice {i:04d}" for i in range(20)]
    assert not files_under(data / "work"), "the upload was kept"
    kept = {p.relative_to(data / "results" / job["id"]).as_posix() for p in files_under(data / "results")}
    assert {"result.json", "report.html", "slice_probabilities.svg"} <= kept
    assert all(
        k.startswith("overlays/") or k in ("result.json", "report.html", "slice_probabilities.svg") for k in kept
    )
    logs = [rec.getMessage() for rec in caplog.records]
    assert any(job["id"] in line for line in logs)
    assert_no_phi(answers + logs, data)
    assert sop_uid not in "\n".join(answers + logs) + "".join(p.read_text("latin-1") for p in files_under(data))


def test_nifti_and_several_images_with_wait(client: TestClient, ct_nifti_sm: Path, covid_ct_dir: Path) -> None:
    r = post(client, ct_nifti_sm, wait=True)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["input"]["source_format"] == "nifti" and result["input"]["n_slices"] == 30
    images = sorted((covid_ct_dir / "COVID").glob("*.png"))[:3]
    r = post(client, *images, wait=True)
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    assert result["input"]["modality"] == "CT" and result["input"]["n_slices"] == 3
    # client file names are replaced by neutral ones, in the order sent
    assert [s["label"] for s in result["slice_probabilities"]] == ["0000.png", "0001.png", "0002.png"]
    local = Detector.from_pretrained("ct-default").predict(load_study(images[0]))
    single = post(client, images[0], wait=True).json()["result"]
    assert single["probabilities"]["covid"] == pytest.approx(local.probabilities["covid"], abs=1e-4)


def lateral_xray_dicom(path: Path, shared_data: Path) -> Path:
    """A real lateral chest X-ray (cxr-cohen, view L) stored as DICOM DX with ViewPosition LL."""
    meta = (shared_data / "cxr-cohen" / "metadata.csv").read_text().splitlines()
    name = next(line.split(",")[0] for line in meta[1:] if line.split(",")[18] == "L")
    pixels = np.asarray(Image.open(shared_data / "cxr-cohen" / "images" / name).convert("L"))
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.ViewPosition = "DX", "LL"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def malicious(tmp_path_factory, ct_dicom_dir: Path, shared_data: Path) -> dict[str, tuple[Path, int, str]]:
    """The developers' guide's list: name -> (file to upload, expected status, word the message must contain)."""
    tmp = tmp_path_factory.mktemp("malicious")
    src = sorted(ct_dicom_dir.glob("*.dcm"))
    data = src[0].read_bytes()
    cases: dict[str, tuple[Path, int, str]] = {}
    (tmp / "corrupt.dcm").write_bytes(data[: len(data) // 3])
    cases["corrupt dicom"] = (tmp / "corrupt.dcm", 400, "upload/0000.dcm")
    cases["lateral x-ray"] = (lateral_xray_dicom(tmp / "lateral.dcm", shared_data), 422, "lateral")
    no_image = tmp / "no_image.zip"
    with zipfile.ZipFile(no_image, "w") as z:
        z.writestr("study/readme.txt", "no images here")
        z.writestr("study/notes.json", "{}")
    cases["folder without images"] = (no_image, 400, "no DICOM, NIfTI or image file")
    empty = tmp / "empty.zip"
    zipfile.ZipFile(empty, "w").close()
    cases["empty zip"] = (empty, 400, "empty")
    evil = tmp / "evil.zip"
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("ok.dcm", data)
        z.writestr("../../escaped.dcm", data)
    cases["zip with ../"] = (evil, 400, "outside the archive")
    absolute = tmp / "absolute.zip"
    with zipfile.ZipFile(absolute, "w") as z:
        z.writestr("/tmp/escaped.dcm", data)
    cases["zip with absolute path"] = (absolute, 400, "absolute path")
    cases["40000x40000 png"] = (png_header_only(tmp / "huge.png", 40000, 40000), 400, "40000x40000")
    (tmp / "text.dcm").write_text("this is not an image\n")
    cases["text named .dcm"] = (tmp / "text.dcm", 400, "upload/0000.dcm")
    return cases


@pytest.mark.parametrize(
    "case",
    [
        "corrupt dicom",
        "lateral x-ray",
        "folder without images",
        "empty zip",
        "zip with ../",
        "zip with absolute path",
        "40000x40000 png",
        "text named .dcm",
    ],
)
def test_malicious_uploads_get_a_clear_4xx_and_leave_nothing(
    tmp_path: Path,
    client: TestClient,
    malicious: dict[str, tuple[Path, int, str]],
    case: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, status, word = malicious[case]
    data = Path(client.app.state.service.settings.data_dir)
    scratch = tmp_path / "scratch"  # where zip extraction goes, as `lungsight serve` points it into its data folder
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    r = post(client, path, name=f"Doe_Jane{path.suffix}")
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and word in detail, detail
    assert "doe_jane" not in detail.lower() and str(data) not in detail, detail
    assert not files_under(data), f"{case} left files: {files_under(data)}"
    assert not list(scratch.iterdir()), "zip extraction left files"
    assert not (path.parent.parent / "escaped.dcm").exists()


def test_requests_that_are_not_uploads(client: TestClient) -> None:
    r = client.post(f"{API}/studies", json={"file": "x"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post(f"{API}/studies", data={"modality": "CT"}, files={"other": ("a.txt", b"x")})
    assert r.status_code == 400 and "'file'" in r.json()["detail"]
    r = client.post(f"{API}/studies", data={"modality": "MR"}, files={"file": ("a.png", b"x")})
    assert r.status_code == 400 and "CT or XR" in r.json()["detail"]
    assert client.get(f"{API}/studies/{'0' * 32}").status_code == 404
    assert client.get(f"{API}/studies/not-an-id").status_code == 404
    assert client.get(f"{API}/studies/{'0' * 32}/overlays/..%2Fresult.json").status_code == 404
    assert not files_under(Path(client.app.state.service.settings.data_dir))


def test_size_and_count_limits(tmp_path: Path, pool: ModelPool, ct_dicom_dir: Path) -> None:
    dicoms = sorted(ct_dicom_dir.glob("*.dcm"))
    study_zip = zip_of(dicoms, tmp_path / "s.zip")
    data = tmp_path / "data"
    with serving(data, pool, max_upload_bytes=200_000) as client:
        r = post(client, study_zip)
        assert r.status_code == 413 and "200,000 bytes" in r.json()["detail"]
    with serving(data, pool, max_files=3) as client:
        r = post(client, *dicoms[:4])
        assert r.status_code == 413 and "more than 3 files" in r.json()["detail"]
    assert not files_under(data)
    with serving(data, pool, max_zip_members=5, max_unpacked_bytes=10**9) as client:
        r = post(client, study_zip)
        assert r.status_code == 400 and "exceeds the limit of 5" in r.json()["detail"]
    with serving(data, pool, max_unpacked_bytes=1_000_000) as client:
        r = post(client, study_zip)
        assert r.status_code == 400 and "1,000,000 bytes" in r.json()["detail"]
    with serving(data, pool, max_pixels=100_000) as client:
        r = post(client, dicoms[0])
        assert r.status_code == 400 and "pixels" in r.json()["detail"]
    assert not files_under(data)


def _frontal_xray(shared_data: Path) -> Path:
    meta = (shared_data / "cxr-cohen" / "metadata.csv").read_text().splitlines()
    name = next(line.split(",")[0] for line in meta[1:] if line.split(",")[18] == "PA")
    return shared_data / "cxr-cohen" / "images" / name


def test_xray_without_an_xray_model_is_a_clear_422(tmp_path: Path, pool: ModelPool, shared_data: Path) -> None:
    data = tmp_path / "data"
    with serving(data, pool, xr_model="no-such-xray-model") as client:
        r = post(client, _frontal_xray(shared_data), modality="XR")
    assert r.status_code == 422
    assert "X-ray model 'no-such-xray-model' is not available" in r.json()["detail"]
    assert not files_under(data)


class _XrayDouble:
    """Stands in for the X-ray detector (same interface): records what it was given, writes a result.json."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, tuple[int, ...]]] = []

    def predict(self, study):
        self.seen.append((study.modality, study.intensity, study.pixels.shape))
        result = {
            "decision": {"label": "normal", "rule": "argmax", "score": 0.5, "positive": False},
            "probabilities": {"covid": 0.2, "pneumonia": 0.3, "normal": 0.5},
            "evidence": {"lung_share": 0.8, "flagged": False},
            "overlays": [],
        }
        return type("P", (), {"save": lambda self, folder: atomic_write_json(Path(folder) / "result.json", result)})()


def test_xray_studies_go_to_the_xray_model(tmp_path: Path, shared_data: Path) -> None:
    xray = _XrayDouble()
    pool = ModelPool(lambda name: xray if name == "xr-test" else Detector.from_pretrained(name))
    with serving(tmp_path / "data", pool, xr_model="xr-test") as client:
        r = post(client, _frontal_xray(shared_data), modality="XR", wait=True)
        assert r.status_code == 200, r.text
        assert r.json()["modality"] == "XR" and r.json()["model"] == "xr-test"
        assert r.json()["result"]["evidence"]["lung_share"] == 0.8
        assert client.get(f"{API}/studies/{r.json()['id']}/plot").status_code == 404  # not produced: a clear 404
    assert len(xray.seen) == 1 and xray.seen[0][0] == "XR" and len(xray.seen[0][2]) == 3


def test_token_protects_the_api_but_not_the_page(tmp_path: Path, pool: ModelPool, covid_ct_dir: Path) -> None:
    image = sorted((covid_ct_dir / "NonCOVID").glob("*.png"))[0]
    with serving(tmp_path / "data", pool, token="s3cret-token") as client:
        r = post(client, image)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert "Authorization: Bearer" in r.json()["detail"]
        client.headers["Authorization"] = "Bearer wrong"
        assert post(client, image).status_code == 401
        client.headers["Authorization"] = "Bearer s3cret-token"
        r = post(client, image, wait=True)
        assert r.status_code == 200
        del client.headers["Authorization"]
        assert client.get(f"{API}/studies/{r.json()['id']}/result").status_code == 401
        assert client.get("/").status_code == 200
        health = client.get(f"{API}/health").json()
        assert health["token_required"] is True and "s3cret" not in json.dumps(health)


def test_full_queue_answers_503_with_retry_after(tmp_path: Path, pool: ModelPool, covid_ct_dir: Path) -> None:
    images = sorted((covid_ct_dir / "NonCOVID").glob("*.png"))[:3]
    data = tmp_path / "data"
    with serving(data, pool, queue_limit=1, wait_timeout_s=0.3) as client:
        _, lock = pool.get("ct-default")
        with lock:  # the worker takes the first study and waits for the model; the second waits in the queue
            first = post(client, images[0]).json()
            deadline = time.monotonic() + 30
            while client.get(f"{API}/studies/{first['id']}").json()["status"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.02)
            second = post(client, images[1], wait=True)  # the wait ends before the result: 202 and the status
            assert second.status_code == 202 and second.json()["status"] == "queued"
            r = client.get(f"{API}/studies/{second.json()['id']}/result")
            assert r.status_code == 409 and "queued" in r.json()["detail"]
            third = post(client, images[2])
            assert third.status_code == 503 and third.headers["retry-after"] == "5"
            assert "busy" in third.json()["detail"]
            assert not files_under(data / "work")
        assert finished(client, first["id"])["status"] == "done"
        assert finished(client, second.json()["id"])["status"] == "done"


def test_retention_delete_and_clean_start(tmp_path: Path, pool: ModelPool, covid_ct_dir: Path) -> None:
    image = sorted((covid_ct_dir / "COVID").glob("*.png"))[0]
    data = tmp_path / "data"
    with serving(data, pool, keep_minutes=1) as client:
        service = client.app.state.service
        a = post(client, image, wait=True).json()["id"]
        b = post(client, image, wait=True).json()["id"]
        assert service.sweep(time.time()) == []
        assert client.get(f"{API}/studies/{a}").json()["status"] == "done"
        assert client.delete(f"{API}/studies/{b}").status_code == 204
        assert client.get(f"{API}/studies/{b}").status_code == 404
        assert client.delete(f"{API}/studies/{b}").status_code == 404
        assert service.sweep(time.time() + 61) == [a]
        assert client.get(f"{API}/studies/{a}").status_code == 404
        assert client.get(f"{API}/studies/{a}/result").status_code == 404
        assert not files_under(data)
        c = post(client, image, wait=True).json()["id"]
    # what a crash leaves: an upload folder, a partial result; an old and a fresh result on disk
    (data / "work" / ("f" * 32)).mkdir(parents=True)
    (data / "work" / ("f" * 32) / "0000.dcm").write_bytes(b"x")
    (data / "results" / f".{'e' * 32}.partial").mkdir()
    old = data / "results" / ("d" * 32)
    old.mkdir()
    (old / "result.json").write_text("{}")
    old_time = time.time() - 3600
    os.utime(old, (old_time, old_time))
    with serving(data, pool, keep_minutes=1) as client:
        assert sorted(p.name for p in (data / "results").iterdir()) == [c]
        assert not list((data / "work").iterdir())
        status = client.get(f"{API}/studies/{c}").json()  # a result from before the restart is still served
        assert status["status"] == "done" and client.get(status["links"]["result"]).status_code == 200


def test_page_static_files_and_openapi(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and 'id="upload-form"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in re.sub(r"<!doctype html>", "", page.text.lower())  # nothing loaded from elsewhere
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
    spec = client.get("/openapi.json").json()
    assert spec["info"]["version"] and f"{API}/studies" in spec["paths"]
    body = spec["paths"][f"{API}/studies"]["post"]["requestBody"]["content"]
    assert "file" in body["multipart/form-data"]["schema"]["properties"]
    assert {f"{API}/studies/{{job_id}}", f"{API}/studies/{{job_id}}/overlays/{{name}}"} <= set(spec["paths"])
    assert client.get(f"{API}/health").json()["status"] == "ok"


def test_a_plain_xray_image_is_routed_to_cxr_default_with_its_evidence(tmp_path: Path, shared_data: Path) -> None:
    """No modality given: the view classifier routes the PNG/JPEG, the bundled X-ray model answers, and the
    evidence-in-lung share and overlay come back; a lateral one is refused with a 422."""
    pool = ModelPool()
    with serving(tmp_path / "data", pool) as client:
        r = post(client, _frontal_xray(shared_data), wait=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["modality"] == "XR" and body["model"] == "cxr-default"
        evidence = body["result"]["evidence"]
        assert 0.0 <= evidence["lung_share"] <= 1.0 and evidence["flagged"] == (evidence["lung_share"] < 0.5)
        overlay = body["result"]["overlays"][0]["file"].split("/")[-1]
        assert client.get(f"{API}/studies/{body['id']}/overlays/{overlay}").status_code == 200
        with open(shared_data / "cxr-cohen" / "metadata.csv", newline="") as f:
            lateral = next(row["file"] for row in csv.DictReader(f) if row["view"] == "L")
        r = post(client, shared_data / "cxr-cohen" / "images" / lateral, wait=True)
        assert r.status_code == 422 and "lateral" in r.json()["detail"]


def test_an_xray_exam_upload_is_answered_for_its_frontal_view(tmp_path: Path, shared_data: Path) -> None:
    """A PA and a lateral of one exam uploaded together (no modality): the X-ray model reads the PA, and the
    result says the lateral was set aside."""
    with open(shared_data / "cxr-cohen" / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    exams: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        exams.setdefault((row["patientid"], row["offset"]), {})[row["view"]] = row["file"]
    pa, lateral = next((e["PA"], e["L"]) for e in exams.values() if "PA" in e and "L" in e)
    images = shared_data / "cxr-cohen" / "images"
    with serving(tmp_path / "data", ModelPool()) as client:
        r = post(client, images / pa, images / lateral, wait=True)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["modality"] == "XR" and body["model"] == "cxr-default"
    assert any("is the frontal view of this exam" in w and "lateral" in w for w in body["result"]["warnings"])
