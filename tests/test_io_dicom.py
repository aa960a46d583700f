"""DICOM reading on the real 20-slice CT series and on modified copies of it."""

from __future__ import annotations

import random
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.uid import JPEGLSLossless, generate_uid

from lungsight.errors import InputContractError, InputError, UnsupportedInputError
from lungsight.io import list_series, load_study
from lungsight.io.deid import DERIVED_KEYS, METADATA_WHITELIST, series_id


@pytest.fixture(scope="module")
def real(ct_dicom_dir: Path):
    return load_study(ct_dicom_dir)


def test_real_series_shape_hu_spacing(real, ct_dicom_dir: Path) -> None:
    assert real.modality == "CT" and real.intensity == "hu" and real.source_format == "dicom-series"
    assert real.pixels.shape == (20, 512, 512) and real.pixels.dtype == np.int16  # 12 bits, intercept -1024
    assert real.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    air = real.pixels[:, 20:60, 200:300]  # above the patient, inside the field of view
    assert -1050 < float(np.median(air)) < -950
    assert real.pixels.min() >= -1024 and real.pixels.max() < 3100
    assert real.slice_labels[0] == "slice 0000"
    assert real.warnings == [] and real.other_series == []
    assert set(real.metadata) <= set(METADATA_WHITELIST) | set(DERIVED_KEYS)
    assert real.metadata["series_id"] == series_id("") and real.metadata["orientation"] == "axial"


def test_real_series_sorted_by_position(real, ct_dicom_dir: Path, dicom_read) -> None:
    """Find each loaded slice's file: their positions projected on the normal must increase."""
    by_file = {}
    for path in ct_dicom_dir.glob("*.dcm"):
        ds = dicom_read(path)
        iop = np.asarray(ds.ImageOrientationPatient, dtype=float)
        projected = float(np.asarray(ds.ImagePositionPatient, dtype=float) @ np.cross(iop[:3], iop[3:]))
        by_file[projected] = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    order = [next(z for z, hu in by_file.items() if np.array_equal(hu, plane)) for plane in real.pixels]
    assert len(set(order)) == 20 and np.all(np.diff(order) > 0)  # inferior (lowest z) first
    assert np.diff(order) == pytest.approx(real.spacing[0])


def test_order_survives_renamed_files_and_scrambled_instance_numbers(
    real, ct_dicom_dir: Path, tmp_path: Path, dicom_copy
) -> None:
    numbers = list(range(1, 21))
    random.Random(7).shuffle(numbers)

    def scramble(ds, i):
        ds.InstanceNumber = numbers[i]

    dicom_copy(ct_dicom_dir, tmp_path / "s", scramble, rename=lambda i, _: f"img{19 - i}.dcm")
    np.testing.assert_array_equal(load_study(tmp_path / "s").pixels, real.pixels)


def test_without_positions_instance_number_orders_and_warns(
    real, ct_dicom_dir: Path, tmp_path: Path, dicom_copy
) -> None:
    def drop_position(ds, _):
        del ds.ImagePositionPatient

    dicom_copy(ct_dicom_dir, tmp_path / "s", drop_position)
    study = load_study(tmp_path / "s")
    # InstanceNumber increases towards the feet in this series, so the order is the reverse of the sorted one
    np.testing.assert_array_equal(study.pixels, real.pixels[::-1])
    assert any("InstanceNumber" in w for w in study.warnings)


def test_multi_series_largest_chosen_and_series_uid_picks(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    folder = tmp_path / "two"
    shutil.copytree(ct_dicom_dir, folder)
    uid = generate_uid()

    def second_series(ds, i):
        if i >= 5:
            return False
        ds.SeriesInstanceUID = uid
        ds.RescaleIntercept = -1000  # tell the copies apart by value
        return None

    dicom_copy(ct_dicom_dir, folder, second_series, rename=lambda i, _: f"second_{i}.dcm")
    study = load_study(folder)
    assert study.n_slices == 20
    assert [(s.series_uid, s.n_images, s.orientation) for s in study.other_series] == [(series_id(uid), 5, "axial")]
    assert any(series_id(uid) in w and "series_uid" in w for w in study.warnings)
    assert [s.n_images for s in list_series(folder)] == [20, 5]

    for choice in (uid, series_id(uid)):
        other = load_study(folder, series_uid=choice)
        assert other.n_slices == 5 and other.metadata["RescaleIntercept"] == -1000
        assert [s.n_images for s in other.other_series] == [20]

    with pytest.raises(InputError) as info:
        load_study(folder, series_uid="1.2.3.4")
    message = str(info.value)
    assert str(folder) in message and series_id(uid) in message and "(5 images)" in message
    assert "(20 images)" in message and uid not in message


def test_gantry_tilt_from_positions_is_refused(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def tilt(ds, _):
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], -437.5 + 0.3 * z, z]  # ~17 degrees

    dicom_copy(ct_dicom_dir, tmp_path / "tilt", tilt)
    with pytest.raises(UnsupportedInputError, match="gantry tilt") as info:
        load_study(tmp_path / "tilt")
    assert str(tmp_path / "tilt") in str(info.value)


def test_gantry_tilt_tag_is_refused(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def tilt(ds, _):
        ds.GantryDetectorTilt = 12

    dicom_copy(ct_dicom_dir, tmp_path / "tilt", tilt)
    with pytest.raises(UnsupportedInputError, match="GantryDetectorTilt") as info:
        load_study(tmp_path / "tilt")
    assert ".dcm" in str(info.value)


def test_missing_slice_gives_inconsistent_spacing(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    dicom_copy(ct_dicom_dir, tmp_path / "gap", lambda ds, i: i != 10)
    with pytest.raises(UnsupportedInputError, match="inconsistent slice spacing") as info:
        load_study(tmp_path / "gap")
    assert str(tmp_path / "gap") in str(info.value)


def test_duplicated_position_is_refused(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    folder = tmp_path / "dup"
    shutil.copytree(ct_dicom_dir, folder)
    dicom_copy(ct_dicom_dir, folder, lambda ds, i: i == 3, rename=lambda i, _: "extra.dcm")
    with pytest.raises(UnsupportedInputError, match="duplicated slice position"):
        load_study(folder)


def test_multi_frame_is_refused(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def frames(ds, i):
        if i == 4:
            ds.NumberOfFrames = 2

    files = dicom_copy(ct_dicom_dir, tmp_path / "mf", frames)
    with pytest.raises(UnsupportedInputError, match="multi-frame") as info:
        load_study(tmp_path / "mf")
    assert files[4].name in str(info.value)


def test_differing_image_size_is_refused(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def smaller(ds, i):
        if i == 2:
            ds.Rows = 256

    dicom_copy(ct_dicom_dir, tmp_path / "size", smaller)
    with pytest.raises(UnsupportedInputError, match="one image size"):
        load_study(tmp_path / "size")


def test_text_file_named_dcm(ct_dicom_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "series"
    shutil.copytree(ct_dicom_dir, folder)
    (folder / "notes.dcm").write_text("not an image\n")
    with pytest.raises(InputError, match="not a DICOM file") as info:
        load_study(folder)
    assert f"{folder}/notes.dcm" in str(info.value)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty folder") as info:
        load_study(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)
    (tmp_path / "empty" / "notes.txt").write_text("series from the scanner")
    with pytest.raises(InputError, match=r"empty: no DICOM, NIfTI or image file in it \(.*such as notes\.txt"):
        load_study(tmp_path / "empty")


def test_folder_without_images(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def strip_image(ds, i):
        if i != 0:
            return False
        for keyword in ("Rows", "Columns", "PixelData"):
            del ds[keyword]
        return None

    dicom_copy(ct_dicom_dir, tmp_path / "noimage", strip_image)
    with pytest.raises(InputError, match="no DICOM image found") as info:
        load_study(tmp_path / "noimage")
    assert str(tmp_path / "noimage") in str(info.value)


def test_file_cut_short_inside_its_header(ct_dicom_dir: Path, tmp_path: Path) -> None:
    """pydicom reads a header cut off in the middle as a shorter dataset without an image; the error says that
    such a file may be cut short, names it, and counts it in the singular."""
    first = sorted(ct_dicom_dir.iterdir())[0]
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(first.read_bytes()[:2000])
    with pytest.raises(InputError, match=r"1 DICOM file without an image: .* cut short inside its header") as info:
        load_study(cut)
    assert "cut.dcm" in str(info.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        load_study(tmp_path / "missing")


def test_truncated_pixel_data(ct_dicom_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "trunc"
    shutil.copytree(ct_dicom_dir, folder)
    victim = sorted(folder.iterdir())[7]
    victim.write_bytes(victim.read_bytes()[:-60_000])
    with pytest.raises(InputError) as info:
        load_study(folder)
    assert victim.name in str(info.value)


def test_undecodable_transfer_syntax_names_it(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")

    def relabel(ds, _):
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless

    dicom_copy(ct_dicom_dir, tmp_path / "jls", relabel)
    with pytest.raises(UnsupportedInputError, match="JPEG-LS Lossless") as info:
        load_study(tmp_path / "jls")
    assert "install one of" in str(info.value)


def test_single_file_is_one_slice(real, ct_dicom_dir: Path) -> None:
    path = sorted(ct_dicom_dir.iterdir())[0]  # the most superior slice (z = -766.5)
    study = load_study(path)
    assert study.source_format == "dicom" and study.n_slices == 1
    np.testing.assert_array_equal(study.pixels[0], real.pixels[-1])
    assert study.spacing == pytest.approx((3.0, 0.9765625, 0.9765625))  # slice thickness for one slice


def _radiograph(dicom_copy, ct_dicom_dir: Path, folder: Path, photometric: str) -> Path:
    def to_dx(ds, i):
        if i != 10:
            return False
        ds.Modality = "DX"
        ds.PhotometricInterpretation = photometric
        ds.ViewPosition = "PA"
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient"):
            del ds[keyword]
        return None

    return dicom_copy(ct_dicom_dir, folder, to_dx, decompress=True)[0]


def test_monochrome1_radiograph_inverted_exactly_once(
    ct_dicom_dir: Path, tmp_path: Path, dicom_copy, dicom_read
) -> None:
    mono2 = load_study(_radiograph(dicom_copy, ct_dicom_dir, tmp_path / "m2", "MONOCHROME2"))
    mono1 = load_study(_radiograph(dicom_copy, ct_dicom_dir, tmp_path / "m1", "MONOCHROME1"))
    for study in (mono1, mono2):
        assert study.modality == "XR" and study.intensity == "grey16" and study.source_format == "dicom"
        assert study.metadata["voi_lut_applied"] is True and study.metadata["ViewPosition"] == "PA"
    assert mono2.metadata["monochrome1_inverted"] is False and mono1.metadata["monochrome1_inverted"] is True

    ds = dicom_read(sorted(ct_dicom_dir.iterdir())[10])
    low, high = -1024.0, 4095.0 - 1024.0  # 12-bit unsigned range after the rescale
    expected = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds) - low
    np.testing.assert_allclose(mono2.pixels[0], expected, atol=1e-3)
    np.testing.assert_allclose(mono1.pixels[0], (high - low) - mono2.pixels[0], atol=1e-3)
    spine = (slice(300, 340), slice(230, 270))
    assert mono2.pixels[0][spine].mean() > mono2.pixels[0][20:60, 200:300].mean()  # bone white in MONOCHROME2
    assert mono1.pixels[0][spine].mean() < mono1.pixels[0][20:60, 200:300].mean()  # and dark in MONOCHROME1


def test_radiograph_refused_when_ct_requested(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    path = _radiograph(dicom_copy, ct_dicom_dir, tmp_path / "dx", "MONOCHROME2")
    with pytest.raises(InputContractError, match=r"X-ray \(Modality DX\), the CT model cannot read it"):
        load_study(path, modality="CT")


def test_ct_requested_as_xray_is_refused(ct_dicom_dir: Path) -> None:
    with pytest.raises(InputContractError, match="X-ray model cannot read it"):
        load_study(sorted(ct_dicom_dir.iterdir())[0], modality="XR")


def test_monochrome1_ct_keeps_hounsfield_units(real, ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def mono1(ds, _):
        ds.PhotometricInterpretation = "MONOCHROME1"

    dicom_copy(ct_dicom_dir, tmp_path / "m1", mono1, decompress=True)
    study = load_study(tmp_path / "m1")
    np.testing.assert_array_equal(study.pixels, real.pixels)
    assert any("MONOCHROME1" in w for w in study.warnings)


def test_unsupported_modality_needs_modality_argument(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def other(ds, _):
        ds.Modality = "OT"

    dicom_copy(ct_dicom_dir, tmp_path / "ot", other)
    with pytest.raises(UnsupportedInputError, match=r"Modality OT .*pass modality="):
        load_study(tmp_path / "ot")
    assert load_study(tmp_path / "ot", modality="CT").n_slices == 20


def test_other_modality_is_refused(ct_dicom_dir: Path, tmp_path: Path, dicom_copy) -> None:
    def mr(ds, _):
        ds.Modality = "MR"

    dicom_copy(ct_dicom_dir, tmp_path / "mr", mr)
    with pytest.raises(UnsupportedInputError, match="Modality MR is not supported"):
        load_study(tmp_path / "mr", modality="CT")


def test_pixels_are_read_slice_by_slice(ct_dicom_dir: Path) -> None:
    tracemalloc.start()
    try:
        study = load_study(ct_dicom_dir)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the output plus a few slices of working memory, never a second copy of the volume
    assert peak < study.pixels.nbytes + 8 * 512 * 512 * 8


@pytest.mark.parametrize(
    ("iop", "flip"),
    [
        ((-1, 0, 0, 0, -1, 0), (slice(None, None, -1), slice(None, None, -1))),
        ((1, 0, 0, 0, -1, 0), (slice(None, None, -1), slice(None))),
    ],
    ids=["rotated-180", "rows-mirrored"],
)
def test_mirrored_axial_storage_is_shown_in_radiological_convention(
    real, ct_dicom_dir: Path, tmp_path: Path, dicom_copy, iop, flip
) -> None:
    """The same anatomy stored with other direction cosines (and pixels to match) reads identically."""

    def restore(ds, i):
        if i >= 5:  # the five most superior slices are enough
            return False
        pixels = ds.pixel_array[flip]
        x0, y0, z = (float(v) for v in ds.ImagePositionPatient)
        step = float(ds.PixelSpacing[0])
        # the first stored pixel is now at the far end of each flipped axis
        ds.ImagePositionPatient = [
            x0 + 511 * step if iop[0] < 0 else x0,
            y0 + 511 * step if iop[4] < 0 else y0,
            z,
        ]
        ds.ImageOrientationPatient = list(iop)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        return None

    dicom_copy(ct_dicom_dir, tmp_path / "m", restore, decompress=True)
    study = load_study(tmp_path / "m")
    np.testing.assert_array_equal(study.pixels, real.pixels[-5:])
    assert any("mirrored" in w for w in study.warnings)


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept"),
    [
        (np.int16, 1.0, -1024.0),
        (np.uint16, 1.0, -1024.0),
        (np.int16, 1.0, 0.0),
        (np.int16, 2.5, -1024.0),
        (np.uint16, 1.0, -1024.5),
        (np.uint8, 1.0, -1024.0),
    ],
)
def test_ct_rescale_fast_path_matches_pydicom(dtype: type, slope: float, intercept: float) -> None:
    """The usual CT rescale is one addition; it must give exactly pydicom's float64 result (cast to float32, or
    into an int16 volume where every value fits), and any other rescale goes through pydicom."""
    from pydicom.dataset import Dataset

    from lungsight.io.dicom import _ct_values

    info = np.iinfo(dtype)
    arr = np.linspace(info.min, info.max, 64 * 64).astype(dtype).reshape(64, 64)
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    out = np.empty((64, 64), np.float32)
    assert _ct_values(arr, ds, out[::-1])  # the reader writes into flipped views
    expected = apply_modality_lut(arr, ds)
    np.testing.assert_array_equal(out[::-1], expected.astype(np.float32))
    whole = np.zeros((64, 64), np.int16)  # an int16 volume takes whole HU within its range only
    fits = slope == 1.0 and intercept.is_integer() and expected.min() >= -(2**15) and expected.max() < 2**15
    assert _ct_values(arr, ds, whole[::-1]) == fits
    np.testing.assert_array_equal(whole[::-1], expected if fits else 0)


def test_headers_describing_more_pixels_than_memory_holds_are_a_clear_error(
    ct_dicom_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever reader runs out of memory on what the headers promise, the user gets one line naming the input."""
    import lungsight.io as io

    def exhausted(*args, **kwargs):
        raise MemoryError("Unable to allocate 93.1 GiB for an array with shape (400, 8000, 8000)")

    monkeypatch.setattr(io, "read_dicom", exhausted)
    with pytest.raises(InputError, match="do not fit in memory") as info:
        load_study(ct_dicom_dir)
    assert str(ct_dicom_dir) in str(info.value)


@pytest.fixture(scope="module")
def uncompressed_series(ct_dicom_dir: Path, tmp_path_factory: pytest.TempPathFactory, dicom_copy) -> Path:
    """The real series decompressed to Explicit VR Little Endian, the usual layout of a PACS export."""
    out = tmp_path_factory.mktemp("uncompressed")
    dicom_copy(ct_dicom_dir, out, decompress=True)
    return out


def _raw_reads(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Record what every call of the raw reader returned."""
    import lungsight.io.dicom as dicom

    seen: list[bool] = []
    real = dicom._read_raw_ct

    def recording(header, out):
        seen.append(real(header, out))
        return seen[-1]

    monkeypatch.setattr(dicom, "_read_raw_ct", recording)
    return seen


def test_uncompressed_slices_are_read_raw_and_match_pydicom(
    ct_dicom_dir: Path, uncompressed_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_copy
) -> None:
    """Explicit and implicit VR: every slice read straight from the file, voxel for voxel what pydicom gives for
    the same series compressed (JPEG 2000, which only pydicom reads), metadata and all."""
    from pydicom.uid import ImplicitVRLittleEndian

    reference = load_study(ct_dicom_dir)
    implicit = tmp_path / "implicit"

    def to_implicit(ds, index):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian

    dicom_copy(uncompressed_series, implicit, edit=to_implicit)
    for folder in (uncompressed_series, implicit):
        seen = _raw_reads(monkeypatch)
        study = load_study(folder)
        assert seen == [True] * 20, folder.name
        np.testing.assert_array_equal(study.pixels, reference.pixels)
        assert study.metadata == reference.metadata and study.spacing == reference.spacing


@pytest.mark.parametrize(
    ("signed", "stored", "intercept"),
    [
        (False, 12, -1024),
        (True, 12, -1024),
        (True, 16, -1024),
        (False, 16, -1024),
        (True, 10, -1024),
        (False, 16, -32768),
        (True, 16, 0),
    ],
)
def test_raw_reading_masks_or_sign_extends_as_pydicom(
    uncompressed_series: Path, tmp_path: Path, dicom_read, signed: bool, stored: int, intercept: int
) -> None:
    """Garbage in the unused high bits: masked off for unsigned pixels, the sign extended from the highest
    stored bit for signed ones, exactly as pydicom decodes them. Into an int16 volume, stored values beyond
    int16's range (16 unsigned bits) still give exact HU where the intercept brings them into it."""
    from lungsight.io.dicom import _read_header, _read_raw_ct

    ds = dicom_read(sorted(uncompressed_series.glob("*.dcm"))[0])
    values = np.random.default_rng(stored).integers(0, 2**16, (ds.Rows, ds.Columns)).astype(np.uint16)
    ds.PixelData = values.tobytes()
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = int(signed), stored, stored - 1
    ds.RescaleIntercept = intercept
    path = tmp_path / "slice.dcm"
    ds.save_as(path)
    header = _read_header(path, str)
    assert header is not None and header.raw is not None
    out = np.empty((ds.Rows, ds.Columns), np.float32)
    assert _read_raw_ct(header, out)
    expected = dicom_read(path).pixel_array.astype(np.float64) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(out, expected.astype(np.float32))
    # an int16 volume: the exact integer addition, into a flipped view as for a mirrored series; with 16 random
    # stored bits and the intercept of -1024 some values leave int16's range, and pydicom is left to read them
    whole = np.zeros((ds.Rows, ds.Columns), np.int16)
    fits = expected.min() >= -(2**15) and expected.max() < 2**15
    assert fits == (stored < 16 or intercept != -1024)
    assert _read_raw_ct(header, whole[:, ::-1]) == fits
    np.testing.assert_array_equal(whole[:, ::-1], expected if fits else 0)


def test_an_intercept_beyond_int16_still_gives_exact_int16_hu(
    uncompressed_series: Path, tmp_path: Path, dicom_read
) -> None:
    """Stored values of 40000-60000 with an intercept of -40000: neither fits in int16, their sums do, and the
    int16 volume holds them exactly (int16 arithmetic wraps modulo 2**16, and so does the intercept)."""
    from lungsight.io.dicom import _read_header, _read_raw_ct

    ds = dicom_read(sorted(uncompressed_series.glob("*.dcm"))[0])
    ds.PixelData = np.random.default_rng(1).integers(40_000, 60_000, (ds.Rows, ds.Columns)).astype("<u2").tobytes()
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 0, 16, 15, -40_000
    path = tmp_path / "slice.dcm"
    ds.save_as(path)
    header = _read_header(path, str)
    whole = np.zeros((ds.Rows, ds.Columns), np.int16)
    assert header is not None and _read_raw_ct(header, whole)
    expected = dicom_read(path).pixel_array.astype(np.float64) - 40_000
    assert expected.min() >= 0 and expected.max() < 20_000
    np.testing.assert_array_equal(whole, expected)


def test_whole_hounsfield_units_are_stored_as_int16_only_where_every_value_fits(
    ct_dicom_dir: Path, uncompressed_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_copy
) -> None:
    """The real series (12 bits, intercept -1024) is kept as int16, compressed or not. 16 unsigned bits with the
    same intercept could reach 64511 HU but do not: int16, every slice read raw. One slice where one does (a
    stored 40000) is read by pydicom and turns the series into float32, as does one slice with a slope; the values
    are those of the float32 reader in every case."""
    reference = load_study(uncompressed_series).pixels
    assert reference.dtype == np.int16 and load_study(ct_dicom_dir).pixels.dtype == np.int16

    def sixteen_bits(ds, index):
        ds.BitsStored, ds.HighBit = 16, 15

    folder = tmp_path / "sixteen_bits"
    dicom_copy(uncompressed_series, folder, edit=sixteen_bits)
    seen = _raw_reads(monkeypatch)
    study = load_study(folder)
    assert study.pixels.dtype == np.int16 and seen == [True] * 20
    np.testing.assert_array_equal(study.pixels, reference)

    def one_beyond(ds, index):
        sixteen_bits(ds, index)
        if index == 7:
            values = ds.pixel_array.copy()
            values[0, 0] = 40_000
            ds.PixelData = values.tobytes()

    def one_sloped(ds, index):
        if index == 7:
            values = ds.pixel_array.astype(np.int32) + int(ds.RescaleIntercept)  # the same HU, rescaled otherwise
            ds.PixelData = ((values + 2048) // 2).astype(np.uint16).tobytes()
            ds.RescaleSlope, ds.RescaleIntercept, ds.BitsStored, ds.HighBit = 2, -2048, 16, 15

    for edit in (one_beyond, one_sloped):
        folder = tmp_path / edit.__name__
        dicom_copy(uncompressed_series, folder, edit=edit)
        seen = _raw_reads(monkeypatch)
        study = load_study(folder)
        assert study.pixels.dtype == np.float32, edit.__name__
        assert seen.count(False) == 1  # the edited slice, read by pydicom
        expected = reference.astype(np.float32)
        (k,) = np.flatnonzero((study.pixels != expected).any(axis=(1, 2)))
        if edit is one_beyond:
            assert study.pixels[k].max() == 40_000 - 1024
            expected[k][study.pixels[k] == 40_000 - 1024] = 40_000 - 1024
        else:  # the sloped slice's odd HU lose their last bit
            expected[k] = 2 * ((expected[k] + 2048) // 2) - 2048
        np.testing.assert_array_equal(study.pixels, expected)


def test_a_decoded_value_outside_the_declared_range_turns_the_series_to_float32(
    ct_dicom_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder may give more bits than BitsStored declares (a JPEG 2000 codestream of higher precision): the
    slices already read as int16 are carried over exactly and the series is read on as float32."""
    from pydicom.dataset import Dataset

    reference = load_study(ct_dicom_dir).pixels.astype(np.float32)
    decode = Dataset.pixel_array.fget
    calls: list[int] = []

    def wider(ds):
        calls.append(1)
        arr = decode(ds)
        return arr + np.uint16(40_000) if len(calls) == 12 else arr

    monkeypatch.setattr(Dataset, "pixel_array", property(wider))
    study = load_study(ct_dicom_dir)
    assert study.pixels.dtype == np.float32
    changed = np.flatnonzero((study.pixels != reference).any(axis=(1, 2)))
    assert len(changed) == 1
    np.testing.assert_array_equal(study.pixels[changed[0]], reference[changed[0]] + 40_000)
    np.testing.assert_array_equal(np.delete(study.pixels, changed, axis=0), np.delete(reference, changed, axis=0))


def test_slices_the_raw_reader_does_not_take_go_through_pydicom(
    uncompressed_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_copy
) -> None:
    """A fractional intercept or a slope other than 1: pydicom rescales them. Pixel data shorter than the header
    says: pydicom's error, naming the file."""
    reference = load_study(uncompressed_series).pixels

    def fractional(ds, index):
        ds.RescaleIntercept = -1024.5

    def sloped(ds, index):
        ds.RescaleSlope, ds.RescaleIntercept = 2, -2048

    for edit, expected in ((fractional, reference - 0.5), (sloped, None)):
        folder = tmp_path / edit.__name__
        dicom_copy(uncompressed_series, folder, edit=edit)
        seen = _raw_reads(monkeypatch)
        study = load_study(folder)
        assert seen == [False] * 20 and study.pixels.shape == reference.shape
        if expected is not None:
            np.testing.assert_array_equal(study.pixels, expected)

    def truncated(ds, index):
        if index == 3:
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]

    folder = tmp_path / "truncated"
    written = dicom_copy(uncompressed_series, folder, edit=truncated)
    with pytest.raises(InputError, match=rf"{written[3].name}: corrupt pixel data"):
        load_study(folder)


def test_the_header_pass_reads_no_further_than_group_0028(
    uncompressed_series: Path, monkeypatch: pytest.MonkeyPatch, dicom_read
) -> None:
    """A scanner's header goes on after the image attributes (the real series: Siemens' private CSA group 0029,
    request sequences in 0032/0040); the header pass leaves all that unparsed, and the raw reader still finds the
    pixel data, as the file's last element."""
    import lungsight.io.dicom as dicom

    path = sorted(uncompressed_series.glob("*.dcm"))[0]
    assert max(el.tag.group for el in dicom_read(path, pixels=False)) > 0x0028  # there is more to skip
    parsed = []
    real = dicom.read_partial

    def recording(*args, **kwargs):
        parsed.append(real(*args, **kwargs))
        return parsed[-1]

    monkeypatch.setattr(dicom, "read_partial", recording)
    seen = _raw_reads(monkeypatch)
    load_study(uncompressed_series)
    assert len(parsed) == 20 and all(max(el.tag.group for el in ds) == 0x0028 for ds in parsed)
    assert seen == [True] * 20


def test_image_attributes_stored_out_of_tag_order_are_still_found(uncompressed_series: Path, tmp_path: Path) -> None:
    """A non-conformant file whose Rows and Columns follow a private group 0029 element: the header pass, which
    stops at group 0029, reads such a header whole instead of taking the file for one without an image."""
    import struct

    first = sorted(uncompressed_series.glob("*.dcm"))[0]
    data = first.read_bytes()
    rows_el = b"\x28\x00\x10\x00US\x02\x00"
    cols_el = b"\x28\x00\x11\x00US\x02\x00"
    rows_at, cols_at = data.index(rows_el), data.index(cols_el)
    assert cols_at == rows_at + 10  # Rows, then Columns, 10 bytes each
    moved = data[rows_at : rows_at + 20]
    data = data[:rows_at] + data[rows_at + 20 :]
    private = data.index(b"\x29\x00\x10\x00LO")
    (length,) = struct.unpack("<H", data[private + 6 : private + 8])
    end = private + 8 + length
    shuffled = tmp_path / "shuffled.dcm"
    shuffled.write_bytes(data[:end] + moved + data[end:])
    np.testing.assert_array_equal(load_study(shuffled).pixels, load_study(first).pixels)


def test_pixel_data_that_is_not_the_last_element_goes_through_pydicom(
    uncompressed_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_copy
) -> None:
    """Data Set Trailing Padding after the pixels: the raw reader does not find the pixel data where a scanner
    puts it, so pydicom reads those slices, to the same values."""
    from pydicom.dataelem import DataElement

    reference = load_study(uncompressed_series).pixels

    def padded(ds, index):
        if index % 2:
            ds[0xFFFCFFFC] = DataElement(0xFFFCFFFC, "OB", b"\0" * 64)

    dicom_copy(uncompressed_series, tmp_path / "padded", edit=padded)
    seen = _raw_reads(monkeypatch)
    study = load_study(tmp_path / "padded")
    assert sorted(seen) == [False] * 10 + [True] * 10  # the padded half through pydicom
    np.testing.assert_array_equal(study.pixels, reference)


def test_a_slice_that_vanishes_after_the_header_pass_is_named(
    uncompressed_series: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dicom_copy
) -> None:
    import lungsight.io.dicom as dicom

    written = dicom_copy(uncompressed_series, tmp_path / "series")
    real_scan = dicom._scan

    def scan_then_delete(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        written[5].unlink()  # removed between the two passes
        return found

    monkeypatch.setattr(dicom, "_scan", scan_then_delete)
    with pytest.raises(InputError, match=rf"{written[5].name}: unreadable DICOM file"):
        load_study(tmp_path / "series")


_HEADER_KEYWORDS = (
    "Rows",
    "Columns",
    "PixelSpacing",
    "InstanceNumber",
    "SeriesInstanceUID",
    "Modality",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "ImageOrientationPatient",
    "ImagePositionPatient",
    "GantryDetectorTilt",
    "SliceThickness",
    "ViewPosition",
    "RescaleSlope",
    "RescaleIntercept",
    "ModalityLUTSequence",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "BitsAllocated",
    "WindowCenter",
)


@pytest.mark.parametrize("syntax", ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "ExplicitVRBigEndian"])
def test_fast_header_values_equal_pydicoms(uncompressed_series: Path, tmp_path: Path, dicom_read, syntax: str) -> None:
    """The header pass's values (``_get``) are what ``ds.get`` gives, in every byte order and VR encoding, for
    present, absent and empty elements, multi-valued ones, an element stored as UN and a sequence."""
    import pydicom.uid
    from pydicom import dcmread, dcmwrite
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    from lungsight.io.dicom import _get

    ds = dicom_read(sorted(uncompressed_series.glob("*.dcm"))[0])
    ds.file_meta.TransferSyntaxUID = getattr(pydicom.uid, syntax)
    ds.SliceThickness = ""  # present, empty
    ds.WindowCenter = [40, 400]  # multi-valued DS
    ds.GantryDetectorTilt = "0.0"
    ds.add(DataElement(0x00185100, "UN", b"HFS "))  # PatientPosition stored as UN
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    ds.ModalityLUTSequence = Sequence([lut])
    little = syntax != "ExplicitVRBigEndian"
    if not little:
        ds.PixelData = np.frombuffer(ds.PixelData, "<u2").astype(">u2").tobytes()
    path = tmp_path / "slice.dcm"
    dcmwrite(
        path,
        ds,
        implicit_vr=syntax.startswith("Implicit"),
        little_endian=little,
        force_encoding=True,
    )
    for keyword in (*_HEADER_KEYWORDS, "PatientPosition", "AcquisitionNumber"):
        fast = _get(dcmread(path, stop_before_pixels=True), keyword, "absent")
        assert fast == dcmread(path, stop_before_pixels=True).get(keyword, "absent"), keyword
        assert type(fast) is type(dcmread(path, stop_before_pixels=True).get(keyword, "absent")), keyword
    meta = dcmread(path, stop_before_pixels=True).file_meta
    assert _get(meta, "TransferSyntaxUID") == getattr(pydicom.uid, syntax)
    assert _get(meta, "TransferSyntaxUID").is_little_endian == little


def test_jpeg2000_slices_decode_on_every_core_to_the_same_values(
    ct_dicom_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real series is JPEG 2000: OpenJPEG is told to use every usable core unless the user said otherwise,
    and its threads decode the same values as one thread."""
    import os

    from lungsight.cores import usable_cores

    monkeypatch.setenv("OPJ_NUM_THREADS", "1")
    one = load_study(ct_dicom_dir).pixels
    assert os.environ["OPJ_NUM_THREADS"] == "1"  # the user's value is kept
    monkeypatch.delenv("OPJ_NUM_THREADS")
    every = load_study(ct_dicom_dir).pixels
    assert os.environ["OPJ_NUM_THREADS"] == str(usable_cores())
    np.testing.assert_array_equal(every, one)


def test_invalid_header_values_are_read_without_pydicoms_warnings(
    ct_dicom_dir: Path, tmp_path: Path, dicom_copy
) -> None:
    """pydicom validates values as it converts them and its warnings quote them: the header pass keeps them quiet
    (an unreadable InstanceNumber orders nothing here, the positions do)."""
    import warnings

    from pydicom import dcmread

    target = dicom_copy(ct_dicom_dir, tmp_path)[3]
    element = dcmread(target, stop_before_pixels=True).get_item("InstanceNumber")
    data = bytearray(target.read_bytes())  # pydicom refuses to write such a value: patch the file's bytes
    data[element.value_tell : element.value_tell + element.length] = (b"x?" * element.length)[: element.length]
    target.write_bytes(bytes(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        study = load_study(tmp_path)
    assert study.n_slices == 20
    assert not [w for w in caught if "x?" in str(w.message)], [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "raw", [b" 2.50 ", b"-1024", b"1e2", b"7 ", b"40\\400", b"-125.5\\ -250 \\0", b"", b"1\x00", b"nan", b"1,5", b"  "]
)
def test_numbers_parsed_from_raw_bytes_are_pydicoms(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decimal and integer strings are parsed straight from their bytes (``_decimals``): every number the header
    pass takes from them is the one it takes through pydicom's conversion, for padded, exponent, multi-valued,
    empty, NUL-padded and unreadable text."""
    import math

    from pydicom.datadict import tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.dataset import Dataset
    from pydicom.tag import Tag

    import lungsight.io.dicom as dicom

    def same(a: object, b: object) -> bool:
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return np.array_equal(a, b)
        return a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))

    for keyword, vr in (("SliceThickness", "DS"), ("InstanceNumber", "IS"), ("ImagePositionPatient", "DS")):
        for stored_vr in (vr, None):  # explicit and implicit VR
            ds = Dataset()
            tag = Tag(tag_for_keyword(keyword))
            ds[tag] = RawDataElement(tag, stored_vr, len(raw), raw, 0, stored_vr is None, True)
            with dicom._quiet():
                fast = (dicom._number(ds, keyword, -1.0), dicom._floats(ds, keyword, 3))
                with monkeypatch.context() as m:
                    m.setattr(dicom, "_decimals", lambda ds, keyword: None)
                    slow = (dicom._number(ds, keyword, -1.0), dicom._floats(ds, keyword, 3))
            assert all(same(a, b) for a, b in zip(fast, slow, strict=True)), (keyword, stored_vr, fast, slow)
