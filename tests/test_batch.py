"""``lungsight batch``: many studies in one run, each answered by its own model, failures recorded, resumable."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from lungsight.cli import main
from lungsight.errors import InputError
from lungsight.inference import batch
from lungsight.inference.batch import list_studies, predict_batch, read_study_list
from test_cli import assert_no_phi


def _rows(out: Path) -> list[dict[str, str]]:
    with open(out / "summary.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_list_studies_takes_each_entry_in_natural_order_without_notes(tmp_path):
    for name in ("s10.nii.gz", "s2.dcm", "README.txt", ".hidden.dcm", "labels.csv", "Thumbs.db"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "series_1").mkdir()
    assert [p.name for p in list_studies(tmp_path)] == ["s2.dcm", "s10.nii.gz", "series_1"]


def test_a_folder_with_no_study_is_one_error_naming_it(tmp_path):
    (tmp_path / "notes.txt").write_text("nothing to read")
    with pytest.raises(InputError, match=f"{tmp_path}: no study in it"):
        list_studies(tmp_path)
    with pytest.raises(InputError, match="not a folder"):
        list_studies(tmp_path / "notes.txt")


def test_a_ct_series_folder_is_not_taken_for_a_folder_of_studies(ct_dicom_dir, tmp_path):
    with pytest.raises(InputError, match=f"{ct_dicom_dir}: 20 of its files are slices of one CT series"):
        list_studies(ct_dicom_dir)
    shutil.copy(sorted(ct_dicom_dir.iterdir())[0], tmp_path / "one_slice.dcm")
    (tmp_path / "other.nii.gz").write_bytes(b"x")
    assert [p.name for p in list_studies(tmp_path)] == ["one_slice.dcm", "other.nii.gz"]


def test_a_list_file_names_studies_relative_to_itself(tmp_path):
    lst = tmp_path / "cohort.txt"
    lst.write_text("# cohort A\n\na/series\n/abs/study.nii.gz\n")
    assert read_study_list(lst) == [tmp_path / "a" / "series", Path("/abs/study.nii.gz")]
    lst.write_text("# only a comment\n")
    with pytest.raises(InputError, match="lists no study"):
        read_study_list(lst)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, shared_data, ct_phi_dir) -> Path:
    """A real mixed cohort: a DICOM series with identifying tags, a NIfTI volume, a frontal X-ray, and two bad
    inputs (a text file named .dcm, an empty zip)."""
    root = tmp_path_factory.mktemp("cohort")
    shutil.copytree(ct_phi_dir, root / "b_series")
    shutil.copy(shared_data / "ct-volume" / "example_ct_sm.nii.gz", root / "a_volume.nii.gz")
    meta = shared_data / "cxr-cohen" / "metadata.csv"
    with open(meta, newline="") as f:
        pa = next(r for r in csv.DictReader(f) if r["view"] == "PA")
    shutil.copy(shared_data / "cxr-cohen" / "images" / pa["file"], root / f"c_xray{Path(pa['file']).suffix}")
    (root / "d_broken.dcm").write_text("this is not DICOM")
    (root / "e_empty.zip").write_bytes(b"")
    return root


@pytest.mark.slow
def test_batch_answers_each_study_with_its_model_and_records_failures(tmp_path, capsys, cohort, monkeypatch):
    from lungsight.inference.detector import Detector

    loads: list[str] = []
    real = Detector.from_pretrained.__func__  # type: ignore[attr-defined]
    monkeypatch.setattr(Detector, "from_pretrained", classmethod(lambda cls, n: loads.append(str(n)) or real(cls, n)))
    out = tmp_path / "out"
    code = main(["batch", str(cohort), "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 2  # some studies failed: non-zero, after every study was tried
    assert "2 of 5 studies could not be analysed" in printed.err
    rows = _rows(out)
    assert [r["study"] for r in rows] == [f"study_{k:04d}" for k in range(1, 6)]
    by_input = {Path(r["input"]).name: r for r in rows}
    vol, series, xray = (
        by_input["a_volume.nii.gz"],
        by_input["b_series"],
        next(r for n, r in by_input.items() if n.startswith("c_xray")),
    )
    assert vol["status"] == series["status"] == xray["status"] == "ok"
    assert vol["model"] == series["model"] == "ct-default" and xray["model"] == "cxr-default"
    assert series["n_slices"] == "20" and vol["n_slices"] == "30"
    assert xray["modality"] == "XR" and 0.0 <= float(xray["lung_share"]) <= 1.0
    assert sorted(loads) == ["ct-default", "cxr-default"]  # each model loaded once for the whole batch
    broken, empty = by_input["d_broken.dcm"], by_input["e_empty.zip"]
    assert broken["status"] == empty["status"] == "error"
    assert "d_broken.dcm" in broken["error"] and "not a DICOM file" in broken["error"]
    assert "e_empty.zip" in empty["error"]
    for r in (vol, series, xray):
        result = json.loads((out / "studies" / r["study"] / "result.json").read_text())
        assert result["decision"]["label"] == r["label"]
        assert (out / r["report"]).is_file()
    assert not (out / "studies" / broken["study"]).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["n_ok"], summary["n_failed"]) == (3, 2) and "not a medical device" in summary["disclaimer"]
    index = (out / "index.html").read_text()
    assert "not a medical device" in index and 'href="studies/study_0001/report.html"' in index
    assert_no_phi(out, printed.out + printed.err)
    # The input folder is untouched.
    assert sorted(p.name for p in cohort.iterdir())[:2] == ["a_volume.nii.gz", "b_series"]


@pytest.mark.slow
def test_resume_skips_finished_studies_and_refuses_another_list(tmp_path, cohort, monkeypatch):
    studies = [cohort / "a_volume.nii.gz", cohort / "d_broken.dcm"]
    out = tmp_path / "out"
    first = predict_batch(studies, out, progress=None)
    assert [r["status"] for r in first.rows] == ["ok", "error"]
    with pytest.raises(InputError, match="pass --resume"):
        predict_batch(studies, out, progress=None)
    lines: list[str] = []
    monkeypatch.setattr(batch, "_row_from_result", lambda *a: pytest.fail("a finished study was predicted again"))
    again = predict_batch(studies, out, resume=True, progress=lines.append)
    assert "skipped" in lines[0] and [r["status"] for r in again.rows] == ["ok", "error"]
    with pytest.raises(InputError, match="different settings"):
        predict_batch(studies[:1], out, resume=True, progress=None)


def test_cli_needs_a_folder_or_a_list(capsys, tmp_path):
    assert main(["batch", "--out", str(tmp_path / "o")]) == 2
    assert "a folder of studies or --list" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
