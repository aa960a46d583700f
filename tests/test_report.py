"""The self-contained HTML report."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest

from lungsight.about import DISCLAIMER
from lungsight.explain import save_overlay
from lungsight.report import write_report

DATA_PNG = "data:image/png;base64,"


def _rule(label: str, positive: bool, score: float, rule: str) -> dict:
    return {
        "label": label,
        "rule": rule,
        "positive": positive,
        "score": score,
        "n_slices": 12,
        "n_positive": 5,
    }


@pytest.fixture
def result(tmp_path: Path) -> dict:
    rng = np.random.default_rng(0)
    for i in (5, 7):
        cam = np.zeros((4, 4), dtype=np.float32)
        cam[1:3, 1:3] = 1.0
        save_overlay(rng.random((24, 24)), cam, tmp_path / "overlays" / f"slice_{i:04d}.png", caption=f"slice {i}")
    decision = {**_rule("covid", True, 0.42, "threshold-10"), "params": {"fraction": 0.1}}
    return {
        "lungsight_version": "0.1.0",
        "disclaimer": DISCLAIMER,
        "input": {
            "modality": "CT",
            "intensity": "hu",
            "source_format": "dicom-series",
            "n_slices": 20,
            "shape": [20, 512, 512],
            "spacing_mm": [1.5, 0.7, 0.7],
            "metadata": {
                "Manufacturer": "ACME",
                "PatientName": "Doe^Jane^Fixture",
                "PatientID": "LS-FIXTURE-0042",
                "PatientBirthDate": "19700101",
                "InstitutionName": "Fixture General Hospital",
                "StudyInstanceUID": "1.2.3.4",
            },
            "warnings": ["<script>alert('x')</script> slice gap"],
            "other_series": ["series 2: 3 slices (scout)"],
        },
        "model": {
            "name": "ct-default",
            "arch": "resnet18",
            "sha256": "ab" * 32,
            "classes": ["non-covid", "covid"],
            "input_size": 224,
        },
        "decision": decision,
        "rules": {
            "threshold-0": _rule("covid", True, 5.0, "threshold-0"),
            "threshold-10": decision,
            "consecutive": _rule("non-covid", False, 3.0, "consecutive"),
            "mean": _rule("covid", True, 0.61, "mean"),
        },
        "probabilities": {"covid": 0.61, "non-covid": 0.39},
        "slices": {
            "n_total": 20,
            "selected": list(range(3, 15)),
            "dropped": [0, 1, 2, *range(15, 20)],
            "selection": {"method": "dark-pixel (paper 002, HU)", "threshold": 1234.0},
        },
        "slice_probabilities": [
            {"index": i, "label": f"slice {i:04d}", "selected": 3 <= i < 15, "p": i / 20} for i in range(20)
        ],
        "overlays": [
            {"index": 5, "label": "slice 0005", "p": 0.97, "file": "overlays/slice_0005.png"},
            {
                "index": 7,
                "label": "slice 0007",
                "p": 0.88,
                "file": "overlays/slice_0007.png",
                "lung_share": 0.25,
            },
        ],
        "timings_s": {"read": 0.1, "preprocess": 0.05, "inference": 0.4, "explain": 0.3, "total": 0.9},
        "warnings": ["only 12 slices kept"],
    }


def test_report_is_self_contained(tmp_path: Path, result: dict) -> None:
    path = write_report(result, tmp_path)
    assert path == tmp_path / "report.html" and path.is_file()
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert 'src="overlays' not in text and "<script" not in text
    assert text.count(DATA_PNG) == 2  # the two overlays
    assert len(re.findall(r"<img ", text)) == 2
    assert text.count("<svg") == 1 and "xmlns" not in text  # the slice chart, inline
    assert DISCLAIMER in text
    assert "threshold-10" in text and ">covid<" in text
    for rule in ("threshold-0", "consecutive", "mean"):
        assert rule in text
    assert "slice 0005 · p = 0.97<" in text and "slice 0007 · p = 0.88 · lung share = 0.25<" in text
    assert "abababababab…" in text and "ab" * 32 not in text
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_report_escapes_text_and_drops_identifying_metadata(tmp_path: Path, result: dict) -> None:
    text = write_report(result, tmp_path).read_text(encoding="utf-8")
    assert "&lt;script&gt;alert('x')&lt;/script&gt; slice gap" in text
    assert "ACME" in text
    for value in ("Doe^Jane^Fixture", "LS-FIXTURE-0042", "19700101", "Fixture General Hospital", "1.2.3.4"):
        assert value not in text


@pytest.mark.parametrize(
    "drop",
    ["input", "model", "decision", "rules", "probabilities", "slices", "slice_probabilities", "overlays",
     "timings_s", "warnings", "disclaimer", "lungsight_version"],
)  # fmt: skip
def test_missing_sections_do_not_crash(tmp_path: Path, result: dict, drop: str) -> None:
    partial = copy.deepcopy(result)
    del partial[drop]
    text = write_report(partial, tmp_path).read_text(encoding="utf-8")
    assert DISCLAIMER in text


def test_empty_malformed_and_unsafe_results(tmp_path: Path) -> None:
    text = write_report({}, tmp_path / "new" / "dir").read_text(encoding="utf-8")
    assert DISCLAIMER in text and DATA_PNG not in text
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "out").mkdir()
    odd = {
        "decision": {"label": None, "positive": "maybe"},
        "rules": None,
        "probabilities": {"covid": "high"},
        "slices": [1, 2],
        "slice_probabilities": [None, {"p": "x"}, {"index": 1, "p": 0.5}],
        "overlays": [{"file": "../secret.png"}, {"file": "missing.png", "p": 0.5}, "junk", {}],
        "input": {"metadata": None, "warnings": "not a list", "shape": 5},
        "model": {"sha256": 12},
        "timings_s": {"total": None},
        "warnings": None,
    }
    text = write_report(odd, tmp_path / "out").read_text(encoding="utf-8")
    assert DATA_PNG not in text  # nothing outside out_dir, nothing missing is embedded
    assert "image not available" in text
