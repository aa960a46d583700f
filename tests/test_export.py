"""``lungsight deid``: a de-identified copy holds the pixels and whitelisted metadata, reads back the same, and
never replaces a file."""

from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from lungsight.cli import main
from lungsight.errors import OutputError
from lungsight.io import load_study
from lungsight.io.export import export_deidentified, write_nifti
from lungsight.study import Study
from test_cli import assert_no_phi


def test_a_dicom_series_with_identifying_tags_reads_back_identical_and_clean(tmp_path, capsys, ct_phi_dir):
    out = tmp_path / "copy"
    assert main(["deid", str(ct_phi_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    original, copy = load_study(ct_phi_dir), load_study(out / "study.nii.gz")
    assert np.array_equal(original.pixels, copy.pixels)  # same slices, same order, same HU
    assert copy.spacing == pytest.approx(original.spacing)
    assert nib.load(out / "study.nii.gz").get_data_dtype() == np.int16
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["files"] == ["study.nii.gz"] and meta["study"]["n_slices"] == 20
    assert any("burned into the pixels" in n for n in meta["not_removed"])
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "study.nii.gz"]
    assert_no_phi(out, printed.out + printed.err)
    header = nib.load(out / "study.nii.gz").header
    assert header["descrip"].tobytes().strip(b"\0") == b""


def test_fractional_hu_are_kept_as_float(tmp_path):
    pixels = np.linspace(-1000.5, 200.25, 4 * 6 * 5, dtype=np.float32).reshape(4, 6, 5)
    path = write_nifti(pixels, (2.5, 0.7, 0.8), tmp_path / "v.nii.gz")
    back = load_study(path)
    assert nib.load(path).get_data_dtype() == np.float32
    assert np.array_equal(back.pixels, pixels) and back.spacing == pytest.approx((2.5, 0.7, 0.8))


def test_images_are_copied_at_their_bit_depth_without_their_names(tmp_path, covid_ct_dir):
    folder = tmp_path / "Patient_Smith_slices"
    folder.mkdir()
    for i, f in enumerate(sorted((covid_ct_dir / "NonCOVID").glob("*.png"))[:3]):
        shutil.copy(f, folder / f"smith_{i}.png")
    study = load_study(folder)
    written = export_deidentified(study, tmp_path / "copy")
    names = [p.relative_to(tmp_path / "copy").as_posix() for p in written]
    assert names == ["slices/slice_0001.png", "slices/slice_0002.png", "slices/slice_0003.png", "metadata.json"]
    assert "smith" not in (tmp_path / "copy" / "metadata.json").read_text().lower()
    back = load_study(tmp_path / "copy" / "slices")
    assert back.intensity == "grey8" and back.pixels.shape == study.pixels.shape
    assert np.abs(back.pixels - study.pixels).max() <= 0.5  # the reader resized them to one size: levels rounded

    deep = Study(pixels=np.array([[[0, 1000], [40000, 65535]]], np.float32), modality="XR", intensity="grey16")
    export_deidentified(deep, tmp_path / "xr")
    again = load_study(tmp_path / "xr" / "image.png", modality="XR")
    assert again.intensity == "grey16" and np.array_equal(again.pixels, deep.pixels)


def test_nothing_is_replaced(tmp_path):
    study = Study(pixels=np.full((3, 4, 4), -1000, np.float32), modality="CT", intensity="hu")
    (tmp_path / "study.nii.gz").write_bytes(b"the user's own file")
    with pytest.raises(OutputError, match="already exists"):
        export_deidentified(study, tmp_path)
    assert (tmp_path / "study.nii.gz").read_bytes() == b"the user's own file"
    assert not (tmp_path / "metadata.json").exists()
