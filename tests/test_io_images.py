"""PNG/JPEG/TIFF reading: real COVID-CT slices, natural sort, 16-bit TIFF to HU, pixel limit, corruption."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from lungsight.errors import InputContractError, InputError
from lungsight.io import check_ct_contract, load_study


@pytest.fixture(scope="module")
def real_png(covid_ct_dir: Path) -> Path:
    return sorted(covid_ct_dir.glob("*/*.png"))[0]


@pytest.fixture(scope="module")
def real_jpeg(covid_ct_dir: Path) -> Path:
    return sorted(covid_ct_dir.glob("*/*.jpg"))[0]


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims ``width`` x ``height`` but whose data is a few garbage bytes (what a decompression
    bomb looks like before decoding); the CLI and service tests use it too."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", b"garbage") + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


def test_single_png(real_png: Path) -> None:
    study = load_study(real_png)
    assert study.modality == "CT" and study.intensity == "grey8" and study.source_format == "image"
    assert study.slice_labels == [real_png.name] and study.spacing is None
    # RGBA with equal channels: the luminance equals the grey value, and no colour warning
    np.testing.assert_allclose(study.pixels[0], _grey(real_png), atol=0.51)
    assert study.warnings == []


def test_single_jpeg(real_jpeg: Path) -> None:
    study = load_study(real_jpeg)
    assert study.intensity == "grey8" and study.n_slices == 1
    np.testing.assert_allclose(study.pixels[0], _grey(real_jpeg), atol=0.51)
    assert study.pixels.min() >= 0 and study.pixels.max() <= 255


def test_folder_natural_sort(real_png: Path, tmp_path: Path) -> None:
    base = _grey(real_png).copy()
    for number in (10, 2, 1):
        base[0, 0] = number
        Image.fromarray(base).save(tmp_path / f"s{number}.png")
    study = load_study(tmp_path)
    assert study.source_format == "image-folder"
    assert study.slice_labels == ["s1.png", "s2.png", "s10.png"]
    assert [int(v) for v in study.pixels[:, 0, 0]] == [1, 2, 10]


def test_folder_of_mixed_sizes_is_resized_to_most_common(real_png: Path, tmp_path: Path) -> None:
    grey = Image.fromarray(_grey(real_png))
    for index in range(3):
        grey.resize((64, 48)).save(tmp_path / f"a{index}.png")
    grey.resize((40, 30)).save(tmp_path / "a3.png")
    study = load_study(tmp_path)
    assert study.pixels.shape == (4, 48, 64)
    assert any("a3.png: 40x30" in w and "resized to 64x48" in w for w in study.warnings)
    # every slice of its own size: the first one's is taken, and the note says so instead of "most common"
    for index, size in enumerate([(64, 48), (50, 40), (40, 30)]):
        grey.resize(size).save(tmp_path / f"a{index}.png")
    (tmp_path / "a3.png").unlink()
    study = load_study(tmp_path)
    assert study.pixels.shape == (3, 48, 64)
    assert (
        study.warnings[0].startswith("the 3 slices all differ in size (e.g. ")
        and "the first slice's" in study.warnings[0]
    )


def test_a_lungsight_output_inside_the_input_folder_is_not_read_as_slices(real_png: Path, tmp_path: Path) -> None:
    """``predict slices/ --out slices/out`` run twice: the second read skips the first run's report and overlays."""
    Image.fromarray(_grey(real_png)).save(tmp_path / "s1.png")
    out = tmp_path / "out"
    (out / "overlays").mkdir(parents=True)
    Image.fromarray(_grey(real_png)[:, :50]).save(out / "overlays" / "slice_0000.png")
    for name in ("result.json", "report.html", "slice_probabilities.svg"):
        (out / name).write_text("x")
    study = load_study(tmp_path)
    assert study.slice_labels == ["s1.png"] and study.warnings == []


def test_folder_of_mixed_bit_depths_is_refused(real_png: Path, tmp_path: Path) -> None:
    Image.fromarray(_grey(real_png)).save(tmp_path / "a.png")
    Image.fromarray(_grey(real_png).astype(np.uint16) * 200).save(tmp_path / "b.png")
    with pytest.raises(InputError, match="same bit depth") as info:
        load_study(tmp_path)
    assert "b.png" in str(info.value) and "a.png" in str(info.value)


def test_sixteen_bit_png_is_grey16(real_png: Path, tmp_path: Path) -> None:
    values = _grey(real_png).astype(np.uint16) * 200
    Image.fromarray(values).save(tmp_path / "deep.png")
    study = load_study(tmp_path / "deep.png")
    assert study.intensity == "grey16"
    np.testing.assert_array_equal(study.pixels[0], values)
    assert any("16-bit values are scaled" in w for w in study.warnings)


def test_coloured_image_warns(real_png: Path, tmp_path: Path) -> None:
    rgb = np.repeat(_grey(real_png)[..., None], 3, axis=2)
    rgb[:40, :40] = (255, 0, 0)  # a red annotation
    Image.fromarray(rgb).save(tmp_path / "annotated.png")
    study = load_study(tmp_path / "annotated.png")
    assert abs(float(study.pixels[0, 0, 0]) - 0.299 * 255) < 0.01
    assert any("colour channels that differ" in w for w in study.warnings)


def test_sixteen_bit_tiff_folder_round_trips_to_hu(ct_nifti_sm: Path, tmp_path: Path) -> None:
    volume = np.maximum(load_study(ct_nifti_sm).pixels, -1024)
    for k, plane in enumerate(volume):
        tifffile.imwrite(tmp_path / f"slice_{k}.tif", (plane + 1024).astype(np.uint16))
    study = load_study(tmp_path)
    assert study.source_format == "tiff-folder" and study.intensity == "hu" and study.modality == "CT"
    assert study.slice_labels[:3] == ["slice_0.tif", "slice_1.tif", "slice_2.tif"]
    assert np.abs(study.pixels - volume).max() <= 1
    assert any("value + (-1024)" in w for w in study.warnings)


def test_tiff_intercept_is_honoured(tmp_path: Path) -> None:
    plane = np.tile(np.arange(0, 3000, 30, dtype=np.uint16), (100, 1))
    tifffile.imwrite(tmp_path / "one.tif", plane)
    study = load_study(tmp_path / "one.tif", tiff_intercept=-1000.0)
    np.testing.assert_array_equal(study.pixels[0], plane.astype(np.float32) - 1000)


def test_oversize_png_is_refused_without_decoding(tmp_path: Path) -> None:
    for side in (40000, 9000):
        path = png_header_only(tmp_path / f"big{side}.png", side, side)
        with pytest.raises(InputError, match=f"{side}x{side} pixels exceeds the limit of 64,000,000") as info:
            load_study(path)
        assert str(path) in str(info.value) and "max_pixels=N" in str(info.value)


def test_max_pixels_argument(real_png: Path) -> None:
    with pytest.raises(InputError, match="exceeds the limit of 1,000 pixels"):
        load_study(real_png, max_pixels=1000)


@pytest.mark.parametrize("keep", [0.1, 0.9])  # cut in the header segments, or in the scan data
def test_truncated_jpeg(real_jpeg: Path, tmp_path: Path, keep: float) -> None:
    path = tmp_path / "cut.jpg"
    data = real_jpeg.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(InputError, match=r"(?i)truncated") as info:
        load_study(path)
    assert str(path) in str(info.value)


def test_text_named_png(tmp_path: Path) -> None:
    (tmp_path / "fake.png").write_text("hello")
    with pytest.raises(InputError, match=r"fake\.png: not a readable image"):
        load_study(tmp_path / "fake.png")


def test_blank_image_breaks_the_contract(tmp_path: Path) -> None:
    Image.fromarray(np.full((64, 64), 30, np.uint8)).save(tmp_path / "blank.png")
    with pytest.raises(InputContractError, match="nearly constant"):
        load_study(tmp_path / "blank.png")


def test_xray_modality_and_ct_contract(shared_data: Path) -> None:
    xray = next(iter(sorted((shared_data / "cxr-actualmed").glob("*/*.png"))), None)
    if xray is None:
        pytest.skip("no X-ray PNG in the shared data")
    study = load_study(xray, modality="XR")
    assert study.modality == "XR" and study.intensity == "grey8"
    with pytest.raises(InputContractError, match=r"this is an X-ray \(Modality XR\), the CT model cannot read it"):
        check_ct_contract(study, str(xray))
