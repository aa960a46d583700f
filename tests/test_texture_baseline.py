"""The X-ray CNN's hand-crafted baseline: features checked by hand, and the baseline beats chance on real X-rays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungsight.evaluate.texture import FEATURE_NAMES, features_of_cache, texture_baseline_cv, texture_features


def _named(values: np.ndarray) -> dict[str, float]:
    assert values.shape == (len(FEATURE_NAMES),)
    return dict(zip(FEATURE_NAMES, values.tolist(), strict=True))


def test_features_of_a_half_black_half_white_lung_by_hand():
    image = np.zeros((64, 64))
    image[:, 32:] = 1.0
    mask = np.zeros((64, 64), bool)
    mask[16:48, 16:48] = True  # 16 black and 16 white columns inside the lungs
    f = _named(texture_features(image, mask))
    assert f["mean"] == pytest.approx(0.5) and f["std"] == pytest.approx(0.5)
    assert f["skewness"] == pytest.approx(0.0, abs=1e-12)
    assert f["kurtosis"] == pytest.approx(-2.0)  # two equal spikes: excess kurtosis 1 - 3
    assert f["hist_00"] == pytest.approx(0.5) and f["hist_15"] == pytest.approx(0.5)
    assert sum(f[f"hist_{k:02d}"] for k in range(16)) == pytest.approx(1.0)
    assert sum(f[f"lbp_{k}"] for k in range(10)) == pytest.approx(1.0)
    assert f["lung_area"] == pytest.approx(32 * 32 / 64**2)
    # vertical neighbours never differ, horizontal ones once per row: 64 of 64*63 pairs at 1 px, levels 0 and 31
    assert f["glcm_contrast_1px_90deg"] == pytest.approx(0.0)
    assert f["glcm_contrast_1px_0deg"] == pytest.approx(31**2 * 64 / (64 * 63))


def test_a_uniform_image_and_a_too_small_mask_give_finite_features():
    f = _named(texture_features(np.full((32, 32), 0.3), np.zeros((32, 32), bool)))
    assert all(np.isfinite(v) for v in f.values())
    assert f["lung_area"] == 1.0  # an empty mask falls back to the whole frame
    assert f["std"] == pytest.approx(0.0, abs=1e-12) and (f["skewness"], f["kurtosis"]) == (0.0, 0.0)
    with pytest.raises(ValueError, match="mask shape"):
        texture_features(np.zeros((8, 8)), np.zeros((4, 4), bool))


@pytest.mark.slow
def test_the_baseline_beats_chance_on_real_xrays_under_patient_grouped_folds(shared_data: Path, tmp_path):
    from lungsight.train.cxr import prepare_cache
    from lungsight.train.cxr_data import CXR_CLASSES, read_cxr_datasets

    records, _ = read_cxr_datasets([shared_data / "cxr-cohen", shared_data / "cxr-actualmed"])
    quota = {"normal": 26, "other-pneumonia": 40, "covid": 40}
    subset = []
    for r in records:
        if quota[r.label] > 0:
            subset.append(r)
            quota[r.label] -= 1
    files = prepare_cache(subset, "segmented", None, tmp_path / "cache")
    result = texture_baseline_cv(features_of_cache(files), [r.label for r in subset], subset, CXR_CLASSES, folds=3)
    # measured 0.722 pooled on these 106 X-rays; chance is 0.5
    assert result["pooled_macro_auc"] > 0.6, result["pooled_auc_per_class"]
    assert len(result["fold_macro_auc"]) == 3 and result["probabilities"].shape == (106, 3)
    np.testing.assert_allclose(result["probabilities"].sum(axis=1), 1.0, atol=1e-9)
