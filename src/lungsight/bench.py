"""``lungsight bench``: how fast the whole predict path is, measured against the bare model forward in one run.

The study is resampled (nearest slice) to the requested number of slices and written in the input's own kind (an
uncompressed DICOM series, one file a slice, for a DICOM input, as scanners and PACS usually send it; a
``.nii.gz`` file otherwise; ``--format`` chooses; ``--format stored`` times the input itself, as it is stored: its
own slices, compression and headers), so the timed path starts from files on disk like a real prediction of that
input: read -> slice selection -> windowing/resizing ->
forward -> rules -> Grad-CAM on the top-k slices -> result.json, overlays, report.html. The bare forward runs the
same model on the same (already preprocessed) slices that the pipeline classified, in the same process, right after.
Ratios measured in one run are the honest figure on shared machines; absolute numbers move with the load. Each
figure is given three ways: the ratio of the medians over the rounds; the best round's (the fastest time of each
path, as ``timeit`` advises: slower rounds are mostly other processes' doing, and the best is the same estimator
for the pipeline and for the bare forward); and the paired one, the median over the rounds of each round's own
ratio (a path and the bare forward timed seconds apart share that moment's load, so a slow spell moves both).
The paired figure comes with a distribution-free interval (:func:`median_interval`), which shows how far the
machine's noise leaves it in that run.

The full path's share splits in two: ``full / forward - 1 = work / forward + (network / forward - 1)``, where
``network`` is the network's passes timed inside the path and ``work`` the rest of it (:func:`own_work`). The first
term is the path's own cost; the second is the difference between two timings of the same network, which is the
machine's noise unless the path slows the network's passes down. Both are printed, paired, with their intervals.
"""

from __future__ import annotations

import math
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lungsight.cores import usable_cores
from lungsight.examples import EXAMPLE_CT
from lungsight.inference.detector import Detector
from lungsight.io import load_study
from lungsight.io.export import write_dicom_series, write_nifti
from lungsight.preprocess.window import to_unit
from lungsight.study import Study


def nearest_slices(n_total: int, n_slices: int) -> np.ndarray:
    """Which of ``n_total`` slices make ``n_slices`` evenly spaced ones (nearest slice; repeats when upsampling)."""
    return np.round(np.linspace(0, n_total - 1, n_slices)).astype(int)


def _resampled(study: Study, n_slices: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The study's HU slices resampled to ``n_slices`` (nearest slice), and their spacing."""
    idx = nearest_slices(study.n_slices, n_slices)
    sp = study.spacing or (1.0, 1.0, 1.0)
    return study.pixels[idx], (sp[0] * study.n_slices / n_slices, sp[1], sp[2])


def resampled_nifti(study_path: Path, n_slices: int, out: Path) -> Path:
    """Write the study resampled to ``n_slices`` (nearest slice) as NIfTI in HU."""
    return write_nifti(*_resampled(load_study(study_path), n_slices), out)


def _write_dicom(pixels: np.ndarray, spacing: tuple[float, float, float], out: Path) -> Path:
    write_dicom_series(pixels, spacing, out)
    return out


#: What ``lungsight bench --format`` writes the resampled series as, and the name it is written under:
#: ``.nii.gz``, or an uncompressed CT DICOM series, one file a slice, as scanners and PACS usually send it.
FORMATS = {"nifti": (write_nifti, "study.nii.gz"), "dicom": (_write_dicom, "series")}
#: ``lungsight bench --format stored``: the input itself, not resampled or rewritten.
STORED = "stored"


def bench_format(study: Study, fmt: str = "auto") -> str:
    """``fmt``, or for ``"auto"`` the input's own kind: ``"dicom"`` for a DICOM series or file, else ``"nifti"``."""
    if fmt == "auto":
        return "dicom" if study.source_format.startswith("dicom") else "nifti"
    if fmt != STORED and fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose auto, {STORED} or one of {', '.join(FORMATS)}")
    return fmt


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


STAGES = {
    "read": "read",
    "select": "slice selection",
    "prepare": "windowing and resizing",
    "classify": "the network's passes (forward, and Grad-CAM's backward where it runs)",
    "explain": "top-k maps",
    "outputs": "outputs",
}


def _full_path(det: Detector, path: Path, out: Path) -> dict[str, float]:
    """Run the whole predict path; the seconds of each of its stages (:data:`STAGES`)."""
    study, t_read = _timed(load_study, path)
    pred = det.predict(study)
    _, t_out = _timed(pred.save, out)
    t = pred.result["timings_s"]
    return {
        "read": t_read,
        "select": t["preprocess"],
        "prepare": t["prepare"],
        "classify": t["inference"],
        "explain": t["explain"],
        "outputs": t_out,
    }


def round_ratios(path_s: list[float], forward_s: list[float]) -> list[float]:
    """Each round's own ``path / forward``."""
    return [t / f for t, f in zip(path_s, forward_s, strict=True)]


def round_overheads(path_s: list[float], forward_s: list[float]) -> list[float]:
    """Each round's own ``path / forward - 1``."""
    return [r - 1.0 for r in round_ratios(path_s, forward_s)]


def own_work(full_s: list[float], network_s: list[float]) -> list[float]:
    """Each round's full path less the network's passes timed inside it: the path's own work (reading, selection,
    preparing the batches, the rules, the maps and the outputs)."""
    return [t - n for t, n in zip(full_s, network_s, strict=True)]


def paired_overhead(path_s: list[float], forward_s: list[float]) -> float:
    """The median over rounds of each round's ``path / forward - 1``."""
    return statistics.median(round_overheads(path_s, forward_s))


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """A distribution-free confidence interval of the median of ``values``: ``(low, high, coverage)``.

    The interval runs from the k-th smallest to the k-th largest value, with the largest k whose coverage,
    ``1 - 2 P(Binomial(n, 1/2) < k)``, is at least ``confidence`` (for 7 rounds that is the smallest and the largest,
    98.4 %; for 9, the second smallest and second largest, 96.1 %). Too few values for ``confidence`` give the
    smallest and the largest with the coverage they have (5 rounds: 93.8 %). Needs no assumption on how the
    rounds' figures are spread, only that the rounds are independent.
    """
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("no values")

    def coverage(k: int) -> float:
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def run_bench(
    study_path: Path | None,
    model: str,
    *,
    n_slices: int = 100,
    repeats: int = 3,
    threads: int | None = None,
    fmt: str = "auto",
) -> dict[str, Any]:
    """Time the predict paths and the bare forward; print and return the figures (medians over ``repeats``, the
    best round's and the paired ones). ``fmt`` is what the resampled series is written as and read back from:
    ``"nifti"`` (``.nii.gz``), ``"dicom"`` (an uncompressed series, one file a slice) or ``"auto"``, the input's
    own kind (:func:`bench_format`); ``"stored"`` reads the input itself, all its slices (``n_slices`` does not
    apply)."""
    source_path = Path(study_path or EXAMPLE_CT)
    source = load_study(source_path)
    fmt = bench_format(source, fmt)
    labels = {"nifti": "as .nii.gz", "dicom": "as uncompressed DICOM"}
    stored_as = labels.get(fmt, f"as stored ({source.source_format})")
    if fmt == STORED:
        n_slices = source.n_slices
    torch.set_num_threads(threads or usable_cores())
    det = Detector.from_pretrained(model)
    runs: dict[str, list[float]] = {k: [] for k in ("read", "decision", "full", "forward", "forward_all")}
    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    with tempfile.TemporaryDirectory(prefix="lungsight-bench-") as tmp:
        if fmt == STORED:
            path = source_path
        else:
            write, name = FORMATS[fmt]
            path = write(*_resampled(source, n_slices), Path(tmp) / name)
        del source
        for r in range(repeats + 1):  # the first round warms up and is not counted
            study, t_read = _timed(load_study, path)
            pred, t_decision = _timed(det.predict, study, explain=False)
            parts, t_full = _timed(_full_path, det, path, Path(tmp) / f"out{r}")
            sel = pred.result["slices"]["selected"]
            x = forward_inputs(det, study, sel)
            x_all = forward_inputs(det, study)
            _, t_fwd = _timed(bare_forward, det.model, x)
            _, t_fwd_all = _timed(bare_forward, det.model, x_all)
            if r:
                for k, v in zip(runs, (t_read, t_read + t_decision, t_full, t_fwd, t_fwd_all), strict=True):
                    runs[k].append(v)
                for k, v in parts.items():
                    stages[k].append(v)
    med = {k: statistics.median(v) for k, v in runs.items()}
    best = {k: min(v) for k, v in runs.items()}
    paired = {k: paired_overhead(runs[k], runs["forward"]) for k in ("decision", "full")}
    intervals = {k: median_interval(round_overheads(runs[k], runs["forward"])) for k in ("decision", "full")}
    # full / forward - 1 = work / forward + (network / forward - 1): the path's own work, and how far the network's
    # passes inside the path differ from the bare forward timed right after (noise, or the path slowing them)
    work = own_work(runs["full"], stages["classify"])
    work_shares = round_ratios(work, runs["forward"])
    network_ratios = round_ratios(stages["classify"], runs["forward"])
    kept = len(sel)
    figures = {
        "slices": n_slices,
        "format": fmt,
        "slices_classified": kept,
        "threads": torch.get_num_threads(),
        "decision_path_s": med["decision"],
        "full_path_s": med["full"],
        "forward_classified_s": med["forward"],
        "forward_all_s": med["forward_all"],
        "decision_slices_per_s": n_slices / med["decision"],
        "full_slices_per_s": n_slices / med["full"],
        "decision_over_forward": med["decision"] / med["forward"] - 1.0,
        "full_over_forward": med["full"] / med["forward"] - 1.0,
        "best_decision_over_forward": best["decision"] / best["forward"] - 1.0,
        "best_full_over_forward": best["full"] / best["forward"] - 1.0,
        "best_full_slices_per_s": n_slices / best["full"],
        "paired_decision_over_forward": paired["decision"],
        "paired_full_over_forward": paired["full"],
        "paired_decision_interval": list(intervals["decision"][:2]),
        "paired_full_interval": list(intervals["full"][:2]),
        "paired_interval_coverage": intervals["full"][2],
        "work_s": statistics.median(work),
        "paired_work_over_forward": statistics.median(work_shares),
        "paired_work_interval": list(median_interval(work_shares)[:2]),
        "paired_network_over_forward": statistics.median(network_ratios),
        "paired_network_interval": list(median_interval(network_ratios)[:2]),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "stages_s": {k: statistics.median(v) for k, v in stages.items()},
        "rounds_s": runs | {f"stage_{k}": v for k, v in stages.items()},
    }
    print(
        f"model {model} ({det.config['arch']}, {det.config['input_size']} px), {figures['threads']} threads, "
        f"{n_slices}-slice series {stored_as} ({kept} kept by slice selection), median of {repeats}"
    )
    print(f"  bare model forward, {kept} kept slices   : {med['forward']:.3f} s")
    print(f"  bare model forward, all {n_slices} slices : {med['forward_all']:.3f} s")
    print(
        f"  decision path (read, select, window, resize, forward, rules): {med['decision']:.3f} s = "
        f"{figures['decision_slices_per_s']:.0f} slices/s; {100 * figures['decision_over_forward']:.0f} % over "
        "the bare forward of the same slices"
    )
    print(
        f"  full path (+ Grad-CAM on 4 slices, overlays, plot, report.html): {med['full']:.3f} s = "
        f"{figures['full_slices_per_s']:.0f} slices/s; {100 * figures['full_over_forward']:.0f} % over the bare forward"
    )
    print(
        f"  best round: bare forward {best['forward']:.3f} s, decision path {best['decision']:.3f} s "
        f"({100 * figures['best_decision_over_forward']:.0f} % over), full path {best['full']:.3f} s "
        f"({100 * figures['best_full_over_forward']:.0f} % over, {figures['best_full_slices_per_s']:.0f} slices/s)"
    )
    print(
        f"  paired (median of each round's own ratio): decision path {100 * paired['decision']:.0f} % over, "
        f"full path {100 * paired['full']:.0f} % over the bare forward"
    )
    (d_lo, d_hi, cover), (f_lo, f_hi, _) = intervals["decision"], intervals["full"]
    print(
        f"  {100 * cover:.0f} % interval of the paired figures (the rounds' order statistics): decision path "
        f"{100 * d_lo:.0f} to {100 * d_hi:.0f} %, full path {100 * f_lo:.0f} to {100 * f_hi:.0f} % over"
    )
    (w_lo, w_hi), (n_lo, n_hi) = figures["paired_work_interval"], figures["paired_network_interval"]
    print(
        f"  the full path less its network passes (its own work, timed inside it): {figures['work_s']:.3f} s = "
        f"{100 * figures['paired_work_over_forward']:.0f} % of the bare forward (paired; interval {100 * w_lo:.0f} "
        f"to {100 * w_hi:.0f} %); its network passes took {figures['paired_network_over_forward']:.2f} x the bare "
        f"forward (paired; interval {n_lo:.2f} to {n_hi:.2f})"
    )
    parts = ", ".join(f"{STAGES[k]} {v:.3f} s" for k, v in figures["stages_s"].items())
    print(f"  where the full path's time goes (medians): {parts}")
    print(f"  peak resident memory of this process: {figures['peak_rss_mib']:.0f} MiB")
    return figures


def forward_inputs(det: Detector, study: Study, slices: list[int] | None = None) -> torch.Tensor:
    """The model's input for ``slices`` of ``study`` (default all), prepared beforehand: what :func:`bare_forward`
    is timed on."""
    pixels = study.pixels if slices is None else study.pixels[slices]
    return det.inputs(to_unit(pixels, study.intensity, det.window))


def bare_forward(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 16) -> None:
    """The model alone on already prepared inputs, in the predictor's batches: what the pipeline is measured
    against (here and in :mod:`lungsight.speed`)."""
    with torch.inference_mode():
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
