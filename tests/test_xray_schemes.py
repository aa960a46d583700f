"""Paper 004's X-ray schemes: the lung ROI by hand on synthetic masks, then raw / cropped / segmented on real X-rays
(square output in [0, 1], the lung mask in the same frame, zeros outside the dilated mask, equalisation inside)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

import lungsight
from lungsight.preprocess import lung_fields as lf
from lungsight.preprocess.window import to_unit
from lungsight.preprocess.xray import SCHEMES, XrayInput, apply_scheme, centre_roi, crop, lung_roi, prepare_xray


def box_mask(shape: tuple[int, int], *boxes: tuple[int, int, int, int]) -> np.ndarray:
    """Bool mask with the given (r0, r1, c0, c1) boxes (exclusive ends) set."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


# --- geometry by hand ---------------------------------------------------------------------------------------------


def test_lung_roi_by_hand() -> None:
    # Lungs span rows 20-59 (40) and columns 50-129 (80): side 80 (+5 % each side = 88), centred on (40, 90).
    m = box_mask((100, 200), (20, 60, 50, 80), (20, 60, 100, 130))
    assert lung_roi(m, margin=0.0) == (0, 50, 80, 80)  # top (20 + 60 - 80) // 2 = 0
    # top (80 - 88) // 2 = -4 is moved inside the image (88 <= 100 rows); left (180 - 88) // 2 = 46
    assert lung_roi(m) == (0, 46, 88, 88)
    # Lungs as tall as the image: side 110 > 100 rows, so the square reaches outside (padding) vertically, while
    # horizontally it is moved inside: left (10 + 30 - 110) // 2 = -35 -> 0.
    tall = box_mask((100, 200), (0, 100, 10, 30))
    assert lung_roi(tall) == (-5, 0, 110, 110)
    # The square always contains the lungs' bounding box.
    top, left, side, _ = lung_roi(m)
    assert top <= 20 and top + side >= 60 and left <= 50 and left + side >= 130
    with pytest.raises(ValueError, match="empty lung mask"):
        lung_roi(np.zeros((10, 10), dtype=bool))


def test_centre_roi_and_padded_crop() -> None:
    assert centre_roi((300, 400)) == (0, 50, 300, 300)
    assert centre_roi((401, 300)) == (50, 0, 300, 300)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(crop(a, (-1, 1, 3, 3)), [[0, 0, 0], [1, 2, 3], [5, 6, 7]])
    expected = [[True, True, False], [True, True, False], [False, False, False]]  # rows 1-3, columns 2-4 of a > 5
    np.testing.assert_array_equal(crop(a > 5, (1, 2, 3, 3), False), expected)


def synthetic_xray(h: int = 240, w: int = 320) -> tuple[np.ndarray, np.ndarray]:
    """A bright body with two dark 'lungs' (darker towards the top, with fine noise) and their mask."""
    rng = np.random.default_rng(0)
    mask = box_mask((h, w), (40, 190, 60, 140), (40, 190, 180, 260))
    image = np.full((h, w), 0.8, np.float32) + 0.02 * rng.standard_normal((h, w)).astype(np.float32)
    ramp = np.broadcast_to(np.linspace(0.05, 0.35, h, dtype=np.float32)[:, None], (h, w))
    image[mask] = ramp[mask] + 0.01 * rng.standard_normal(int(mask.sum())).astype(np.float32)
    return np.clip(image, 0, 1), mask


def test_schemes_on_a_synthetic_xray() -> None:
    image, mask = synthetic_xray()
    raw = apply_scheme(image, "raw", mask, size=120)
    assert raw.roi == (0, 40, 240, 240) and raw.mask_ok and raw.note == "" and raw.scheme == "raw"
    # 5 % margins: rows 40-189 (150) and columns 60-259 (200) -> side 220, centred on (115, 160).
    cropped = apply_scheme(image, "cropped", mask, size=110)
    assert cropped.roi == (5, 50, 220, 220)
    assert cropped.image.shape == cropped.lung_mask.shape == (110, 110)
    expected = lf.resize_mask(crop(mask, cropped.roi, False), (110, 110))
    np.testing.assert_array_equal(cropped.lung_mask, expected)
    # the lungs stay dark after equalisation, in the same frame as the returned mask
    assert cropped.image[cropped.lung_mask].mean() < 0.35 < 0.65 < cropped.image[~cropped.lung_mask].mean()
    # size = the ROI's side: no resizing, so the pixels are exactly the equalised crop
    segmented = apply_scheme(image, "segmented", mask, size=220)
    assert segmented.roi == cropped.roi
    dilated = crop(ndi.binary_dilation(mask, np.ones((5, 5), bool)), segmented.roi, False)
    np.testing.assert_array_equal(segmented.support, dilated)
    np.testing.assert_array_equal(segmented.lung_mask, crop(mask, segmented.roi, False))
    assert (segmented.image[~dilated] == 0).all() and (segmented.image[dilated] > 0).all()
    q = np.quantile(segmented.image[dilated], [0.1, 0.25, 0.5, 0.75, 0.9])
    np.testing.assert_allclose(q, [0.1, 0.25, 0.5, 0.75, 0.9], atol=0.02)  # equalised inside only: uniform


def test_implausible_masks_fall_back_to_the_template() -> None:
    image, mask = synthetic_xray()
    for bad in (np.zeros_like(mask), mask & (np.arange(mask.shape[1]) < 160)[None, :]):
        out = apply_scheme(image, "cropped", bad, size=64)
        assert not out.mask_ok and "template" in out.note and out.lung_mask.any()
        assert out.image.shape == (64, 64)
    small = apply_scheme(image, "segmented", mask[::2, ::2], size=64)  # a mask at another resolution is resized
    assert small.mask_ok and small.roi == apply_scheme(image, "segmented", mask, size=64).roi
    with pytest.raises(ValueError, match="unknown X-ray scheme"):
        apply_scheme(image, "clahe", mask)


def test_prepare_xray_reports_a_template_fallback() -> None:
    flat = np.full((200, 200), 0.5, np.float32)
    out = prepare_xray(flat, "segmented", size=64)
    assert isinstance(out, XrayInput) and not out.mask_ok and "template" in out.note


# --- real X-rays --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_xrays(shared_data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Six frontal X-rays of different sources, views and sizes, with their classical lung masks."""
    segmenter = lf.default_segmenter()
    picked = []
    for source, step in (("cxr-cohen", 90), ("cxr-actualmed", 20)):
        with open(shared_data / source / "metadata.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["view"] in ("PA", "AP", "AP Supine")]
        for r in rows[::step]:
            study = lungsight.load_study(shared_data / source / "images" / r["file"], modality="XR")
            image = to_unit(study.pixels[0], study.intensity)
            picked.append((image, segmenter.segment(image)))
    return picked


@pytest.mark.parametrize("scheme", SCHEMES)
def test_schemes_on_real_xrays(real_xrays: list[tuple[np.ndarray, np.ndarray]], scheme: str) -> None:
    for image, mask in real_xrays:
        out = apply_scheme(image, scheme, mask, size=256)
        assert out.image.shape == out.lung_mask.shape == out.support.shape == (256, 256)
        assert out.image.dtype == np.float32 and out.lung_mask.dtype == bool
        assert out.image.min() >= 0.0 and out.image.max() <= 1.0 and out.image.max() > 0.9
        top, left, side, side2 = out.roi
        assert side == side2
        used = mask if out.mask_ok else lf.template_mask(image)
        np.testing.assert_array_equal(out.lung_mask, lf.resize_mask(crop(used, out.roi, False), (256, 256)))
        if scheme == "raw":
            assert out.roi == centre_roi(image.shape)
        else:  # the square holds the whole lung mask
            rows, cols = np.nonzero(used)
            assert top <= rows.min() and rows.max() < top + side and left <= cols.min() and cols.max() < left + side
        if scheme == "segmented":
            assert (out.image[~out.support] == 0).all() and (out.lung_mask <= out.support).all()
            inner = ndi.binary_erosion(out.support, iterations=2)
            q = np.quantile(out.image[inner], [0.25, 0.5, 0.75])
            np.testing.assert_allclose(q, [0.25, 0.5, 0.75], atol=0.08)
        else:
            assert (out.image > 0).mean() > 0.9


def test_cropped_zooms_in_on_the_lungs(real_xrays: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """The lungs fill more of the cropped frame than of the raw one (paper 004's reason for the crop)."""
    for image, mask in real_xrays:
        raw = apply_scheme(image, "raw", mask, size=128)
        cropped = apply_scheme(image, "cropped", mask, size=128)
        assert cropped.lung_mask.mean() > raw.lung_mask.mean()
