"""``lungsight bench``: the figures it prints are computed from the stages it timed (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lungsight.bench import median_interval, nearest_slices, own_work, paired_overhead, run_bench
from lungsight.cli import main


def test_bench_reports_median_and_best_round_ratios(capsys: pytest.CaptureFixture[str]) -> None:
    f = run_bench(None, "ct-default", n_slices=12, repeats=2, threads=1)
    printed = capsys.readouterr().out
    assert f["slices"] == 12 and 1 <= f["slices_classified"] <= 12 and f["threads"] == 1
    assert f["decision_slices_per_s"] == pytest.approx(12 / f["decision_path_s"])
    assert f["full_over_forward"] == pytest.approx(f["full_path_s"] / f["forward_classified_s"] - 1)
    assert f["best_full_slices_per_s"] >= f["full_slices_per_s"] * 0.999  # the best round is at least the median
    assert f["best_full_over_forward"] > -1 and f["best_decision_over_forward"] > -1
    assert f["paired_full_over_forward"] > -1 and f["paired_decision_over_forward"] > -1
    assert "paired (median of each round's own ratio)" in printed
    lo, hi = f["paired_full_interval"]
    assert lo <= f["paired_full_over_forward"] <= hi and "interval of the paired figures" in printed
    assert "bare model forward" in printed and "best round" in printed and "full path" in printed
    # the stages of the full path, timed inside it, account for most of it and no more than all of it
    stages = f["stages_s"]
    assert list(stages) == ["read", "select", "prepare", "classify", "explain", "outputs"]
    assert min(stages.values()) >= 0 and stages["read"] > 0 and stages["prepare"] > 0 and stages["outputs"] > 0
    assert 0.5 * f["full_path_s"] < sum(stages.values()) < 1.2 * f["full_path_s"]
    assert "where the full path's time goes" in printed and "slice selection" in printed
    # its own work is the full path less the network's passes in it: more than the stages around the network
    # (the rules and the result are in it too), less than the whole path
    around = sum(v for k, v in stages.items() if k != "classify")
    assert 0.5 * around < f["work_s"] < f["full_path_s"]
    lo, hi = f["paired_work_interval"]
    assert lo <= f["paired_work_over_forward"] <= hi and f["paired_network_over_forward"] > 0
    assert "its own work, timed inside it" in printed and "its network passes took" in printed


def test_own_work_is_the_path_less_its_network_passes() -> None:
    assert own_work([1.2, 1.0], [1.0, 0.9]) == pytest.approx([0.2, 0.1])
    with pytest.raises(ValueError):
        own_work([1.0], [1.0, 1.0])


def test_paired_overhead_is_the_median_of_each_round_s_own_ratio() -> None:
    # rounds: +20 %, +100 % (a slow spell for the path only), +10 %; and a slow spell that hit both
    assert paired_overhead([1.2, 2.0, 1.1], [1.0, 1.0, 1.0]) == pytest.approx(0.2)
    assert paired_overhead([1.2, 2.4, 1.1], [1.0, 2.0, 1.0]) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        paired_overhead([1.0], [1.0, 1.0])


def test_median_interval_takes_the_order_statistics_that_cover_the_median() -> None:
    # 7 rounds: P(Bin(7, 1/2) = 0) = 1/128, so the smallest and largest cover the median with 1 - 2/128
    seven = [0.30, 0.10, 0.25, 0.18, 0.22, 0.09, 0.40]
    assert median_interval(seven) == pytest.approx((0.09, 0.40, 1 - 2 / 128))
    # 9 rounds: the 2nd smallest and 2nd largest, 1 - 2 (1 + 9) / 512; the 3rd would cover 1 - 2 (1 + 9 + 36) / 512
    nine = [float(v) for v in range(9, 0, -1)]
    assert median_interval(nine) == pytest.approx((2.0, 8.0, 1 - 20 / 512))
    assert median_interval(nine, confidence=0.8) == pytest.approx((3.0, 7.0, 1 - 92 / 512))
    # too few rounds for 95 %: the extremes, with the coverage they have
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == pytest.approx((1.0, 5.0, 1 - 2 / 32))
    assert median_interval([2.0]) == pytest.approx((2.0, 2.0, 0.0))
    with pytest.raises(ValueError):
        median_interval([])


def test_nearest_slices_keep_both_ends_and_the_order() -> None:
    assert nearest_slices(5, 3).tolist() == [0, 2, 4]
    assert nearest_slices(3, 5).tolist() == [0, 0, 1, 2, 2]  # 0, 0.5, 1, 1.5, 2 rounded half to even
    up = nearest_slices(20, 100)
    assert up[0] == 0 and up[-1] == 19 and (up[1:] >= up[:-1]).all() and set(up.tolist()) == set(range(20))


def test_bench_reads_an_uncompressed_dicom_series_when_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the command line, with the figures and every round's times written to JSON: the paired figure and
    its interval are those of the rounds in the file."""
    out = tmp_path / "figures.json"
    args = ["bench", "--slices", "12", "--repeats", "3", "--threads", "1", "--format", "dicom", "--json", str(out)]
    assert main(args) == 0
    assert "as uncompressed DICOM" in capsys.readouterr().out
    f = json.loads(out.read_text())
    assert f["format"] == "dicom" and f["slices"] == 12 and f["stages_s"]["read"] > 0
    rounds = f["rounds_s"]
    assert all(len(rounds[k]) == 3 for k in ("read", "decision", "full", "forward", "forward_all", "stage_read"))
    ratios = sorted(t / b - 1 for t, b in zip(rounds["full"], rounds["forward"], strict=True))
    assert f["paired_full_over_forward"] == pytest.approx(ratios[1])
    assert f["paired_full_interval"] == pytest.approx([ratios[0], ratios[2]])  # 3 rounds: the extremes, 75 %
    assert f["paired_interval_coverage"] == pytest.approx(0.75)
    # the full path's share is its own work's share plus how far its network passes differ from the bare forward
    network_s, forward_s = rounds["stage_classify"], rounds["forward"]
    work = sorted((t - n) / b for t, n, b in zip(rounds["full"], network_s, forward_s, strict=True))
    network = sorted(n / b for n, b in zip(network_s, forward_s, strict=True))
    assert f["paired_work_over_forward"] == pytest.approx(work[1])
    assert f["paired_network_over_forward"] == pytest.approx(network[1])
    assert f["paired_network_interval"] == pytest.approx([network[0], network[2]])
    with pytest.raises(ValueError, match="unknown format"):
        run_bench(None, "ct-default", fmt="png")


def test_bench_can_time_the_input_as_it_is_stored(ct_dicom_dir, capsys: pytest.CaptureFixture[str]) -> None:
    """The real series itself: its 20 JPEG 2000 slices and scanner headers, not a resampled rewrite."""
    f = run_bench(ct_dicom_dir, "ct-default", n_slices=100, repeats=1, threads=1, fmt="stored")
    assert f["format"] == "stored" and f["slices"] == 20 and f["stages_s"]["read"] > 0
    assert "20-slice series as stored (dicom" in capsys.readouterr().out


def test_bench_format_follows_the_input_by_default(ct_dicom_dir) -> None:
    from lungsight.bench import bench_format
    from lungsight.examples import EXAMPLE_CT
    from lungsight.io import load_study

    assert bench_format(load_study(ct_dicom_dir)) == "dicom"
    assert bench_format(load_study(EXAMPLE_CT)) == "nifti"
    assert bench_format(load_study(ct_dicom_dir), "nifti") == "nifti"


def test_written_dicom_series_reads_back_to_the_same_slices(tmp_path) -> None:
    """Whole HU in, the same HU, order, spacing and orientation out; nothing identifying in the files."""
    import numpy as np
    import pydicom

    from lungsight.examples import EXAMPLE_CT
    from lungsight.io import load_study
    from lungsight.io.deid import IDENTIFYING_TAGS
    from lungsight.io.export import write_dicom_series

    study = load_study(EXAMPLE_CT)
    hu = np.round(study.pixels)
    files = write_dicom_series(hu, study.spacing, tmp_path / "series")
    back = load_study(tmp_path / "series")
    np.testing.assert_array_equal(back.pixels, hu)
    assert back.spacing == pytest.approx(study.spacing) and back.modality == "CT" and back.intensity == "hu"
    ds = pydicom.dcmread(files[0])
    present = {k for k in IDENTIFYING_TAGS if k in ds}
    assert present <= {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"}
