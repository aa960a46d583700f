"""End-to-end latency of ``lungsight serve`` on a 100-slice real CT series, and its memory over many requests.

Builds the series from the real 20-slice DICOM series in ``../shared/data/ct-volume/dicom`` (nearest slice, new
positions and UIDs): as NIfTI (``lungsight.bench.resampled_nifti``), as an uncompressed DICOM zip (what most
scanners and PACS send) and as a JPEG 2000 DICOM zip (how the source series is stored). Each is posted to a server
on loopback; the time runs from the start of the upload until the result is available (status done), and the
server's own breakdown (upload, read, queued, predict, save) comes from the job status. Then the server answers
``--memory`` sequential single-slice requests and its resident memory is printed every tenth of the way.

    .venv/bin/python scripts/bench_service.py                      # starts a server on a free port
    .venv/bin/python scripts/bench_service.py --url http://127.0.0.1:8000 --token T   # a running server
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import generate_uid

from lungsight.bench import nearest_slices, resampled_nifti

SHARED = Path(os.environ.get("LUNGSIGHT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
STAGES = ("upload", "read", "queued", "predict", "save")


def dicom_series_zip(src: Path, n_slices: int, out: Path, *, decompress: bool) -> Path:
    """The series in ``src`` resampled (nearest slice) to ``n_slices`` evenly spaced slices, zipped."""
    slices = sorted((pydicom.dcmread(f) for f in src.glob("*.dcm")), key=lambda d: float(d.ImagePositionPatient[2]))
    if decompress:
        for ds in slices:
            ds.decompress()
    z0, z1 = float(slices[0].ImagePositionPatient[2]), float(slices[-1].ImagePositionPatient[2])
    series_uid = generate_uid()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for k, i in enumerate(nearest_slices(len(slices), n_slices)):
            ds = copy.deepcopy(slices[i])
            x, y, _ = ds.ImagePositionPatient
            ds.ImagePositionPatient = [x, y, z0 + k * (z1 - z0) / (n_slices - 1)]
            ds.InstanceNumber = k + 1
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.SeriesInstanceUID = series_uid
            buffer = io.BytesIO()
            ds.save_as(buffer)
            archive.writestr(f"{k:04d}.dcm", buffer.getvalue())
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started_server(data: Path, threads: int | None) -> Iterator[tuple[str, int]]:
    """``lungsight serve`` on a free loopback port; yields (url, pid)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "lungsight.cli", "serve", "--port", str(port), "--data-dir", str(data)]
    cmd += ["--threads", str(threads)] if threads else []
    log = (data.parent / "server.log").open("wb")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + (data.parent / "server.log").read_text())
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def end_to_end(client: httpx.Client, path: Path) -> tuple[float, dict[str, float]]:
    """Seconds from the start of the upload until the result is available, and the server's breakdown."""
    t0 = time.perf_counter()
    with path.open("rb") as handle:
        r = client.post("/api/v1/studies", files={"file": (path.name, handle)})
    r.raise_for_status()
    job = r.json()
    while job["status"] not in ("done", "failed"):
        time.sleep(0.01)
        job = client.get(f"/api/v1/studies/{job['id']}").json()
    if job["status"] == "failed":
        raise SystemExit(f"{path.name}: {job['error']}")
    client.get(job["links"]["result"]).raise_for_status()
    elapsed = time.perf_counter() - t0
    client.delete(f"/api/v1/studies/{job['id']}")
    return elapsed, job["timings_s"]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(args: argparse.Namespace, url: str, pid: int | None, work: Path) -> None:
    dicom = SHARED / "ct-volume" / "dicom"
    inputs = {
        "nifti": lambda p: resampled_nifti(dicom, args.slices, p.with_suffix(".nii.gz")),
        "dicom-zip": lambda p: dicom_series_zip(dicom, args.slices, p.with_suffix(".zip"), decompress=True),
        "dicom-j2k-zip": lambda p: dicom_series_zip(dicom, args.slices, p.with_suffix(".zip"), decompress=False),
    }
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    print(
        f"server {url}, {os.cpu_count()} CPU cores on this machine, {args.slices}-slice series, median of "
        f"{args.repeats} (after one warm-up)"
    )
    with httpx.Client(base_url=url, headers=headers, timeout=600) as client:
        for name in args.formats:
            path = inputs[name](work / name)
            size = path.stat().st_size / 1024**2
            end_to_end(client, path)
            runs = [end_to_end(client, path) for _ in range(args.repeats)]
            total = statistics.median(r[0] for r in runs)
            parts = ", ".join(f"{k} {statistics.median(r[1].get(k, 0.0) for r in runs):.2f}" for k in STAGES)
            print(
                f"  {name:14s} {size:6.1f} MB: end to end {total:.2f} s (server: {parts} s); "
                f"all runs {', '.join(f'{r[0]:.2f}' for r in runs)}"
            )
        if pid is None or args.memory <= 0:
            return
        image = sorted((SHARED / "covid-ct" / "images" / "COVID").glob("*.png"))[0]
        samples = []
        for i in range(args.memory):
            end_to_end(client, image)
            if (i + 1) % max(1, args.memory // 10) == 0:
                samples.append(rss_mib(pid))
        print(
            f"  server RSS (MiB) every {max(1, args.memory // 10)} of {args.memory} sequential single-slice "
            f"requests: {' '.join(f'{s:.0f}' for s in samples)}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    ap.add_argument("--token", help="API token of that server")
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--formats", nargs="+", default=["nifti", "dicom-zip", "dicom-j2k-zip"])
    ap.add_argument("--threads", type=int, help="torch threads of the started server (default: the server's)")
    ap.add_argument("--memory", type=int, default=200, help="sequential requests for the memory check (0: skip)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lungsight-bench-service-") as tmp:
        work = Path(tmp)
        if args.url:
            run(args, args.url, None, work)
            return
        with started_server(work / "data", args.threads) as (url, pid):
            run(args, url, pid, work)


if __name__ == "__main__":
    main()
