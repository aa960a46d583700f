"""The upload page in a real browser (Debian's chromium driven by Playwright, headless): a clinician uploads a DICOM
zip and sees the decision, the probabilities, an overlay and the report link; a bad file shows the server's message."""

from __future__ import annotations

import shutil
import socket
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from lungsight import Detector, load_study
from lungsight.serve import Settings, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api", reason="the Python playwright package is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A uvicorn server on loopback in a background thread, with an API token (the page must send it)."""
    settings = Settings(data_dir=tmp_path_factory.mktemp("data"), token="page-token")
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _open(browser, base_url: str):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base_url)
    page.fill("#token", "page-token")
    return page, errors


def test_upload_a_dicom_zip_and_see_the_decision_and_an_overlay(
    browser, base_url: str, ct_dicom_dir: Path, tmp_path: Path
) -> None:
    study = tmp_path / "series.zip"
    with zipfile.ZipFile(study, "w") as z:
        for f in sorted(ct_dicom_dir.glob("*.dcm")):
            z.write(f, f.name)
    expected = Detector.from_pretrained("ct-default").predict(load_study(ct_dicom_dir), explain=False)
    page, errors = _open(browser, base_url)
    page.set_input_files("#file", str(study))
    page.click("#submit")
    page.wait_for_selector("#result:not([hidden])", timeout=120_000)
    assert page.inner_text("#decision").strip().lower() == expected.label
    assert "threshold-10" in page.inner_text("#decision-detail")
    probabilities = page.inner_text("#probabilities")
    assert all(cls in probabilities for cls in expected.probabilities)
    page.locator("img.overlay").first.wait_for()
    widths = page.eval_on_selector_all(
        "img.overlay", "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))"
    )
    assert widths and all(w >= 256 for w in widths), widths
    assert page.eval_on_selector("#plot", "i => i.decode().then(() => i.naturalWidth)") > 0
    assert "Not measured for this modality (CT)" in page.inner_text("#lung-share")
    assert page.get_attribute("#report", "href").startswith("blob:")
    assert not errors, errors
    page.close()


def test_a_bad_file_shows_the_servers_message(browser, base_url: str, tmp_path: Path) -> None:
    bad = tmp_path / "notes.dcm"
    bad.write_text("this is not an image\n")
    page, errors = _open(browser, base_url)
    page.set_input_files("#file", str(bad))
    page.click("#submit")
    page.wait_for_selector("#error:not([hidden])", timeout=60_000)
    assert "upload/0000.dcm" in page.inner_text("#error")
    assert page.is_hidden("#result") and not errors
    page.fill("#token", "wrong")
    page.click("#submit")
    page.locator("#error", has_text="API token").wait_for(timeout=60_000)  # the page's CSP forbids eval()
    page.close()
