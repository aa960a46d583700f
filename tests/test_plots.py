"""Evaluation pictures: each call writes one valid PNG of a sensible size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungsight.evaluate import plot_confusion, plot_roc


def _check_png(path: Path, min_side: int = 300, max_side: int = 1400) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
        arr = np.asarray(im.convert("L"))
    assert min_side <= w <= max_side and min_side <= h <= max_side, (w, h)
    assert arr.std() > 5  # not a blank canvas


def test_plot_roc(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    curves = {
        "slice": (y, np.clip(0.3 * y + rng.random(200) * 0.7, 0, 1)),
        "patient (threshold-10)": (y[:40], np.clip(0.5 * y[:40] + rng.random(40) * 0.5, 0, 1)),
        "one class": (np.zeros(5, dtype=int), rng.random(5)),
    }
    out = plot_roc(curves, tmp_path / "sub" / "roc.png", title="ROC, fold 1")
    assert out == tmp_path / "sub" / "roc.png"
    _check_png(out)


def test_plot_roc_needs_a_curve(tmp_path):
    with pytest.raises(ValueError, match="no ROC"):
        plot_roc({}, tmp_path / "roc.png")


@pytest.mark.parametrize("normalize", [False, True])
def test_plot_confusion(tmp_path, normalize):
    y_true = [0, 0, 0, 1, 1, 1, 1, 1, 0, 1]
    y_pred = [0, 0, 1, 1, 1, 1, 0, 1, 0, 1]
    out = plot_confusion(y_true, y_pred, ["non-COVID", "COVID-19"], tmp_path / "cm.png", normalize=normalize)
    _check_png(out)


def test_plot_confusion_with_label_strings_three_classes(tmp_path):
    labels = ["normal", "pneumonia", "COVID-19"]
    y_true = ["normal", "COVID-19", "pneumonia", "COVID-19", "normal"]
    y_pred = ["normal", "COVID-19", "COVID-19", "pneumonia", "normal"]
    _check_png(plot_confusion(y_true, y_pred, labels, tmp_path / "cm3.png", normalize=True))
    with pytest.raises(ValueError, match="not in labels"):
        plot_confusion(["cat"], ["normal"], labels, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="outside"):
        plot_confusion([0, 3], [0, 1], labels, tmp_path / "bad.png")
