"""Zip input: DICOM, NIfTI and image contents load; unsafe or oversized zips are refused; no leftovers."""

from __future__ import annotations

import os
import stat
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from lungsight.errors import InputError
from lungsight.io import list_series, load_study
from lungsight.io.archive import extracted_zip


@pytest.fixture
def private_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point :mod:`tempfile` at an empty folder so that leftovers can be seen."""
    folder = tmp_path / "tempdir"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _zip(path: Path, members: dict[str, bytes | Path]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            if isinstance(content, Path):
                archive.write(content, name)
            else:
                archive.writestr(name, content)
    return path


def test_zip_of_dicom_series(ct_dicom_dir: Path, tmp_path: Path, private_tmp: Path) -> None:
    cwd_before = sorted(os.listdir())
    members = {f"export/series/{p.name}": p for p in sorted(ct_dicom_dir.iterdir())}
    members["export/README.txt"] = b"exported by a PACS\n"
    archive = _zip(tmp_path / "series.zip", members)
    study = load_study(archive)
    np.testing.assert_array_equal(study.pixels, load_study(ct_dicom_dir).pixels)
    assert study.source_format == "dicom-series"
    assert [s.n_images for s in list_series(archive)] == [20]
    assert list(private_tmp.iterdir()) == [] and sorted(os.listdir()) == cwd_before


def test_zip_of_nifti_and_of_images(ct_nifti_sm: Path, covid_ct_dir: Path, tmp_path: Path, private_tmp: Path) -> None:
    nifti = load_study(_zip(tmp_path / "vol.zip", {"vol/example.nii.gz": ct_nifti_sm}))
    assert nifti.source_format == "nifti" and nifti.pixels.shape == (30, 101, 122)
    images = sorted(covid_ct_dir.glob("*/*.png"))[:3]
    members = {f"slices/s{i}.png": p for i, p in zip((10, 2, 1), images, strict=True)}
    study = load_study(_zip(tmp_path / "img.zip", members))
    assert study.source_format == "image-folder"
    assert study.slice_labels == ["slices/s1.png", "slices/s2.png", "slices/s10.png"]
    assert list(private_tmp.iterdir()) == []


def test_error_inside_zip_names_the_member_not_the_temp_folder(
    ct_dicom_dir: Path, tmp_path: Path, private_tmp: Path
) -> None:
    members = {p.name: p for p in sorted(ct_dicom_dir.iterdir())[:3]}
    members["bad.dcm"] = b"text"
    archive = _zip(tmp_path / "mixed.zip", members)
    with pytest.raises(InputError, match="not a DICOM file") as info:
        load_study(archive)
    assert str(info.value).startswith(f"{archive}/bad.dcm: ")
    assert str(private_tmp) not in str(info.value)
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        ("../evil.dcm", "outside the archive"),
        ("a/../../evil.dcm", "outside the archive"),
        ("/abs.dcm", "absolute"),
    ],
)
def test_unsafe_member_names(tmp_path: Path, private_tmp: Path, member: str, reason: str) -> None:
    archive = _zip(tmp_path / "evil.zip", {"ok.dcm": b"x", member: b"payload"})
    cwd_before = sorted(os.listdir())
    with pytest.raises(InputError, match=reason) as info:
        load_study(archive)
    assert member in str(info.value)
    assert list(private_tmp.iterdir()) == [] and sorted(os.listdir()) == cwd_before
    assert not (tmp_path / "evil.dcm").exists() and not Path("/abs.dcm").exists()


def test_symlink_member(tmp_path: Path, private_tmp: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        info = zipfile.ZipInfo("link.dcm")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        handle.writestr(info, "/etc/passwd")
    with pytest.raises(InputError, match="symbolic link"):
        load_study(archive)
    assert list(private_tmp.iterdir()) == []


def test_empty_zip(tmp_path: Path, private_tmp: Path) -> None:
    archive = _zip(tmp_path / "empty.zip", {})
    with pytest.raises(InputError, match="empty") as info:
        load_study(archive)
    assert str(archive) in str(info.value)
    assert list(private_tmp.iterdir()) == []


def test_too_many_members_and_too_large(tmp_path: Path, private_tmp: Path) -> None:
    archive = _zip(tmp_path / "many.zip", {f"f{i}.dcm": b"0123456789" for i in range(5)})
    with (
        pytest.raises(InputError, match="5 members exceeds the limit of 4"),
        extracted_zip(archive, "many.zip", max_members=4),
    ):
        pass
    with (
        pytest.raises(InputError, match="50 bytes uncompressed exceeds the limit of 49"),
        extracted_zip(archive, "many.zip", max_bytes=49),
    ):
        pass
    assert list(private_tmp.iterdir()) == []


def test_a_zip_bomb_is_refused_before_anything_is_written(tmp_path: Path, private_tmp: Path) -> None:
    """80 MiB of zeros deflate about a thousand times: refused from the zip's directory, with nothing unpacked."""
    import zipfile

    from lungsight.io.archive import BOMB_MIN_BYTES

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("series/slice.dcm", bytes(BOMB_MIN_BYTES + 16 * 1024**2))
    with (
        pytest.raises(InputError, match=r"bomb\.zip: .* bytes would unpack to 83,886,080 .* refused as a zip bomb"),
        extracted_zip(archive, "bomb.zip"),
    ):
        pass
    assert list(private_tmp.iterdir()) == []


def test_not_a_zip(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(InputError, match="not a readable zip file"):
        load_study(tmp_path / "broken.zip")


def test_temporary_folder_removed_after_success(tmp_path: Path, private_tmp: Path) -> None:
    archive = _zip(tmp_path / "one.zip", {"a/b.txt": b"hello"})
    with extracted_zip(archive, "one.zip") as root:
        assert (root / "a" / "b.txt").read_bytes() == b"hello"
        assert root.parent == private_tmp
    assert not root.exists() and list(private_tmp.iterdir()) == []
