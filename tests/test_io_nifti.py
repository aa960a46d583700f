"""NIfTI reading: shape, HU, spacing and, above all, orientation (checked with real lung lobe masks)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from lungsight.errors import InputContractError, InputError, UnsupportedInputError
from lungsight.io import load_study
from lungsight.io.nifti import read_nifti


@pytest.fixture(scope="module")
def ct_sm(ct_nifti_sm: Path):
    return load_study(ct_nifti_sm)


def _mask(ct_nifti_sm: Path, lobe: str) -> np.ndarray:
    path = ct_nifti_sm.parent / "masks" / f"lung_{lobe}.nii.gz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return read_nifti(path, path.name).pixels > 0.5


def test_shape_hu_and_spacing(ct_sm) -> None:
    assert ct_sm.modality == "CT" and ct_sm.intensity == "hu" and ct_sm.source_format == "nifti"
    assert ct_sm.pixels.shape == (30, 101, 122)  # (slices, rows = anterior-posterior, columns = right-left)
    assert ct_sm.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert float(np.percentile(ct_sm.pixels, 1)) < -900  # air around the patient
    assert ct_sm.pixels.min() >= -1100 and ct_sm.pixels.max() <= 1300
    assert ct_sm.warnings == []
    assert ct_sm.metadata["nifti_axcodes"] == "RAS"


def test_right_lung_on_image_left_and_posterior(ct_sm, ct_nifti_sm: Path) -> None:
    right = _mask(ct_nifti_sm, "lower_lobe_right")
    left = _mask(ct_nifti_sm, "lower_lobe_left")
    assert right.shape == left.shape == ct_sm.pixels.shape
    _, rows, cols = ct_sm.pixels.shape
    # radiological convention: the patient's right lung is on the left of the image
    assert np.nonzero(right)[2].mean() < cols / 2 < np.nonzero(left)[2].mean()
    # the lower lobes lie posteriorly: at the bottom of the image
    assert np.nonzero(right)[1].mean() > rows / 2 and np.nonzero(left)[1].mean() > rows / 2
    # the lung is the superior end of this lower-chest/abdomen volume: slices run inferior -> superior
    assert np.nonzero(right | left)[0].min() > ct_sm.n_slices / 2


def test_vertebra_at_the_bottom(ct_sm) -> None:
    _, rows, cols = ct_sm.pixels.shape
    middle = ct_sm.pixels[:, :, cols // 2 - 8 : cols // 2 + 8]
    bone_rows = np.nonzero(middle > 250)[1]
    assert bone_rows.mean() > rows / 2


def test_storage_orientation_does_not_matter(ct_sm, ct_nifti_sm: Path, tmp_path: Path) -> None:
    image = nib.load(ct_nifti_sm)
    for codes in (("L", "P", "S"), ("R", "A", "I"), ("L", "A", "I"), ("P", "I", "R")):
        stored = image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(codes)))
        path = tmp_path / f"{''.join(codes)}.nii.gz"
        nib.save(stored, path)
        study = load_study(path)
        assert study.metadata["nifti_axcodes"] == "".join(codes)
        np.testing.assert_array_equal(study.pixels, ct_sm.pixels)
        assert study.spacing == pytest.approx(ct_sm.spacing)


def test_dicom_and_nifti_readers_agree(ct_dicom_dir: Path, tmp_path: Path, dicom_read) -> None:
    """The DICOM series is a different scan from the NIfTI files, so convert it: both readers must match."""
    datasets = [dicom_read(p) for p in sorted(ct_dicom_dir.glob("*.dcm"))]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets])
    first, last = datasets[0], datasets[-1]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, col_spacing = (float(v) for v in first.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * col_spacing  # voxel i = column index
    lps[:3, 1] = iop[3:] * row_spacing  # voxel j = row index
    lps[:3, 2] = (np.asarray(last.ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)) / (
        len(datasets) - 1
    )
    lps[:3, 3] = np.asarray(first.ImagePositionPatient, float)
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    path = tmp_path / "from_dicom.nii.gz"
    nib.save(nib.Nifti1Image(hu.transpose(2, 1, 0).astype(np.float32), ras), path)

    from_nifti, from_dicom = load_study(path), load_study(ct_dicom_dir)
    np.testing.assert_array_equal(from_nifti.pixels, from_dicom.pixels)
    assert from_nifti.spacing == pytest.approx(from_dicom.spacing)


def test_scaling_is_applied(tmp_path: Path) -> None:
    stored = np.full((8, 8, 3), 600, dtype=np.int16)
    stored[0] = 0
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    study = load_study(tmp_path / "scaled.nii")
    assert set(np.unique(study.pixels)) == {-1024.0, 176.0}
    assert study.warnings == []


def test_scaling_is_applied_once_to_a_reoriented_volume(tmp_path: Path) -> None:
    """An LPS volume is reoriented in memory (already scaled) while a RAS one is scaled from the stored values."""
    stored = np.arange(4 * 5 * 3, dtype=np.int16).reshape(4, 5, 3)
    for name, affine in (("ras.nii", np.eye(4)), ("lps.nii", np.diag([-1.0, -1.0, 1.0, 1.0]))):
        image = nib.Nifti1Image(stored, affine)
        image.header.set_slope_inter(2.0, -100.0)
        nib.save(image, tmp_path / name)
    ras, lps = load_study(tmp_path / "ras.nii"), load_study(tmp_path / "lps.nii")
    assert ras.pixels.min() == -100.0 and ras.pixels.max() == -100.0 + 2 * 59
    np.testing.assert_array_equal(ras.pixels, lps.pixels[:, ::-1, ::-1])  # the same values, flipped in-plane


def test_non_finite_voxels_are_filled_and_reported(tmp_path: Path) -> None:
    data = np.full((6, 6, 4), -800.0, np.float32)
    data[0, 0, 0], data[1, 1, 1], data[5, 5, 3] = np.nan, np.inf, 40.0
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "nan.nii")
    study = load_study(tmp_path / "nan.nii")
    assert np.isfinite(study.pixels).all() and study.pixels.min() == -800.0
    assert any("2 voxels were NaN or infinite" in w for w in study.warnings)


def test_the_finiteness_pass_is_skipped_only_where_no_value_can_be_non_finite() -> None:
    """Integers with a finite scaling that cannot overflow float32 need no NaN/infinity pass (about 50 ms on a
    100-slice 512 x 512 volume); float storage, or a slope that could overflow, keeps it."""
    from lungsight.io.nifti import _display_hu

    def flags(data: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> bool:
        image = nib.Nifti1Image(data, np.eye(4))
        image.header.set_slope_inter(slope, inter)
        return _display_hu(nib.Nifti1Image.from_bytes(image.to_bytes()))[1]

    assert not flags(np.zeros((4, 4, 2), np.int16), 2.0, -1024.0)
    assert not flags(np.zeros((4, 4, 2), np.uint8))
    assert flags(np.zeros((4, 4, 2), np.float32))
    assert flags(np.zeros((4, 4, 2), np.int16), 1e36)  # 32767 * 1e36 is not a float32


def test_contract_warnings_for_cropped_or_padded_volumes(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.full((8, 8, 3), 300, np.int16), np.eye(4)), tmp_path / "soft.nii")
    soft = load_study(tmp_path / "soft.nii")
    assert soft.pixels.max() == 300
    assert any("no air found" in w for w in soft.warnings)
    padded = np.full((8, 8, 3), -1000, np.int16)
    padded[0], padded[1] = -3024, 40
    nib.save(nib.Nifti1Image(padded, np.eye(4)), tmp_path / "padded.nii")
    assert any("beyond [-2000, 5000]" in w for w in load_study(tmp_path / "padded.nii").warnings)


@pytest.mark.parametrize("fill", [-1024.0, -700.0, np.nan])
def test_a_volume_with_no_tissue_is_refused(tmp_path: Path, fill: float) -> None:
    """Air only (a blank scan), lung-density values only, or voxels that could not be read (NaN, filled as air):
    there is no chest to classify, so no decision is made (the CT model would call air COVID-19)."""
    data = np.full((32, 32, 6), fill, np.float32)
    data[4:8, 4:8, :] = fill - 100  # not constant: the refusal is about tissue, not variation
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "blank.nii")
    with pytest.raises(InputContractError, match=r"blank\.nii: no tissue in the volume \(its highest value is"):
        load_study(tmp_path / "blank.nii")
    data[0, 0, 0], data[0, 0, 1] = 40.0, -1000.0  # one voxel of soft tissue is enough to read it
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "tissue.nii")
    assert load_study(tmp_path / "tissue.nii").pixels.max() == 40.0


def test_four_dimensional_is_refused(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.full((4, 4, 3, 2), -1000, np.int16), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(UnsupportedInputError, match="4-D NIfTI") as info:
        load_study(tmp_path / "t.nii.gz")
    assert "t.nii.gz" in str(info.value)
    one = np.full((4, 4, 3, 1), -1000, np.int16)
    one[0, 0, 0, 0] = 40
    nib.save(nib.Nifti1Image(one, np.eye(4)), tmp_path / "t1.nii.gz")
    assert load_study(tmp_path / "t1.nii.gz").pixels.shape == (3, 4, 4)


def test_corrupt_file(ct_nifti_sm: Path, tmp_path: Path) -> None:
    path = tmp_path / "broken.nii.gz"
    path.write_bytes(ct_nifti_sm.read_bytes()[:20_000])
    with pytest.raises(InputError) as info:
        load_study(path)
    assert str(path) in str(info.value)
    (tmp_path / "text.nii").write_text("hello")
    with pytest.raises(InputError, match=r"text\.nii"):
        load_study(tmp_path / "text.nii")


def test_mask_is_not_hounsfield(ct_nifti_sm: Path) -> None:
    with pytest.raises(InputContractError, match="display grey levels, not Hounsfield"):
        load_study(ct_nifti_sm.parent / "masks" / "lung_lower_lobe_left.nii.gz")


def test_gzip_suffix_detected_by_name(ct_nifti_sm: Path, tmp_path: Path) -> None:
    path = tmp_path / "volume.nii"
    path.write_bytes(gzip.decompress(ct_nifti_sm.read_bytes()))
    assert load_study(path).pixels.shape == (30, 101, 122)


def test_axial_storage_is_streamed_and_other_storage_is_not(ct_sm, ct_nifti_sm: Path, tmp_path: Path) -> None:
    """Slices stored along z (any axis flipped) are read slab by slab as they are decompressed; a volume stored
    along another axis goes through nibabel's reorientation. Both give the same Study."""
    from lungsight.io.nifti import _read_streamed

    image = nib.load(ct_nifti_sm)
    for codes, streamed in ((("R", "P", "I"), True), (("A", "R", "S"), False), (("I", "R", "P"), False)):
        stored = image.as_reoriented(ornt_transform(io_orientation(image.affine), axcodes2ornt(codes)))
        path = tmp_path / f"{''.join(codes)}.nii.gz"
        nib.save(stored, path)
        study = _read_streamed(path, path.name, 10**9)
        assert (study is not None) is streamed, codes
        np.testing.assert_array_equal(load_study(path).pixels, ct_sm.pixels)


def test_streamed_slabs_and_plain_zlib_give_the_same_volume(
    ct_sm, ct_nifti_sm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slabs that do not divide the slice count, and Python's zlib where ISA-L is not installed."""
    import lungsight.io.nifti as nifti

    plane = 101 * 122 * nib.load(ct_nifti_sm).get_data_dtype().itemsize
    monkeypatch.setattr(nifti, "SLAB_BYTES", 7 * plane)  # 30 slices: 4 slabs of 7 and one of 2
    np.testing.assert_array_equal(load_study(ct_nifti_sm).pixels, ct_sm.pixels)
    monkeypatch.setattr(nifti, "igzip_threaded", None)
    np.testing.assert_array_equal(load_study(ct_nifti_sm).pixels, ct_sm.pixels)


def test_truncated_voxel_data_is_named_and_leaves_no_thread(ct_nifti_sm: Path, tmp_path: Path) -> None:
    import threading

    data = gzip.decompress(ct_nifti_sm.read_bytes())
    path = tmp_path / "short.nii.gz"
    path.write_bytes(gzip.compress(data[: len(data) // 2]))
    before = threading.active_count()
    with pytest.raises(InputError, match=r"short\.nii\.gz: corrupt NIfTI voxel data \(EOFError\)"):
        load_study(path)
    assert threading.active_count() == before


@pytest.mark.parametrize("dtype", ["i1", "u1", "i2", "u2", "i4", "f4", "f8"])
@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_streamed_and_general_readers_agree_on_every_voxel_type_and_scaling(
    dtype: str, byte_order: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streaming reader against nibabel's reorientation (which the flipped affine sends the general reader
    through): every stored type in both byte orders, with no scaling, nibabel's "no scaling" slope 0 and NaN, a
    CT rescale, a fractional one and one that overflows float32; NaN voxels included. The streamed volume is int16
    exactly where every value is a whole HU in int16's range once scaled (a stored 40000, where the type holds it,
    is not)."""
    import struct

    import lungsight.io.nifti as nifti
    from lungsight.io.nifti import _nifti_file, _read_image, _read_streamed

    monkeypatch.setattr(nifti, "SLAB_BYTES", 1)  # a slab a slice
    rng = np.random.default_rng(3)
    kind = np.dtype(dtype).kind
    data = rng.normal(0, 50, (7, 6, 5)) if kind == "f" else rng.integers(0, 100, (7, 6, 5))
    data = data.astype(np.dtype(dtype).newbyteorder(byte_order))
    if kind in "iu" and np.iinfo(dtype).max >= 40_000:
        data.flat[-1] = 40_000  # in the last slice read: the volume turns float32 after four slices read as int16
    if kind == "f":
        data.flat[3] = np.nan
    plain = tmp_path / "v.nii"
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, 1.0, -1.0, 1.0])), plain)
    stored = plain.read_bytes()
    order = "<" if stored[:4] == struct.pack("<i", 348) else ">"
    for k, (slope, inter) in enumerate(
        [(1.0, 0.0), (0.0, 5.0), (np.nan, np.nan), (2.0, -1024.0), (0.5, 0.25), (1e38, 0), (1.0, -1024.0)]
    ):
        effective = (1.0, 0.0) if k in (1, 2) else (slope, inter)  # slope 0 or NaN: no scaling, as nibabel reads it
        whole = (
            kind in "iu"
            and effective[0] == 1.0
            and data.min() + effective[1] >= -(2**15)
            and data.max() + effective[1] < 2**15
        )
        scaled = bytearray(stored)
        scaled[112:120] = struct.pack(order + "ff", slope, inter)  # scl_slope, scl_inter
        for path in (tmp_path / f"{k}.nii", tmp_path / f"{k}.nii.gz"):
            path.write_bytes(gzip.compress(bytes(scaled)) if path.suffix == ".gz" else bytes(scaled))
            with np.errstate(over="ignore", invalid="ignore"):
                streamed = _read_streamed(path, path.name, 10**9)
                with _nifti_file(path) as image:
                    general = _read_image(image, path.name, 10**9)
            assert streamed is not None and streamed.pixels.dtype == (np.int16 if whole else np.float32)
            np.testing.assert_array_equal(streamed.pixels, general.pixels)
            assert streamed.warnings == general.warnings and streamed.metadata == general.metadata
            assert streamed.spacing == general.spacing


def test_an_intercept_beyond_int16_still_gives_exact_int16_hu(tmp_path: Path) -> None:
    """int32 voxels of 100000-120000 with scl_inter -100000: the streamed volume is int16 and exact."""
    data = np.random.default_rng(2).integers(100_000, 120_000, (9, 8, 7)).astype(np.int32)
    image = nib.Nifti1Image(data, np.eye(4))
    image.header.set_slope_inter(1.0, -100_000.0)
    path = tmp_path / "v.nii.gz"
    nib.save(image, path)
    study = load_study(path)
    assert study.pixels.dtype == np.int16
    np.testing.assert_array_equal(np.sort(study.pixels, axis=None), np.sort(data - 100_000, axis=None))


@pytest.mark.parametrize("dtype", ["u1", "i1", "<u2", ">u2", "i2", "u4", ">i4", "u8", "i8"])
@pytest.mark.parametrize("offset", [-40_000.0, -1024.0, 0.0, 40_000.0])
def test_whole_hu_are_added_exactly_in_every_integer_type(dtype: str, offset: float) -> None:
    """``add_whole_hu``, which every reader uses to store int16 HU: each sum that fits in int16 is exact, from any
    integer type and byte order, through a flipped view, with offsets beyond int16 (uint64 with a signed scalar
    would otherwise be added in float64)."""
    import warnings

    from lungsight.study import add_whole_hu

    info = np.iinfo(np.dtype(dtype))
    low, high = max(info.min, -30_000 - int(offset)), min(info.max, 30_000 - int(offset))
    if low > high:
        pytest.skip(f"no {dtype} value plus {offset} fits in int16")
    values = np.linspace(low, high, 48).round().astype(np.int64).astype(dtype).reshape(4, 12)[:, ::-1]
    out = np.empty(values.shape, np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no cast on the way may warn
        add_whole_hu(values, offset, out)
    np.testing.assert_array_equal(out.astype(np.int64), values.astype(np.int64) + int(offset))


def test_uint64_voxels_with_a_large_intercept_are_exact_int16(tmp_path: Path) -> None:
    data = np.random.default_rng(4).integers(40_000, 60_000, (6, 5, 4)).astype(np.uint64)
    image = nib.Nifti1Image(data, np.eye(4), dtype=np.uint64)
    image.header.set_slope_inter(1.0, -40_000.0)
    path = tmp_path / "v.nii.gz"
    nib.save(image, path)
    study = load_study(path)
    assert study.pixels.dtype == np.int16
    np.testing.assert_array_equal(np.sort(study.pixels, axis=None), np.sort(data.astype(np.int64) - 40_000, axis=None))


def test_a_scaling_that_overflows_is_reported_without_a_numpy_warning(tmp_path: Path) -> None:
    import warnings

    stored = np.full((4, 4, 3), 30000, np.int16)
    stored[0, 0, 0], stored[0, 0, 1] = 0, -3  # 0 and -3e38 HU stay finite in float32
    image = nib.Nifti1Image(stored, np.eye(4))
    image.header.set_slope_inter(1e38, 0.0)
    nib.save(image, tmp_path / "huge.nii")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        study = load_study(tmp_path / "huge.nii")
    assert np.isfinite(study.pixels).all()
    assert any("46 voxels were NaN or infinite" in w for w in study.warnings)


def test_a_header_describing_a_huge_volume_is_a_clear_error(tmp_path: Path) -> None:
    """32,000 slices of 512 x 512 (31 GiB as float32) promised by a 0.5 MB file: named, never a MemoryError."""
    import struct

    stored = bytearray(nib.Nifti1Image(np.zeros((512, 512, 2), np.int16), np.eye(4)).to_bytes())
    stored[46:48] = struct.pack("<h", 32000)  # dim[3]
    (tmp_path / "huge.nii").write_bytes(bytes(stored))
    with pytest.raises(InputError, match=r"huge\.nii: truncated NIfTI file: its header describes 32000 slices"):
        load_study(tmp_path / "huge.nii")
    (tmp_path / "huge.nii.gz").write_bytes(gzip.compress(bytes(stored)))
    with pytest.raises(InputError, match=r"huge\.nii\.gz: (the volume its header describes does not fit|corrupt)"):
        load_study(tmp_path / "huge.nii.gz")
