"""A real ``lungsight serve`` process on loopback: 50 concurrent uploads all answered right, none lost, no 5xx, the
server responsive meanwhile, its memory bounded and flat over further requests, and its log free of file names."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lungsight import Detector, load_study

N_CONCURRENT = 50
N_SEQUENTIAL = 60


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    data: Path
    log: Path

    def ready(self) -> Server:
        """Wait until the server answers (it boots while the test computes its reference answers)."""
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/api/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            assert self.process.poll() is None and time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.2)

    def rss_mib(self, field: str = "VmRSS") -> float:
        """Resident memory of the server process (``VmHWM``: its peak so far)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"{field} not found")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    port = _free_port()
    log = tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "LUNGSIGHT_API_TOKEN"}
    cmd = [sys.executable, "-m", "lungsight.cli", "serve", "--port", str(port), "--data-dir", str(tmp / "data")]
    with log.open("wb") as out:
        process = subprocess.Popen([*cmd, "--max-upload-mb", "2"], stdout=out, stderr=subprocess.STDOUT, env=env)
    yield Server(f"http://127.0.0.1:{port}", process, tmp / "data", log)
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def images(covid_ct_dir: Path) -> list[tuple[Path, dict[str, float]]]:
    """50 different real CT slices with the probabilities ct-default gives them in this process."""
    covid, other = sorted((covid_ct_dir / "COVID").glob("*.png")), sorted((covid_ct_dir / "NonCOVID").glob("*.png"))
    paths = covid[: N_CONCURRENT // 2] + other[: N_CONCURRENT - N_CONCURRENT // 2]
    detector = Detector.from_pretrained("ct-default")
    return [(p, detector.predict(load_study(p), explain=False).probabilities) for p in paths]


def _submit(client: httpx.Client, path: Path, name: str) -> httpx.Response:
    with path.open("rb") as handle:
        return client.post("/api/v1/studies", params={"wait": "true"}, files={"file": (name, handle, "image/png")})


@pytest.mark.slow
def test_fifty_concurrent_uploads_are_all_answered_right(server: Server, images) -> None:
    server.ready()
    latencies: list[float] = []
    stop = threading.Event()

    def watch() -> None:  # the server must stay responsive while it works
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get("/api/v1/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with (
        httpx.Client(base_url=server.url, timeout=300, limits=httpx.Limits(max_connections=N_CONCURRENT)) as client,
        ThreadPoolExecutor(N_CONCURRENT) as pool,
    ):
        t0 = time.perf_counter()
        responses = list(pool.map(lambda i: _submit(client, images[i][0], f"Doe_Jane_{i}.png"), range(N_CONCURRENT)))
        elapsed = time.perf_counter() - t0
    stop.set()
    watcher.join()
    assert [r.status_code for r in responses] == [200] * N_CONCURRENT, [r.text[:200] for r in responses]
    assert len({r.json()["id"] for r in responses}) == N_CONCURRENT
    for (path, expected), r in zip(images, responses, strict=True):
        got = r.json()["result"]["probabilities"]
        assert got == pytest.approx(expected, abs=1e-4), path.name  # each answer is its own image's
    assert max(latencies) < 2.0, f"health check took {max(latencies):.2f} s while busy"
    assert server.rss_mib("VmHWM") < 2048
    log = server.log.read_text()
    statuses = re.findall(r"lungsight.serve: (?:GET|POST|DELETE) /api/v1/studies\S* (\d{3}) ", log)
    assert len(statuses) >= N_CONCURRENT and not [s for s in statuses if s.startswith("5")]
    assert "Doe_Jane" not in log and "Traceback" not in log
    assert not list((server.data / "work").iterdir())
    print(f"{N_CONCURRENT} concurrent uploads answered in {elapsed:.1f} s, peak RSS {server.rss_mib('VmHWM'):.0f} MiB")


@pytest.mark.slow
def test_memory_does_not_grow_with_requests(server: Server, images) -> None:
    """Runs after the concurrent burst, which warmed up the allocator and the caches."""
    server.ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        rss = []
        for i in range(N_SEQUENTIAL):
            r = _submit(client, images[i % len(images)][0], "x.png")
            assert r.status_code == 200
            assert client.delete(f"/api/v1/studies/{r.json()['id']}").status_code == 204
            if i % 10 == 9:
                rss.append(server.rss_mib())
    growth = max(rss[len(rss) // 2 :]) - max(rss[: len(rss) // 2])
    print(f"RSS every 10 requests (MiB): {[round(x) for x in rss]}")
    assert growth < 30, f"resident memory grew by {growth:.0f} MiB over {N_SEQUENTIAL // 2} requests: {rss}"


@pytest.mark.slow
def test_oversized_upload_is_refused_over_http(server: Server, tmp_path: Path) -> None:
    server.ready()
    big = tmp_path / "big.dcm"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with big.open("rb") as handle:
            r = client.post("/api/v1/studies", files={"file": ("big.dcm", handle)})
        assert r.status_code == 413 and "2,097,152 bytes" in r.json()["detail"]
        assert client.get("/api/v1/health").status_code == 200
    assert not list((server.data / "work").iterdir())
