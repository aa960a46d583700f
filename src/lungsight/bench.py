"""``lungsight bench``: how fast the whole predict path is, measured against the bare model forward in one run.

The study is resampled (nearest slice) to the requested number of slices and written as a NIfTI file, so the
timed path starts from a file on disk like a real prediction: read -> slice selection -> windowing/resizing ->
forward -> rules -> Grad-CAM on the top-k slices -> result.json, overlays, report.html. The bare forward runs the
same model on the same (already preprocessed) slices that the pipeline classified, in the same process, right after.
Ratios measured in one run are the honest figure on shared machines; absolute numbers move with the load.
"""

from __future__ import annotations

import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lungsight.examples import EXAMPLE_CT
from lungsight.inference.detector import Detector
from lungsight.io import load_study
from lungsight.preprocess.window import to_unit


def resampled_nifti(study_path: Path, n_slices: int, out: Path) -> Path:
    """Write the study resampled to ``n_slices`` (nearest slice) as NIfTI in HU."""
    study = load_study(study_path)
    idx = np.round(np.linspace(0, study.n_slices - 1, n_slices)).astype(int)
    vol = np.ascontiguousarray(study.pixels[idx].transpose(2, 1, 0)[::-1, ::-1, :])  # back to RAS voxel order
    sp = study.spacing or (1.0, 1.0, 1.0)
    affine = np.diag([sp[2], sp[1], sp[0] * study.n_slices / n_slices, 1.0])
    nib.save(nib.Nifti1Image(vol.astype(np.int16), affine), out)
    return out


def run_bench(
    study_path: Path | None, model: str, *, n_slices: int = 100, repeats: int = 3, threads: int | None = None
) -> dict[str, float]:
    """Time the predict path and the bare forward; print and return the figures."""
    torch.set_num_threads(threads or os.cpu_count() or 1)
    det = Detector.from_pretrained(model)
    with tempfile.TemporaryDirectory(prefix="lungsight-bench-") as tmp:
        path = resampled_nifti(Path(study_path or EXAMPLE_CT), n_slices, Path(tmp) / "study.nii.gz")
        e2e, fwd, kept = [], [], 0
        for r in range(repeats + 1):  # the first round warms up and is not counted
            t0 = time.perf_counter()
            study = load_study(path)
            pred = det.predict(study)
            pred.save(Path(tmp) / f"out{r}")
            t_e2e = time.perf_counter() - t0
            sel = pred.result["slices"]["selected"]
            x = det._inputs(to_unit(study.pixels[sel], study.intensity, tuple(det.config["window"])))
            t1 = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, len(x), 16):
                    det.model(x[i : i + 16])
            t_fwd = time.perf_counter() - t1
            if r:
                e2e.append(t_e2e)
                fwd.append(t_fwd)
                kept = len(sel)
    t_e2e, t_fwd = statistics.median(e2e), statistics.median(fwd)
    figures = {
        "slices": n_slices,
        "slices_classified": kept,
        "threads": torch.get_num_threads(),
        "end_to_end_s": t_e2e,
        "end_to_end_slices_per_s": n_slices / t_e2e,
        "forward_s": t_fwd,
        "forward_slices_per_s": kept / t_fwd if t_fwd else float("inf"),
        "pipeline_over_forward": t_e2e / t_fwd - 1.0 if t_fwd else float("inf"),
    }
    print(
        f"model {model} ({det.config['arch']}, {det.config['input_size']} px), {torch.get_num_threads()} threads, "
        f"median of {repeats}"
    )
    print(
        f"  whole predict path : {n_slices} slices in {t_e2e:.3f} s = {figures['end_to_end_slices_per_s']:.1f} "
        "slices/s (read, select, forward, rules, Grad-CAM, report)"
    )
    print(
        f"  bare model forward : {kept} classified slices in {t_fwd:.3f} s = "
        f"{figures['forward_slices_per_s']:.1f} slices/s"
    )
    print(f"  pipeline cost over the bare forward: {100 * figures['pipeline_over_forward']:.1f} %")
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak resident memory of this process: {figures['peak_rss_mib']:.0f} MiB")
    return figures
