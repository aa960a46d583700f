"""Reading chest X-rays and the frontal-only contract, on real radiographs from ../shared/data.

DICOM radiographs are built in tmp_path from a real X-ray with pydicom: the pixel values inverted and stored as
MONOCHROME1 (Modality CR or DX, 8 or 12 bits, with and without WindowCenter/Width) must read the right way up.
"""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import lungsight.inference.view as view_module
from lungsight.errors import InputContractError
from lungsight.io import check_xr_contract, load_study
from lungsight.preprocess.window import to_unit
from lungsight.study import Study

_SOP_CLASS = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}


def _cohen_files(shared_data: Path, view: str, n: int) -> list[Path]:
    folder = shared_data / "cxr-cohen"
    with open(folder / "metadata.csv", newline="", encoding="utf-8") as handle:
        files = [row["file"] for row in csv.DictReader(handle) if row["view"] == view]
    if len(files) < n:
        pytest.skip(f"fewer than {n} {view} views in {folder}")
    return [folder / "images" / f for f in files[:n]]


@pytest.fixture(scope="module")
def frontal_png(shared_data: Path) -> Path:
    """A real frontal X-ray (Actualmed, 8-bit PNG)."""
    files = sorted((shared_data / "cxr-actualmed" / "images").glob("*.png"))
    if not files:
        pytest.skip("no Actualmed X-rays")
    return files[0]


def _grey(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("L"))


def _xray_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str,
    modality: str = "CR",
    bits: int = 8,
    window: tuple[float, float] | None = None,
    view: str | None = None,
) -> Path:
    """A single-frame radiograph: ``stored`` written as is, with the given photometric interpretation."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.set_pixel_data(stored, photometric, bits)
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if view is not None:
        ds.ViewPosition = view
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(path, enforce_file_format=True)
    return path


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


@pytest.mark.parametrize(
    ("modality", "bits", "window"),
    [
        ("CR", 8, None),
        ("CR", 8, (110.0, 200.0)),
        ("DX", 12, None),
        ("DX", 12, (1800.0, 3600.0)),
    ],
)
def test_monochrome1_xray_reads_right_way_up(
    frontal_png: Path, tmp_path: Path, modality: str, bits: int, window: tuple[float, float] | None
) -> None:
    original = _grey(frontal_png).astype(np.uint16)
    scale = 2 ** (bits - 8)
    top = 2**bits - 1
    stored = (top - original * scale).astype(np.uint8 if bits == 8 else np.uint16)  # MONOCHROME1: white is 0
    assert _corr(stored, original) < -0.99  # what a reader that forgets the inversion would return
    path = _xray_dicom(
        tmp_path / "cxr.dcm", stored, photometric="MONOCHROME1", modality=modality, bits=bits, window=window
    )
    study = load_study(path)
    assert study.modality == "XR" and study.n_slices == 1
    assert study.intensity == ("grey8" if bits == 8 else "grey16")
    assert study.metadata["monochrome1_inverted"] is True
    assert study.metadata["voi_lut_applied"] is (window is not None)
    assert study.metadata["PhotometricInterpretation"] == "MONOCHROME1"
    assert _corr(study.pixels[0], original) > 0.95  # inverted exactly once: not left inverted, not inverted twice
    assert study.pixels.min() >= 0.0 and study.pixels.max() <= top
    if window is None:
        np.testing.assert_allclose(study.pixels[0], original * scale)  # no window: exactly the original values


def test_monochrome2_xray_is_not_inverted(frontal_png: Path, tmp_path: Path) -> None:
    original = _grey(frontal_png)
    study = load_study(_xray_dicom(tmp_path / "m2.dcm", original, photometric="MONOCHROME2", modality="DX"))
    assert study.metadata["monochrome1_inverted"] is False
    np.testing.assert_array_equal(study.pixels[0], original)


def test_sixteen_bit_png_xray_is_grey16_with_full_range(frontal_png: Path, tmp_path: Path) -> None:
    original = _grey(frontal_png).astype(np.uint16) * 257  # 0..255 -> 0..65535
    Image.fromarray(original).save(tmp_path / "cxr16.png")
    study = load_study(tmp_path / "cxr16.png", modality="XR")
    assert study.modality == "XR" and study.intensity == "grey16"
    np.testing.assert_array_equal(study.pixels[0], original)
    assert study.pixels.min() == 0 and study.pixels.max() == 65535
    unit = to_unit(study.pixels[0], study.intensity)
    assert unit.min() == 0.0 and unit.max() == 1.0
    assert _corr(unit, original) > 0.99
    view = check_xr_contract(study, "cxr16.png")
    assert view.kind == "frontal" and view.source == "classifier"


def _no_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the view classifier must not run when the header states the view")

    monkeypatch.setattr(view_module, "classify_view", refuse)


@pytest.mark.parametrize("position", ["LL", "RL", "LATERAL"])
def test_lateral_view_position_refused_without_classifier(
    frontal_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, position: str
) -> None:
    path = _xray_dicom(tmp_path / "lat.dcm", _grey(frontal_png), photometric="MONOCHROME2", view=position)
    study = load_study(path)
    assert study.metadata["ViewPosition"] == position
    _no_classifier(monkeypatch)
    with pytest.raises(InputContractError) as info:
        check_xr_contract(study, "lat.dcm")
    assert str(info.value) == (
        f"lat.dcm: this is a lateral chest X-ray (view {position} from the DICOM header); "
        "only frontal (PA/AP) views can be classified"
    )


def test_oblique_view_position_refused(frontal_png: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _xray_dicom(tmp_path / "obl.dcm", _grey(frontal_png), photometric="MONOCHROME2", view="RLO")
    _no_classifier(monkeypatch)
    with pytest.raises(InputContractError, match=r"oblique chest X-ray \(view RLO from the DICOM header\)"):
        check_xr_contract(load_study(path), "obl.dcm")


@pytest.mark.parametrize("position", ["PA", "AP"])
def test_frontal_view_position_admits_without_classifier(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, position: str
) -> None:
    lateral = _cohen_files(shared_data, "L", 1)[0]  # the header decides, whatever the pixels look like
    path = _xray_dicom(tmp_path / "pa.dcm", _grey(lateral), photometric="MONOCHROME2", view=position)
    _no_classifier(monkeypatch)
    view = check_xr_contract(load_study(path), "pa.dcm")
    assert (view.kind, view.source, view.probabilities) == ("frontal", "metadata", {})
    assert view.evidence == f"ViewPosition {position} in the DICOM header"


def test_real_lateral_refused_by_the_classifier(shared_data: Path) -> None:
    """Lateral Cohen images were in the bundled classifier's final fit; its out-of-fold lateral recall is in
    xr-view.md. This checks the whole path: image file -> load_study(modality="XR") -> contract."""
    for path in _cohen_files(shared_data, "L", 3):
        study = load_study(path, modality="XR")
        with pytest.raises(InputContractError) as info:
            check_xr_contract(study, path.name)
        message = str(info.value)
        assert message.startswith(f"{path.name}: this is a lateral chest X-ray (lateral by the view classifier, p=")
        assert message.endswith("); only frontal (PA/AP) views can be classified")


def test_lateral_dicom_without_view_position_goes_to_the_classifier(shared_data: Path, tmp_path: Path) -> None:
    lateral = _grey(_cohen_files(shared_data, "L", 1)[0])
    path = _xray_dicom(tmp_path / "lat.dcm", 255 - lateral, photometric="MONOCHROME1", modality="DX")
    with pytest.raises(InputContractError, match="lateral by the view classifier"):
        check_xr_contract(load_study(path), "lat.dcm")


def test_real_frontal_admitted_by_the_classifier(frontal_png: Path) -> None:
    """Actualmed images were never used to train the view classifier."""
    view = check_xr_contract(load_study(frontal_png, modality="XR"), frontal_png.name)
    assert view.kind == "frontal" and view.source == "classifier"
    assert view.probabilities["frontal"] > 0.5 and set(view.probabilities) == {"frontal", "lateral", "ct"}
    assert view.evidence.startswith("frontal by the view classifier, p=")


def test_ct_slice_given_as_xray_is_refused(covid_ct_dir: Path) -> None:
    path = sorted(covid_ct_dir.glob("*/*.png"))[0]
    study = load_study(path, modality="XR")
    with pytest.raises(InputContractError, match=r"does not look like a chest X-ray but like a CT slice \(view cl"):
        check_xr_contract(study, path.name)


def test_constant_ct_and_multi_image_studies_are_refused(frontal_png: Path) -> None:
    flat = Study(pixels=np.full((1, 64, 64), 120.0, dtype=np.float32), modality="XR", intensity="grey8")
    with pytest.raises(InputContractError, match="nearly constant"):
        check_xr_contract(flat, "flat.png")
    flat16 = Study(pixels=np.full((1, 64, 64), 3000.0, dtype=np.float32), modality="XR", intensity="grey16")
    with pytest.raises(InputContractError, match="nearly constant"):
        check_xr_contract(flat16, "flat16.png")
    ct = Study(pixels=np.zeros((1, 8, 8), dtype=np.float32), modality="CT", intensity="hu")
    with pytest.raises(InputContractError, match=r"this is a CT \(Modality CT\), the X-ray model cannot read it"):
        check_xr_contract(ct, "ct.nii")
    two = load_study(frontal_png, modality="XR")
    two.pixels = np.concatenate([two.pixels, two.pixels])
    two.slice_labels = ["a", "b"]
    with pytest.raises(InputContractError, match="an X-ray study is one image, this one has 2"):
        check_xr_contract(two, "folder")


@pytest.mark.parametrize(
    ("probabilities", "outcome"),
    [
        ({"frontal": 0.05, "lateral": 0.05, "ct": 0.90}, "refused: CT slice"),
        ({"frontal": 0.30, "lateral": 0.10, "ct": 0.60}, "frontal with a warning"),
        ({"frontal": 0.30, "lateral": 0.35, "ct": 0.35}, "refused: lateral"),
        ({"frontal": 0.70, "lateral": 0.30, "ct": 0.00}, "frontal"),
    ],
)
def test_classifier_decision_rules(
    frontal_png: Path, monkeypatch: pytest.MonkeyPatch, probabilities: dict[str, float], outcome: str
) -> None:
    kind = max(probabilities, key=probabilities.__getitem__)
    monkeypatch.setattr(
        view_module, "classify_view", lambda _image: view_module.ViewResult(kind, probabilities, "classifier", "")
    )
    study = load_study(frontal_png, modality="XR")
    if outcome.startswith("refused"):
        with pytest.raises(InputContractError, match=outcome.removeprefix("refused: ")):
            check_xr_contract(study, "x.png")
        return
    view = check_xr_contract(study, "x.png")
    assert (view.kind, view.source, view.probabilities) == ("frontal", "classifier", probabilities)
    unsure = [w for w in study.warnings if "unsure that this is a chest X-ray (p=0.60" in w]
    assert len(unsure) == (1 if outcome == "frontal with a warning" else 0)
