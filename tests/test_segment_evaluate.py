"""A lung segmenter scored against manual masks (``lungsight segment evaluate``), and the patient-grouped
validation split of ``lungsight segment train --groups``: hand-computed Dice/IoU, the split's invariants, and the
command on real X-rays whose "manual" masks are known (the classical segmenter's own masks and the template)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lungsight
from lungsight.cli import main
from lungsight.errors import InputError
from lungsight.evaluate.masks import mask_agreement
from lungsight.preprocess import lung_fields as lf
from lungsight.preprocess.window import to_unit
from lungsight.train import segmentation as seg


def test_mask_agreement_hand_computed() -> None:
    pred = np.zeros((4, 4), bool)
    truth = np.zeros((4, 4), bool)
    pred[0, :4] = True  # 4 pixels
    truth[0, 1:4] = True  # 6 pixels, 3 of them shared with pred
    truth[1, 1:4] = True
    got = mask_agreement(pred, truth)
    assert got["dice"] == pytest.approx(2 * 3 / (4 + 6)) and got["iou"] == pytest.approx(3 / 7)
    assert mask_agreement(pred, pred) == {"dice": 1.0, "iou": 1.0}
    assert mask_agreement(np.zeros((2, 2)), np.zeros((2, 2))) == {"dice": 1.0, "iou": 1.0}
    assert mask_agreement(pred, np.zeros((4, 4))) == {"dice": 0.0, "iou": 0.0}
    with pytest.raises(ValueError, match="shape"):
        mask_agreement(pred, truth[:3])


def test_split_by_patient_keeps_each_patient_on_one_side() -> None:
    groups = ["p1", "p1", "p2", "p3", "p3", "p3", "p4", "p5", "p6", "p6"]
    train, val = seg.split_indices(len(groups), 0.34, seed=3, groups=groups)
    assert sorted([*train, *val]) == list(range(len(groups)))
    held = {groups[i] for i in val}
    assert held and not held & {groups[i] for i in train}
    assert len(held) == 2  # round(0.34 * 6 patients)
    # without groups each image is its own patient: the split of earlier versions, so old runs resume unchanged
    train0, val0 = seg.split_indices(10, 0.2, seed=5)
    order = np.random.default_rng(5).permutation(10)
    assert list(val0) == sorted(order[:2]) and list(train0) == sorted(order[2:])
    with pytest.raises(InputError, match="two patients"):
        seg.split_indices(3, 0.5, seed=0, groups=["a", "a", "a"])


def test_read_groups_matches_names_and_counts_unlisted(tmp_path: Path) -> None:
    table = tmp_path / "metadata.csv"
    table.write_text("file,patientid,finding\nx1.jpg,7,COVID-19\nx2.png,7,COVID-19\nx3.png,8,No Finding\n")
    pairs = [
        seg.Pair(tmp_path / "images" / "x1.jpg", (tmp_path / "masks" / "x1.png",)),
        seg.Pair(tmp_path / "images" / "x2.jpeg", (tmp_path / "masks" / "x2.png",)),  # matched by its stem
        seg.Pair(tmp_path / "images" / "x3.png", (tmp_path / "masks" / "x3.png",)),
        seg.Pair(tmp_path / "images" / "x9.png", (tmp_path / "masks" / "x9.png",)),
    ]
    groups, unlisted = seg.read_groups(table, pairs)
    assert groups[0] == groups[1] != groups[2] and unlisted == 1 and groups[3] not in groups[:3]
    (tmp_path / "bad.csv").write_text("name,label\nx1.jpg,covid\n")
    with pytest.raises(InputError, match="patientid"):
        seg.read_groups(tmp_path / "bad.csv", pairs)


def _known_masks_folder(shared_data: Path, root: Path) -> dict[str, str]:
    """Three real X-rays whose masks are the classical segmenter's own (saved at half size) and one whose mask is
    the template; returns what each image's mask is."""
    images = sorted((shared_data / "cxr-actualmed" / "images").iterdir())[:4]
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    kinds = {}
    for k, path in enumerate(images):
        study = lungsight.load_study(path, modality="XR")
        image = to_unit(study.pixels[0], study.intensity)
        mask = lf.template_mask(image) if k == 3 else lf.segment_detail(lf.default_segmenter(), image).mask
        kinds[path.name] = "template" if k == 3 else "classical"
        (root / "images" / path.name).symlink_to(path)
        half = lf.resize_mask(mask, (image.shape[0] // 2, image.shape[1] // 2))
        Image.fromarray(half.astype(np.uint8) * 255).save(root / "masks" / f"{path.stem}_mask.png")
    return kinds


def test_cli_segment_evaluate_on_masks_it_knows(
    shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    kinds = _known_masks_folder(shared_data, data)
    out = tmp_path / "eval"
    assert (
        main(["segment", "evaluate", "--data", str(data), "--out", str(out), "--worst", "2", "--model", "classical"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "pairs layout: 4 X-rays with manual masks" in printed and "classical on 4 X-rays" in printed
    with open(out / "agreement.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(kinds)
    for name, kind in kinds.items():
        row = rows[name]
        if kind == "classical":  # its own mask, saved at half size: only the resizing differs
            assert float(row["dice"]) > 0.97
        else:  # the template itself is the baseline, and the segmenter's own mask is not it
            assert float(row["template_dice"]) > 0.97 and float(row["dice"]) < float(row["template_dice"])
        assert 0.0 < float(row["all_lung_dice"]) < 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == 4 and summary["segmenter"] == "classical"
    worst = [n for n in kinds if kinds[n] == "template"]
    assert summary["worst_images"][0] == worst[0] and len(summary["worst_images"]) == 2
    sheet = Image.open(out / "worst_cases.png")
    assert sheet.size[0] == 4 * 256 and sheet.size[1] == 256 + 18

    # --held-out scores only the X-rays a training run held out
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"held_out_images": [worst[0]]}))
    out2 = tmp_path / "eval2"
    assert main(["segment", "evaluate", "--data", str(data), "--held-out", str(run), "--out", str(out2)]) == 0
    summary2 = json.loads((out2 / "summary.json").read_text())
    assert summary2["n_images"] == 1 and summary2["segmenter"] == "xr-lungs"  # the default
    (run / "summary.json").write_text(json.dumps({"held_out_images": ["elsewhere.png"]}))
    assert main(["segment", "evaluate", "--data", str(data), "--held-out", str(run), "--out", str(out2)]) == 2
    assert "none of its held-out X-rays" in capsys.readouterr().err
