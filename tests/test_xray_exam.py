"""A folder or zip of X-ray images given without a modality: an exam (PA + lateral) is read as its frontal view.

Real pairs from cxr-cohen: the same patient and day ("offset") with a PA and a lateral view. Before this, such a
folder was read as a 2-slice CT and classified by the CT model.
"""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lungsight.cli import main
from lungsight.errors import InputContractError
from lungsight.inference.route import load_for_prediction
from lungsight.io import load_study


def _rows(shared_data: Path) -> list[dict[str, str]]:
    with open(shared_data / "cxr-cohen" / "metadata.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _image(shared_data: Path, row: dict[str, str]) -> Path:
    return shared_data / "cxr-cohen" / "images" / row["file"]


@pytest.fixture(scope="module")
def exam(shared_data: Path) -> tuple[Path, Path]:
    """(PA, lateral) image files of one real exam."""
    rows = _rows(shared_data)
    for pa in rows:
        if pa["view"] != "PA":
            continue
        lateral = [
            r for r in rows if r["view"] == "L" and (r["patientid"], r["offset"]) == (pa["patientid"], pa["offset"])
        ]
        if lateral:
            return _image(shared_data, pa), _image(shared_data, lateral[0])
    pytest.skip("no PA + lateral exam in cxr-cohen")


def _folder(tmp_path: Path, *files: Path) -> Path:
    folder = tmp_path / "exam"
    folder.mkdir(parents=True)
    for k, f in enumerate(files):
        shutil.copy(f, folder / f"{k}-{f.name}")
    return folder


def test_an_exam_folder_is_read_as_its_frontal_view_at_its_own_size(exam, tmp_path):
    pa, lateral = exam
    folder = _folder(tmp_path, lateral, pa)  # the lateral first: order does not decide
    study, model = load_for_prediction(folder)
    alone = load_study(pa, modality="XR")
    assert (study.modality, study.n_slices, model) == ("XR", 1, "cxr-default")
    np.testing.assert_array_equal(study.pixels, alone.pixels)  # not resized to the lateral's size
    note = study.warnings[0]
    assert f"1-{pa.name} is the frontal view" in note and f"lateral: {folder}/0-{lateral.name}" in note


def test_an_exam_zip_is_read_the_same_way(exam, tmp_path):
    pa, lateral = exam
    archive = tmp_path / "exam.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(pa, f"study/{pa.name}")
        z.write(lateral, f"study/{lateral.name}")
    study, model = load_for_prediction(archive)
    assert (study.modality, study.n_slices, model) == ("XR", 1, "cxr-default")
    np.testing.assert_array_equal(study.pixels, load_study(pa, modality="XR").pixels)


def test_laterals_only_and_two_frontals_are_refused_naming_the_files(exam, shared_data, tmp_path):
    pa, lateral = exam
    other_lateral = next(
        _image(shared_data, r) for r in _rows(shared_data) if r["view"] == "L" and _image(shared_data, r) != lateral
    )
    with pytest.raises(InputContractError, match="none of the 2 images is a frontal chest X-ray") as info:
        load_study(_folder(tmp_path / "a", lateral, other_lateral), modality="XR")
    assert lateral.name in str(info.value) and other_lateral.name in str(info.value)
    other_pa = next(
        _image(shared_data, r) for r in _rows(shared_data) if r["view"] == "PA" and _image(shared_data, r) != pa
    )
    folder = _folder(tmp_path / "b", pa, other_pa)
    with pytest.raises(InputContractError, match="2 frontal X-rays") as info:
        load_for_prediction(folder)
    assert pa.name in str(info.value) and other_pa.name in str(info.value) and "\n" not in str(info.value)


def test_radiographs_mixed_with_ct_slices_are_refused(exam, covid_ct_dir, tmp_path):
    pa, _ = exam
    ct = sorted(covid_ct_dir.glob("*/*.png"))[0]
    folder = _folder(tmp_path, pa, ct)
    with pytest.raises(InputContractError, match="1 of these 2 images look like X-rays") as info:
        load_for_prediction(folder)
    assert pa.name in str(info.value) and ct.name not in str(info.value)
    assert str(info.value).startswith(f"{folder}: ")  # the folder is named, not only the files inside it
    # stating the modality settles it: as CT the X-ray is simply a slice of another size
    study, model = load_for_prediction(folder, modality="CT")
    assert (study.modality, model) == ("CT", "ct-default")


def test_a_small_folder_of_ct_slices_stays_ct(covid_ct_dir, tmp_path):
    folder = _folder(tmp_path, *sorted(covid_ct_dir.glob("*/*.png"))[:3])
    study, model = load_for_prediction(folder)
    assert (study.modality, study.n_slices, model) == ("CT", 3, "ct-default")


def test_cli_predicts_an_exam_folder_with_the_xray_model(exam, tmp_path, capsys):
    pa, lateral = exam
    out = tmp_path / "out"
    assert main(["predict", str(_folder(tmp_path, pa, lateral)), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "is the frontal view of this exam" in captured.err
    assert "evidence in lungs" in captured.out and (out / "report.html").is_file()


def test_a_dicom_exam_loads_its_frontal_series_whatever_the_uids(shared_data, tmp_path):
    """Two one-image radiograph series (PA and lateral): the frontal one is loaded, never the lateral by chance of
    the series UIDs' order."""
    import pydicom
    from pydicom.uid import generate_uid

    sources = sorted((shared_data / "ct-volume" / "dicom").iterdir())[:2]
    for attempt in range(6):
        folder = tmp_path / f"exam{attempt}"
        folder.mkdir()
        for src, view in zip(sources, ("PA", "LL") if attempt % 2 else ("LL", "PA"), strict=True):
            ds = pydicom.dcmread(src)
            ds.Modality, ds.ViewPosition, ds.SeriesInstanceUID = "DX", view, generate_uid()
            ds.save_as(folder / f"{view}.dcm")
        study = load_study(folder)
        assert (study.modality, study.metadata["ViewPosition"]) == ("XR", "PA")
        assert any("1 other series not loaded" in w for w in study.warnings)
