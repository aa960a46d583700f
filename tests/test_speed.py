"""``lungsight speed``: the table after paper 002's Table 7 — files, columns, skip logic, errors.

Timings themselves are not asserted (shared cores make them noisy); what is asserted is what could break: the
three files and their columns, which cells are measured and which are skipped, and the one-line errors.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from lungsight.bench import resampled_nifti
from lungsight.cli import main
from lungsight.errors import InputError
from lungsight.examples import EXAMPLE_CT
from lungsight.inference.detector import Detector
from lungsight.io import load_study
from lungsight.speed import (
    COLUMNS,
    CellTimes,
    OnDevice,
    estimate_seconds,
    load_detector,
    parse_model,
    pick_device,
    run_speed,
)


def _csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_tiny_run_writes_csv_json_png_with_the_right_columns(tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed"
    code = main(
        [
            *("speed", "--out", str(out), "--models", "ct-default,resnet18:32"),
            *("--slices", "20", "30", "--repeats", "1", "--threads", "1"),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["speed.csv", "speed.json", "speed.png"]  # no temp files left

    header, rows = _csv(out / "speed.csv")
    assert header == list(COLUMNS)
    assert [(r["model"], int(r["slices"])) for r in rows] == [
        ("ct-default", 20),
        ("ct-default", 30),
        ("resnet18:32", 20),
        ("resnet18:32", 30),
    ]
    assert [r["trained"] for r in rows] == ["True", "True", "False", "False"]
    assert {r["input_px"] for r in rows} == {"192", "32"}  # ct-default reads 192 px
    for r in rows:
        assert r["skipped"] == "False" and r["threads"] == "1" and r["device"] == "cpu"
        # the whole path includes a forward of the same slices, but with one repeat on shared cores either may come
        # out faster (the bundled crop keeps most of its slices): only the figures' consistency is asserted
        full, forward = float(r["seconds_per_study"]), float(r["forward_s"])
        assert full > 0 and forward > 0 and float(r["forward_share"]) == pytest.approx(forward / full, abs=2e-3)
        assert 0 < int(r["slices_classified"]) <= int(r["slices"])
        assert float(r["slices_per_s"]) == pytest.approx(int(r["slices"]) / float(r["seconds_per_study"]), rel=1e-2)
        assert float(r["peak_rss_mib"]) > 0

    meta = json.loads((out / "speed.json").read_text())
    assert meta["machine"]["cpu_count"] >= 1 and meta["machine"]["torch_version"] == torch.__version__
    assert meta["machine"]["torch_threads"] == 1 and meta["machine"]["device"] == "cpu"
    assert meta["repeats"] == 1 and len(meta["rows"]) == 4
    assert any("untrained" in n and "resnet18:32" in n for n in meta["notes"])
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "s/study" in printed and "resnet18:32*" in printed


def test_cells_over_max_seconds_are_skipped_from_a_smaller_counts_time(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []  # (series length on disk, repeats)

    def fake_measure(det: Detector, path: Path, repeats: int) -> CellTimes:
        n = int(path.name.split("-")[1].split(".")[0])
        calls.append((n, repeats))
        return CellTimes(full_s=0.1 * n, forward_s=0.01 * n, slices_classified=n // 2)

    rows = run_speed(
        tmp_path,
        models=["resnet18:32"],
        slices=[80, 10, 20, 40],
        repeats=2,
        max_seconds=5.0,
        measure=fake_measure,
    )
    # warm-up on the smallest series, then 10, 20, 40 (4 s); 80 would take 8 s > 5 s and is never run
    assert calls == [(10, 1), (10, 2), (20, 2), (40, 2)]
    assert [(r["slices"], r["skipped"]) for r in rows] == [(10, False), (20, False), (40, False), (80, True)]
    assert rows[-1]["estimated_s"] == pytest.approx(8.0) and rows[-1]["seconds_per_study"] is None
    assert rows[2]["seconds_per_study"] == pytest.approx(4.0) and rows[2]["slices_per_s"] == pytest.approx(10.0)
    _, written = _csv(tmp_path / "speed.csv")
    assert [r["skipped"] for r in written] == ["False", "False", "False", "True"]
    assert written[-1]["seconds_per_study"] == ""


def test_estimate_extrapolates_linearly_from_the_largest_smaller_count() -> None:
    assert estimate_seconds({}, 100) is None
    assert estimate_seconds({50: 9.0}, 20) is None
    assert estimate_seconds({20: 1.0, 50: 2.0}, 200) == pytest.approx(8.0)


def test_models_are_named_models_or_untrained_architectures_with_an_optional_size() -> None:
    assert parse_model("covidnet:160") == ("covidnet", 160)
    assert parse_model("ct-default") == ("ct-default", None)
    det, trained = load_detector("covidnet:64")
    assert not trained and det.config["input_size"] == 64 and det.entry is None
    with pytest.raises(InputError, match="whole number"):
        parse_model("resnet18:big")
    with pytest.raises(InputError, match="registered architectures only"):
        load_detector("ct-default:64")


def test_cuda_is_used_only_when_available() -> None:
    dev, note = pick_device("cuda")
    if torch.cuda.is_available():
        assert dev.type == "cuda" and note is None
    else:
        assert dev.type == "cpu" and "not available" in note
    assert pick_device("cpu") == (torch.device("cpu"), None)


def test_the_device_wrapper_keeps_predictions_and_grad_cam(tmp_path: Path) -> None:
    """What ``--device cuda`` runs, exercised on the CPU: the wrapped model must give the same answer and maps."""
    det, _ = load_detector("resnet18:32")
    via = Detector(OnDevice(det.model, torch.device("cpu")), det.config)
    assert via.model.cam_layer is det.model.cam_layer
    study = load_study(resampled_nifti(EXAMPLE_CT, 20, tmp_path / "s.nii.gz"))
    a, b = det.predict(study), via.predict(study)
    assert a.result["slices"]["selected"] == b.result["slices"]["selected"]
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    assert len(a.evidence) == len(b.evidence) == 4
    for ea, eb in zip(a.evidence, b.evidence, strict=True):
        assert ea.index == eb.index and ea.cam == pytest.approx(eb.cam, abs=1e-5)


def test_unknown_model_is_a_one_line_error_and_writes_nothing(tmp_path: Path, capsys) -> None:
    out = tmp_path / "speed"
    code = main(["speed", "--out", str(out), "--models", "ct-default,no-such-model", "--slices", "20"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and err[0].startswith("lungsight: error:") and "no-such-model" in err[0]
    assert not out.exists()


def test_an_xray_model_is_refused_with_a_reason():
    from lungsight.errors import InputError
    from lungsight.speed import load_detector

    with pytest.raises(InputError, match="times CT series"):
        load_detector("cxr-default")
