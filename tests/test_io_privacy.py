"""No identifying DICOM value may reach a Study, a warning, an error message or a log record."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from lungsight.errors import LungsightError
from lungsight.io import list_series, load_study
from lungsight.io.deid import (
    DERIVED_KEYS,
    IDENTIFYING_TAGS,
    METADATA_WHITELIST,
    identifying_values,
    redact,
    whitelisted_metadata,
)

PHI = (
    "Doe",
    "Jane",
    "LS-FIXTURE-0042",
    "19700101",
    "Fixture General Hospital",
    "ACC-FIXTURE-77",
    "House",
    "Gregory",
)


def _assert_clean(text: str) -> None:
    lowered = text.lower()
    leaked = [value for value in PHI if value.lower() in lowered]
    assert not leaked, f"identifying values {leaked} in: {text[:300]}"


def _study_text(study) -> str:
    return "\n".join(
        [
            repr(study),
            json.dumps(study.summary()),
            *study.warnings,
            *study.slice_labels,
            repr(study.other_series),
        ]
    )


def test_fixture_really_holds_phi(ct_phi_dir: Path, dicom_read) -> None:
    ds = dicom_read(sorted(ct_phi_dir.iterdir())[0], pixels=False)
    assert "Doe" in str(ds.PatientName) and ds.PatientID == "LS-FIXTURE-0042"
    assert {"Doe", "Jane", "LS-FIXTURE-0042", "Fixture General Hospital"} <= identifying_values(ds)


def test_loaded_study_has_no_phi(ct_phi_dir: Path, caplog: pytest.LogCaptureFixture, recwarn) -> None:
    with caplog.at_level(logging.DEBUG):
        study = load_study(ct_phi_dir)
    assert study.n_slices == 20
    _assert_clean(_study_text(study))
    assert set(study.metadata) <= set(METADATA_WHITELIST) | set(DERIVED_KEYS)
    _assert_clean("\n".join(r.getMessage() for r in caplog.records))
    _assert_clean("\n".join(str(w.message) for w in recwarn))


def test_multi_series_warning_and_listing_have_no_phi(ct_phi_dir: Path, tmp_path: Path, dicom_copy) -> None:
    folder = tmp_path / "two"
    shutil.copytree(ct_phi_dir, folder)
    uid = generate_uid()

    def second(ds, i):
        ds.SeriesInstanceUID = uid
        return i < 4

    dicom_copy(ct_phi_dir, folder, second, rename=lambda i, _: f"b{i}.dcm")
    study = load_study(folder)
    assert study.other_series and study.warnings
    text = _study_text(study) + repr(list_series(folder))
    _assert_clean(text)
    assert uid not in text  # UIDs are pseudo-identifiers: only their short hash is shown
    with pytest.raises(LungsightError) as info:
        load_study(folder, series_uid="no-such-series")
    _assert_clean(str(info.value))
    assert uid not in str(info.value)


@pytest.mark.parametrize("damage", ["truncate", "garble-header", "drop-pixels", "text"])
def test_errors_on_damaged_phi_files_have_no_phi(ct_phi_dir: Path, tmp_path: Path, damage: str) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(ct_phi_dir, folder)
    victim = sorted(folder.iterdir())[5]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[:-50_000])
    elif damage == "garble-header":
        victim.write_bytes(data[:600] + bytes(range(256)) * 4 + data[1624:])
    elif damage == "drop-pixels":
        victim.write_bytes(data[: data.rfind(b"\xe0\x7f\x10\x00")])
    else:
        victim.write_bytes(data[128:132] + b" Doe^Jane LS-FIXTURE-0042")
    with pytest.raises(LungsightError) as info:
        load_study(folder)
    _assert_clean(str(info.value))
    with pytest.raises(LungsightError) as info:
        load_study(victim)
    assert str(info.value).startswith(str(victim))
    _assert_clean(str(info.value))


def test_decoder_error_quoting_phi_is_redacted(ct_phi_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(self: Dataset) -> None:
        raise ValueError(f"cannot decode frame for {self.PatientName} ({self.PatientID}) at {self.InstitutionName}")

    monkeypatch.setattr(Dataset, "pixel_array", property(failing))
    with pytest.raises(LungsightError, match="corrupt pixel data") as info:
        load_study(ct_phi_dir)
    assert "[redacted]" in str(info.value)
    _assert_clean(str(info.value))


def test_whitelist_and_identifying_tags_are_disjoint() -> None:
    assert not set(METADATA_WHITELIST) & set(IDENTIFYING_TAGS)
    assert "SeriesDescription" not in METADATA_WHITELIST and "SeriesInstanceUID" in IDENTIFYING_TAGS


def test_whitelisted_metadata_ignores_everything_else() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^Jane"
    ds.SeriesDescription = "Jane Doe chest"
    ds.Modality = "CT"
    ds.KVP = "120"
    ds.ConvolutionKernel = ["Br38f", "3"]
    assert whitelisted_metadata(ds) == {"Modality": "CT", "KVP": 120.0, "ConvolutionKernel": ["Br38f", "3"]}


def test_redact_is_case_insensitive_and_one_line() -> None:
    assert redact("bad\nvalue DOE^jane here", {"Doe^Jane"}) == "bad value [redacted] here"
