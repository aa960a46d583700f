"""Windowing, paper-002 slice selection and model-input geometry, checked against hand-computed values."""

import numpy as np
import pytest
import torch

from lungsight.preprocess.selection import BOX_X, BOX_Y, FEW_KEPT, dark_counts, dark_level, select_slices
from lungsight.preprocess.transforms import (
    augmentation,
    fit_square,
    model_batch,
    tensor_view,
    unfit_square,
    windowed_model_batch,
)
from lungsight.preprocess.window import LUNG_WINDOW, to_unit, unit_bounds


def test_lung_window_maps_hu_to_unit_range():
    hu = np.array([-2000.0, -1350.0, -600.0, 150.0, 3000.0])
    np.testing.assert_allclose(to_unit(hu, "hu"), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert LUNG_WINDOW == (-1350.0, 150.0)


def test_grey8_is_divided_by_255_and_grey16_uses_percentiles():
    np.testing.assert_allclose(to_unit(np.array([0.0, 51.0, 255.0]), "grey8"), [0.0, 0.2, 1.0])
    g16 = np.linspace(1000, 3000, 1001)
    u = to_unit(g16, "grey16")
    assert u.min() == 0.0 and u.max() == 1.0 and 0.45 < u[500] < 0.55


def test_dark_levels_are_the_papers_raw_300_in_each_unit():
    assert dark_level("hu") == -724.0
    assert dark_level("grey16") == 300.0
    # -724 HU in the lung window (-1350..150) is (626 / 1500) of full scale
    assert dark_level("grey8") == pytest.approx(255 * 626 / 1500)


def _series(dark_pixels_per_slice, size=512):
    """Slices of soft tissue (40 HU) with ``k`` dark (-1000 HU) pixels placed inside the central box."""
    x0, y0 = round(BOX_X[0] * size), round(BOX_Y[0] * size)
    w = round(BOX_X[1] * size) - x0
    vol = np.full((len(dark_pixels_per_slice), size, size), 40.0, np.float32)
    for i, k in enumerate(dark_pixels_per_slice):
        flat = vol[i, y0:, x0 : x0 + w].reshape(-1)[:k]
        flat[:] = -1000.0
        vol[i, y0:, x0 : x0 + w] = np.pad(flat, (0, vol[i, y0:, x0 : x0 + w].size - k), constant_values=40.0).reshape(
            vol[i, y0:, x0 : x0 + w].shape
        )
    return vol


def test_paper_002_example_threshold():
    # The paper's example: 3030 and 30 dark pixels give a threshold of (3030 - 30) / 1.5 = 2000.
    vol = _series([30, 3030, 2500, 1999, 2001, 100])
    sel = select_slices(vol, "hu")
    np.testing.assert_allclose(dark_counts(vol, "hu"), [30, 3030, 2500, 1999, 2001, 100])
    assert sel.threshold == pytest.approx(2000.0)
    assert sel.kept.tolist() == [False, True, True, False, True, False]
    assert sel.kept_indices == [1, 2, 4] and sel.dropped_indices == [0, 3, 5]


def test_selection_scales_box_and_counts_with_resolution():
    big = _series([30, 3030, 2500, 1999, 2001, 100])
    small = torch.nn.functional.interpolate(torch.from_numpy(big)[:, None], size=(256, 256), mode="nearest")
    sel = select_slices(small[:, 0].numpy(), "hu")
    assert sel.kept.tolist() == [False, True, True, False, True, False]


def test_short_or_flat_series_keep_every_slice_and_say_why():
    sel = select_slices(_series([10, 3000]), "hu")
    assert sel.kept.all() and "all kept" in sel.note
    flat = select_slices(_series([500] * 8), "hu")
    assert flat.kept.all() and "barely vary" in flat.note


def _crop(lung_columns_per_slice: list[int], size: int = 100) -> np.ndarray:
    """A lung crop: soft tissue (40 HU) in the centre, where paper 002's box lies, and lung (-850 HU) in the given
    number of columns at each side of the frame."""
    vol = np.full((len(lung_columns_per_slice), size, size), 40.0, np.float32)
    for i, k in enumerate(lung_columns_per_slice):
        if k:
            vol[i, :, :k] = vol[i, :, -k:] = -850.0
    return vol


def test_a_crop_around_the_lungs_counts_the_whole_frame_and_a_whole_chest_keeps_paper_002_s_box():
    vol = _crop([0, 5, 20, 20, 20, 19, 8, 0])  # 2k of 100 columns are lung: 0 %, 10 %, 40 %, ..., 16 %, 0 %
    crop = select_slices(vol, "hu", spacing=(1.5, 1.5, 1.5))  # 150 mm across: a crop
    assert crop.params["field_of_view_mm"] == [150.0, 150.0] and "whole frame" in crop.method
    assert crop.params["box"] == {"x": [0.0, 1.0], "y": [0.0, 1.0]}
    # whole-frame counts in 512 x 512 units: 2k columns of 100 rows of a 100 x 100 frame -> 2k * 100 * 26.2144
    np.testing.assert_allclose(crop.dark_counts, [2 * k * 100 * 26.2144 for k in [0, 5, 20, 20, 20, 19, 8, 0]])
    assert crop.threshold == pytest.approx(40 * 100 * 26.2144 / 1.5)  # (max - min) / 1.5
    assert crop.kept_indices == [2, 3, 4, 5]
    # the same pixels over a 400 mm field of view are a whole chest: the central box sees no lung at all
    chest = select_slices(vol, "hu", spacing=(1.5, 4.0, 4.0))
    assert "central box" in chest.method and chest.params["field_of_view_mm"] == [400.0, 400.0]
    assert chest.kept.all() and "barely vary" in chest.note
    # without a spacing (8-bit slices), or with a meaningless one, nothing is known of the field of view: the box
    for spacing in (None, (1.0, 0.0, 0.0), (1.0, float("nan"), 1.5)):
        sel = select_slices(vol, "hu", spacing=spacing)
        assert sel.params["field_of_view_mm"] is None and "central box" in sel.method


def test_fit_square_resizes_without_padding_and_unfit_square_restores_the_shape():
    img = np.zeros((100, 50), np.float32)
    img[:50] = 1.0  # top half bright
    sq = fit_square(img, 64)
    assert sq.shape == (1, 64, 64)
    # the bright top half fills the top half of the square: no black padding at the sides
    assert sq[0, 10, 1].item() == pytest.approx(1.0) and sq[0, 54, 32].item() == pytest.approx(0.0)
    back = unfit_square(sq.numpy(), 100, 50)
    assert back.shape == (1, 100, 50)
    assert back[0, 5:45].min() > 0.9 and back[0, 55:].max() < 0.1


def test_model_batch_normalises_per_channel():
    x = model_batch(np.full((2, 32, 32), 0.5, np.float32), 16, 3, (0.5, 0.25, 0.0), (0.25, 0.25, 0.5))
    assert x.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(x[0, :, 0, 0].numpy(), [0.0, 1.0, 1.0])


def test_augmentations_keep_shape_and_range():
    torch.manual_seed(0)
    x = torch.rand(1, 64, 64)
    for name in ("paper002", "paper002+intensity"):
        y = augmentation(name)(x)
        assert y.shape == x.shape and not torch.equal(x, y)
    assert augmentation("none") is None
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmentation("mixup")


def test_a_subset_of_a_16_bit_study_is_mapped_with_the_whole_study_s_bounds():
    """The percentiles of 16-bit values of no known unit belong to the study: a batch of its slices mapped with
    the study's bounds equals the same slices of the whole study mapped at once, and differs when mapped alone."""
    rng = np.random.default_rng(0)
    study = np.concatenate([rng.uniform(0, 1000, (4, 8, 8)), rng.uniform(2000, 4000, (4, 8, 8))]).astype(np.float32)
    bounds = unit_bounds(study, "grey16")
    np.testing.assert_allclose(bounds, np.percentile(study, [0.5, 99.5]), rtol=1e-6)
    whole = to_unit(study, "grey16")
    np.testing.assert_array_equal(to_unit(study[:4], "grey16", bounds=bounds), whole[:4])
    assert to_unit(study[:4], "grey16").max() == 1.0 and whole[:4].max() < 0.3
    assert unit_bounds(study, "hu", (-1000.0, 200.0)) == (-1000.0, 200.0)
    assert unit_bounds(study, "grey8") == (0.0, 255.0)


@pytest.mark.parametrize(
    ("intensity", "shape", "size"),
    [
        ("hu", (5, 64, 64), 24),
        ("hu", (3, 40, 56), 24),
        ("grey8", (4, 16, 16), 24),
        ("hu", (2, 24, 24), 24),
        ("hu-int16", (5, 64, 64), 24),
    ],
)
def test_windowed_model_batch_is_model_batch_of_the_windowed_values(intensity, shape, size):
    """Clipping before the resize and scaling after it gives the unit path's input up to rounding: shrinking
    (square and not), enlarging and no resize, values far outside the window included, HU stored as int16 too."""
    rng = np.random.default_rng(7)
    if intensity.startswith("hu"):
        values = rng.normal(-600.0, 900.0, shape).astype(np.float32)
        if intensity == "hu-int16":
            values = values.round().astype(np.int16)
        intensity = "hu"
    else:
        values = rng.integers(0, 256, shape).astype(np.float32)
    bounds = unit_bounds(values, intensity)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = model_batch(to_unit(values, intensity, bounds=bounds), size, 3, mean, std)
    before = values.copy()
    got = windowed_model_batch(values, bounds, size, 3, mean, std)
    assert got.shape == expected.shape == (shape[0], 3, size, size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(values, before)  # the study's pixels are never written


def test_tensor_view_shares_memory_only_where_it_safely_can():
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.shares_memory(tensor_view(a).numpy(), a)
    read_only = a.copy()
    read_only.flags.writeable = False
    whole = a.astype(np.int16)  # how readers store whole HU
    assert tensor_view(whole).dtype == torch.int16 and np.shares_memory(tensor_view(whole).numpy(), whole)
    for other in (a[::-1], a[:, :, ::2], read_only, a.astype(np.int32)):
        t = tensor_view(other)  # no warning, no error on negative strides
        assert t.dtype == torch.float32 and not np.shares_memory(t.numpy(), a)
        np.testing.assert_array_equal(t.numpy(), other)


def test_a_selection_that_keeps_only_a_few_slices_says_so() -> None:
    """Fewer than FEW_KEPT kept slices of a longer series are reported (the rules would decide from them alone);
    a short series kept whole, or a normal selection, is not."""
    n = 30
    vol = np.full((n, 64, 64), 40.0, np.float32)  # soft tissue: no dark pixels
    vol[:2, 24:40, 24:40] = -1000.0  # two slices with lungs in the central box
    sel = select_slices(vol, "hu")
    assert sel.kept_indices == [0, 1]
    assert sel.note.startswith(f"only 2 of {n} slices kept by slice selection") and "--no-select" in sel.note
    vol[: FEW_KEPT + 3, 24:40, 24:40] = -1000.0
    assert select_slices(vol, "hu").note == ""
