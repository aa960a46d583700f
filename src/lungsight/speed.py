"""``lungsight speed``: seconds per study against series length for several models, after paper 002's Table 7.

Paper 002 reports its fully automated system's time per CT scan for series of 35 to 406 slices. Here the real
volume is resampled (nearest slice, :func:`lungsight.bench.resampled_nifti`) to each requested length and written
as NIfTI, so every timed study starts from a file on disk: read -> slice selection -> windowing/resizing ->
forward -> rules -> Grad-CAM on the top 4 slices -> result.json, overlays, report.html. The bare forward of the
slices the pipeline classified is timed right after, in the same process, so the share of the pipeline around
the network is visible even when the shared machine's load moves the absolute figures.

Models are named models (``ct-default``) or registered architectures (``resnet50``, ``covidnet:160`` for a
non-default input size). Registered architectures are timed untrained: speed does not depend on the weights, but
their decisions are meaningless, and the output says so. Cells whose full-path time, extrapolated linearly in the
number of slices from the largest count measured so far, would exceed ``max_seconds`` are skipped and marked.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter
from torch import nn

from lungsight.about import __version__
from lungsight.bench import bare_forward, forward_inputs, resampled_nifti
from lungsight.cores import usable_cores
from lungsight.errors import InputError
from lungsight.examples import EXAMPLE_CT
from lungsight.fileio import atomic_write, atomic_write_csv, atomic_write_json
from lungsight.inference.detector import Detector
from lungsight.io import load_study
from lungsight.models.registry import MODELS, build_model, get_spec
from lungsight.preprocess.window import LUNG_WINDOW

DEFAULT_SLICES = (20, 50, 100, 200, 400)
COLUMNS = (
    "model",
    "arch",
    "input_px",
    "trained",
    "device",
    "threads",
    "slices",
    "slices_classified",
    "seconds_per_study",
    "slices_per_s",
    "forward_s",
    "forward_share",
    "peak_rss_mib",
    "skipped",
    "estimated_s",
)


@dataclass(frozen=True)
class CellTimes:
    """Medians over the repeats of one (model, slice count) cell."""

    full_s: float
    forward_s: float
    slices_classified: int


Measure = Callable[[Detector, Path, int], CellTimes]


class OnDevice(nn.Module):
    """Runs a CPU-facing model on another device: inputs go there, logits come back to the CPU (with their graph,
    so Grad-CAM still works). The Detector and its callers stay device-agnostic."""

    def __init__(self, inner: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner.to(device)
        self.device = device
        self.cam_layer = inner.cam_layer
        self.linear_head = getattr(inner, "linear_head", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.device)).cpu()


def parse_model(text: str) -> tuple[str, int | None]:
    """``"covidnet:160"`` -> ``("covidnet", 160)``; ``"ct-default"`` -> ``("ct-default", None)``."""
    name, _, size = text.strip().partition(":")
    if not size:
        return name, None
    if not size.isdigit() or int(size) < 16:
        raise InputError(f"model {text!r}: the input size after ':' must be a whole number of pixels >= 16")
    return name, int(size)


def load_detector(text: str) -> tuple[Detector, bool]:
    """(detector, trained) for a named model, or an untrained registered architecture (``name[:px]``)."""
    name, size = parse_model(text)
    if name not in MODELS:
        if size is not None:
            raise InputError(f"model {text!r}: an input size applies to registered architectures only")
        det = Detector.from_pretrained(name)
        if det.config.get("task", "ct") != "ct":
            raise InputError(f"model {text!r} reads {det.config.get('modality', 'X-rays')}: this table times CT series")
        return det, True
    spec = get_spec(name)
    px = size or spec.input_size
    config: dict[str, Any] = {
        "arch": name,
        "classes": ["non-covid", "covid"],
        "positive_class": "covid",
        "input_size": px,
        "in_chans": spec.in_chans,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "window": list(LUNG_WINDOW),
    }
    model = build_model(name, 2, input_size=px).to(memory_format=torch.channels_last)  # as load_model serves it
    return Detector(model, config), False


def _on_device(det: Detector, device: torch.device) -> Detector:
    return det if device.type == "cpu" else Detector(OnDevice(det.model, device), det.config, det.entry)


def measure_cell(det: Detector, path: Path, repeats: int) -> CellTimes:
    """Median seconds of the whole predict path (file -> outputs on disk) and of the bare forward of the same
    classified slices (already preprocessed), ``repeats`` times each."""
    full: list[float] = []
    fwd: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lungsight-speed-") as tmp:
        for r in range(repeats):
            t = time.perf_counter()
            study = load_study(path)
            pred = det.predict(study)
            pred.save(Path(tmp) / f"out{r}")
            full.append(time.perf_counter() - t)
            kept = pred.result["slices"]["selected"]
            x = forward_inputs(det, study, kept)
            t = time.perf_counter()
            bare_forward(det.model, x)
            fwd.append(time.perf_counter() - t)
    return CellTimes(statistics.median(full), statistics.median(fwd), len(kept))


def estimate_seconds(measured: dict[int, float], n_slices: int) -> float | None:
    """Full-path seconds for ``n_slices`` extrapolated linearly from the largest measured count not above it
    (``None`` when nothing smaller was measured)."""
    below = [n for n in measured if n <= n_slices]
    if not below:
        return None
    n0 = max(below)
    return measured[n0] * n_slices / n0


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on; the load average matters on a shared machine."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "lungsight_version": __version__,
    }


def pick_device(requested: str) -> tuple[torch.device, str | None]:
    """The device to time on and a note when ``cuda`` was asked for but is not available (CPU is used then)."""
    if requested == "cuda":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return torch.device("cpu"), "cuda was requested but is not available here: timed on the CPU"
    if requested != "cpu":
        raise InputError(f"device {requested!r}: choose cpu or cuda")
    return torch.device("cpu"), None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def plot_speed(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Seconds per study against slices (log-log), one line per model; dotted: the bare forward."""
    fig = Figure(figsize=(6.0, 4.5))
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    for k, model in enumerate(models):
        done = [r for r in rows if r["model"] == model and not r["skipped"]]
        if not done:
            continue
        colour = f"C{k % 10}"
        xs = [r["slices"] for r in done]
        label = f"{parse_model(model)[0]} ({done[0]['input_px']} px{'' if done[0]['trained'] else ', untrained'})"
        ax.plot(xs, [r["seconds_per_study"] for r in done], "o-", color=colour, label=label)
        ax.plot(xs, [r["forward_s"] for r in done], ":", color=colour, alpha=0.7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["slices"] for r in rows}))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("slices in the series")
    ax.set_ylabel("seconds per study")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, title="solid: whole path, dotted: bare forward", title_fontsize=7)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))


def _table(rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'model':16s} {'px':>4s} {'slices':>6s} {'kept':>5s} {'s/study':>9s} {'slices/s':>9s} {'forward s':>10s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tag = f"{r['model']}{'' if r['trained'] else '*'}"
        if r["skipped"]:
            lines.append(
                f"{tag:16s} {r['input_px']:>4d} {r['slices']:>6d} {'':>5s} "
                f"{'skipped':>9s} (estimated {r['estimated_s']:.0f} s > max)"
            )
            continue
        lines.append(
            f"{tag:16s} {r['input_px']:>4d} {r['slices']:>6d} {r['slices_classified']:>5d} "
            f"{r['seconds_per_study']:>9.3f} {r['slices_per_s']:>9.1f} {r['forward_s']:>10.3f}"
        )
    return "\n".join(lines)


def run_speed(
    out: Path,
    *,
    study_path: Path | None = None,
    models: Sequence[str] = ("ct-default",),
    slices: Sequence[int] = DEFAULT_SLICES,
    repeats: int = 3,
    threads: int | None = None,
    device: str = "cpu",
    max_seconds: float | None = None,
    measure: Measure = measure_cell,
) -> list[dict[str, Any]]:
    """Time every (model, slice count) cell; write speed.csv, speed.json and speed.png into ``out``; return rows.

    Each model is warmed up once on the smallest series (not counted). ``measure`` is injectable for tests.
    """
    if repeats < 1:
        raise InputError(f"repeats {repeats}: must be at least 1")
    counts = sorted(set(slices))
    if not counts or counts[0] < 1:
        raise InputError(f"slices {list(slices)}: give one or more positive slice counts")
    torch.set_num_threads(threads or usable_cores())
    dev, note = pick_device(device)
    loaded = [(m, *load_detector(m)) for m in models]  # every model name is checked before any timing
    source = Path(study_path or EXAMPLE_CT)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lungsight-speed-") as tmp:
        paths = {n: resampled_nifti(source, n, Path(tmp) / f"series-{n}.nii.gz") for n in counts}
        for name, base, trained in loaded:
            det = _on_device(base, dev)
            measure(det, paths[counts[0]], 1)  # warm-up: allocator, kernels, lazy imports
            measured: dict[int, float] = {}
            for n in counts:
                row: dict[str, Any] = {
                    "model": name,
                    "arch": det.config["arch"],
                    "input_px": int(det.config["input_size"]),
                    "trained": trained,
                    "device": str(dev),
                    "threads": torch.get_num_threads(),
                    "slices": n,
                }
                est = estimate_seconds(measured, n)
                if max_seconds is not None and est is not None and est > max_seconds:
                    row |= {"skipped": True, "estimated_s": round(est, 3)}
                else:
                    cell = measure(det, paths[n], repeats)
                    measured[n] = cell.full_s
                    row |= {
                        "slices_classified": cell.slices_classified,
                        "seconds_per_study": round(cell.full_s, 4),
                        "slices_per_s": round(n / cell.full_s, 2),
                        "forward_s": round(cell.forward_s, 4),
                        "forward_share": round(cell.forward_s / cell.full_s, 3),
                        "peak_rss_mib": round(_peak_rss_mib(), 1),
                        "skipped": False,
                        "estimated_s": None,
                    }
                rows.append({k: row.get(k) for k in COLUMNS})
                done = f"estimated {est:.1f} s, skipped" if row["skipped"] else f"{row['seconds_per_study']:.3f} s"
                print(f"  {name} ({row['input_px']} px), {n} slices: {done}", file=sys.stderr, flush=True)
    untrained = sorted({r["model"] for r in rows if not r["trained"]})
    notes = [note] if note else []
    if untrained:
        notes.append(f"untrained (random weights, timing only; decisions meaningless): {', '.join(untrained)}")
    out = Path(out)
    atomic_write_csv(out / "speed.csv", rows)
    atomic_write_json(
        out / "speed.json",
        {
            "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "study": source.name,
            "repeats": repeats,
            "statistic": "median of repeats, after one warm-up run per model",
            "max_seconds": max_seconds,
            "timed_path": "read -> select -> window/resize -> forward -> rules -> Grad-CAM top-4 -> outputs",
            "machine": machine_info(dev),
            "notes": notes,
            "rows": rows,
        },
    )
    plot_speed(rows, out / "speed.png", f"{source.name}, {torch.get_num_threads()} thread(s), {dev}")
    print(f"seconds per study ({source.name} resampled; median of {repeats}; {dev}, {torch.get_num_threads()} threads)")
    print(_table(rows))
    for line in notes:
        print(f"* {line}" if line.startswith("untrained") else f"note: {line}")
    print(f"wrote {out / 'speed.csv'}, speed.json, speed.png")
    return rows
