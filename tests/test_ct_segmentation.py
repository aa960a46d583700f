"""CT segmentation (paper 003): HU-derived lung masks, the nifti layouts, slab splits, the Xception U-Net, training on
a real volume and the infection drop-in on ``lungsight predict``.

No COVID-19 infection masks are in the shared data. The infection model used here is a *stand-in*: a tiny U-Net
trained in the test on lung masks derived from HU (:func:`derive_lung_mask_hu`) and saved with the infection task.
It tests the machinery (loading, per-slice masks, the fraction, the result entry and overlays), not infection
detection.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import lungsight
from lungsight.cli import main
from lungsight.errors import InputError, ModelError
from lungsight.inference.infection import InfectionSegmenter
from lungsight.io.nifti import read_nifti
from lungsight.models.unet import build_lung_unet, load_lung_unet, lung_unet_config, save_lung_unet
from lungsight.models.weights import read_checkpoint
from lungsight.preprocess.ct_lungs import derive_lung_mask_hu
from lungsight.train import segmentation as seg


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def ct_dir(shared_data: Path) -> Path:
    d = shared_data / "ct-volume"
    if not (d / "chest_ct_cropped.nii.gz").is_file() or not (d / "masks").is_dir():
        pytest.skip("ct-volume/ with chest_ct_cropped.nii.gz and masks/ is absent")
    return d


@pytest.fixture(scope="module")
def lobes(ct_dir: Path) -> np.ndarray:
    masks = [read_nifti(p, p.name).pixels > 0 for p in sorted((ct_dir / "masks").glob("*.nii.gz"))]
    return np.logical_or.reduce(masks)


def test_derived_lungs_agree_with_the_lobe_masks(ct_dir: Path, lobes: np.ndarray) -> None:
    hu = lungsight.load_study(ct_dir / "example_ct_sm.nii.gz").pixels
    derived = derive_lung_mask_hu(hu)
    assert derived.shape == hu.shape == lobes.shape
    assert dice(derived, lobes) > 0.9  # the rule against the manual lobe masks of the same volume
    assert not derived[: lobes.any(axis=(1, 2)).argmax() - 2].any()  # no lung (stomach gas) below the lungs
    assert derive_lung_mask_hu(hu[25]).shape == hu.shape[1:]
    with pytest.raises(ValueError, match="volume"):
        derive_lung_mask_hu(hu[None])


def test_derived_lungs_on_a_cropped_volume(ct_dir: Path) -> None:
    """Lungs that touch the image border (a cropped volume) are kept; the outside air is not."""
    hu = lungsight.load_study(ct_dir / "chest_ct_cropped.nii.gz").pixels
    lung = derive_lung_mask_hu(hu)
    share = lung.mean(axis=(1, 2))
    assert share[30:100].min() > 0.3 and share.max() < 0.6
    assert (hu[lung] < -400).mean() > 0.9  # filled holes (vessels) are a small part
    assert lung[105, 50, 0] and hu[105, 50, 0] < -400  # lung at the image's left edge
    assert not lung[105, :3, -4:].any() and (hu[105, :3, -4:] < -960).all()  # the outside air in the corner


def _nii(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def test_nifti_layouts_are_discovered(tmp_path: Path) -> None:
    tiny = np.zeros((4, 4, 2), dtype=np.int16)
    kaggle = tmp_path / "kaggle"
    for sub, name in [
        ("ct_scans", "coronacases_org_001.nii"),
        ("ct_scans", "radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii"),
        ("ct_scans", "coronacases_org_002.nii"),
        ("Lung_Mask", "coronacases_001.nii"),
        ("Lung_Mask", "radiopaedia_4_85506_1.nii"),
        ("infection_mask", "coronacases_002.nii"),
    ]:
        (kaggle / sub).mkdir(parents=True, exist_ok=True)
        _nii(kaggle / sub / name, tiny)
    pairs = seg.discover_volumes(kaggle, "lung")
    assert [(p.volume.name, p.masks[0].name) for p in pairs] == [
        ("coronacases_org_001.nii", "coronacases_001.nii"),
        ("radiopaedia_org_covid-19-pneumonia-4_85506_1-dcm.nii", "radiopaedia_4_85506_1.nii"),
    ]
    assert [p.volume.name for p in seg.discover_volumes(kaggle, "infection")] == ["coronacases_org_002.nii"]
    assert (
        all(p.derived for p in seg.discover_volumes(kaggle, "lung", "hu"))
        and len(seg.discover_volumes(kaggle, masks="hu")) == 3
    )

    medseg = tmp_path / "medseg"
    medseg.mkdir()
    _nii(medseg / "tr_im.nii.gz", tiny)
    _nii(medseg / "tr_mask.nii.gz", tiny)
    (pair,) = seg.discover_volumes(medseg, "infection")
    assert pair.masks == (medseg / "tr_mask.nii.gz",) and pair.labels == (1, 2)
    with pytest.raises(InputError, match="tr_lungmasks_updated"):
        seg.discover_volumes(medseg, "lung")
    with pytest.raises(InputError, match="cannot stand in"):
        seg.discover_volumes(medseg, "infection", "hu")
    with pytest.raises(InputError, match="needs --masks"):
        seg.discover_volumes(medseg / "tr_im.nii.gz", "lung")
    with pytest.raises(InputError, match="no lung_mask/"):
        seg.discover_volumes(medseg.parent / "kaggle" / "ct_scans", "lung")
    with pytest.raises(InputError, match="no NIfTI mask"):
        seg.discover_volumes(medseg / "tr_im.nii.gz", "lung", str(tmp_path / "missing.nii.gz"))


def test_medseg_labels_pick_the_infection(ct_dir: Path, tmp_path: Path) -> None:
    """Labels 1 and 2 (ground glass, consolidation) are infection, 3 (effusion) is not; masks share the volume's
    orientation, so a mask written with the volume's affine lines up slice for slice."""
    image = nib.load(str(ct_dir / "example_ct_sm.nii.gz"))
    labels = np.zeros(image.shape, dtype=np.uint8)
    labels[10:20, 10:20, 25] = 1
    labels[30:40, 10:20, 25] = 2
    labels[50:60, 10:20, 25] = 3
    mask = _nii(tmp_path / "tr_mask.nii.gz", labels, image.affine)
    hu, target = seg.read_volume_pair(seg.VolumePair(ct_dir / "example_ct_sm.nii.gz", (mask,), (1, 2)), "infection")
    assert target.shape == hu.shape and target.sum() == 200 and target[25].sum() == 200
    _nii(tmp_path / "small.nii.gz", labels[:-1])
    with pytest.raises(InputError, match="does not match"):
        seg.read_volume_pair(seg.VolumePair(ct_dir / "example_ct_sm.nii.gz", (tmp_path / "small.nii.gz",)))


def test_slab_split_is_contiguous_with_gaps() -> None:
    groups = np.repeat([0, 1], [11, 40])
    train, val = seg.split_slabs(groups, 0.3, seed=3, gap=1)
    assert not set(train) & set(val)
    for g, n_val in [(0, 3), (1, 12)]:
        v = val[groups[val] == g]
        t = train[groups[train] == g]
        assert len(v) == n_val and np.all(np.diff(v) == 1)
        assert np.abs(t[:, None] - v[None]).min() == 2  # one slice left out either side
        assert len(t) + len(v) + 2 >= (groups == g).sum() >= len(t) + len(v) + 1
    with pytest.raises(InputError, match="too few"):
        seg.split_slabs(np.zeros(3, dtype=int), 0.3, seed=0, gap=1)


@pytest.mark.parametrize("name", ["xception41", "legacy_xception"])
def test_xception_unet_gives_a_logit_per_pixel(name: str) -> None:
    config = lung_unet_config(encoder="xception", xception_name=name, input_size=64, preprocess="window")
    model = build_lung_unet(config).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1, 64, 64)
    with pytest.raises(ValueError, match="encoder"):
        build_lung_unet({**config, "encoder": "vgg"})


def test_old_lung_checkpoints_still_load(tmp_path: Path) -> None:
    config = {k: v for k, v in lung_unet_config(channels=[4, 8], strides=[2]).items()}
    for key in ("encoder", "xception_name", "decoder_channels", "preprocess"):
        del config[key]
    path = save_lung_unet(build_lung_unet(config), config, tmp_path / "old.safetensors")
    _, loaded = load_lung_unet(path)
    assert loaded["encoder"] == "monai" and loaded["preprocess"] == "equalise"
    with pytest.raises(ModelError, match="not a infection segmentation model"):
        InfectionSegmenter.from_file(path)


def test_train_on_a_volume_then_infection_drop_in(ct_dir: Path, tmp_path: Path, capsys) -> None:
    volume = ct_dir / "chest_ct_cropped.nii.gz"
    code = main(
        [
            *("segment", "train", "--layout", "nifti", "--data", str(volume), "--masks", "hu"),
            *("--out", str(tmp_path / "run"), "--input-size", "64", "--epochs", "2", "--batch-size", "16"),
            *("--lr", "1e-3", "--threads", "1"),
        ]
    )
    assert code == 0
    assert "derived from HU" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    (held,) = summary["held_out"]
    assert held["target"] == "derived-hu" and held["val_slices"] == list(
        range(held["val_slices"][0], held["val_slices"][0] + summary["n_val"])
    )
    assert summary["n_val"] == round(0.15 * summary["n_pairs"])
    assert summary["n_pairs"] - summary["n_train"] - summary["n_val"] in (1, 2)  # the gap slices either side
    state, config = read_checkpoint(tmp_path / "run" / "model.safetensors")
    assert config["preprocess"] == "window" and config["training"]["held_out"] == summary["held_out"]

    # The stand-in infection model: the lung U-Net just trained, saved under the infection task.
    model = build_lung_unet(config)
    model.load_state_dict(state)
    stand_in = save_lung_unet(
        model,
        config | {"task": "infection-segmentation", "note": "stand-in: HU-derived lung masks"},
        tmp_path / "inf.safetensors",
    )
    study = lungsight.load_study(volume)
    result = InfectionSegmenter.from_file(stand_in).segment(study)
    assert result.infection.shape == result.lung.shape == study.pixels.shape
    rows = result.per_slice(study.slice_labels)
    frac = result.fraction_of_lung
    assert frac is not None and 0.0 <= frac <= 1.0
    assert frac == pytest.approx(sum(r["infection_px"] for r in rows) / sum(r["lung_px"] for r in rows))
    with_unet = InfectionSegmenter.from_file(stand_in, lung_model=tmp_path / "run" / "model.safetensors")
    by_unet = with_unet.segment(study)
    assert by_unet.lung_source == "lung U-Net" and by_unet.lung.shape == study.pixels.shape
    assert np.array_equal(by_unet.infection, result.infection)

    out = tmp_path / "pred"
    small = ct_dir / "example_ct_sm.nii.gz"
    assert main(["predict", str(small), "--out", str(out), "--infection-model", str(stand_in)]) == 0
    entry = json.loads((out / "result.json").read_text())["infection"]
    assert entry["lung_mask"].startswith("derived from HU") and 0.0 <= entry["fraction_of_lung"] <= 1.0
    assert entry["per_slice"] and entry["overlays"]
    assert all((out / o["file"]).is_file() for o in entry["overlays"])
    assert "Infected fraction of the lungs" in (out / "report.html").read_text()
    capsys.readouterr()
    assert main(["predict", str(small), "--out", str(tmp_path / "bad"), "--infection-model", str(volume)]) != 0
    assert "lungsight: error:" in capsys.readouterr().err
