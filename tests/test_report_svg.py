"""The per-prediction slice-probability chart (SVG): what it draws, checked against hand-counted cases."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from lungsight.report.svg import BAND, BLUE, BOTTOM, GREY, HEIGHT, RED, TOP, slice_chart, slice_probability_svg

NS = {"s": "http://www.w3.org/2000/svg"}


def _parse(text: str) -> ET.Element:
    return ET.fromstring(text)  # well-formed XML, or this raises


def test_points_bands_lines_and_threshold_are_the_hand_counted_ones():
    #           0     1    2    3    4    5    6     7    8    9
    p = [np.nan, 0.2, 0.7, 0.9, 0.1, 0.3, np.nan, 0.6, 0.4, 0.8]
    sel = [False, True, True, True, False, False, False, True, True, False]
    root = _parse(slice_probability_svg(p, sel, 0.5))
    circles = root.findall("s:circle", NS)
    assert len(circles) == 8  # every slice with a probability: not 0 or 6
    fills = [c.get("fill") for c in circles]
    assert fills.count(RED) == 3  # kept and >= 0.5: slices 2, 3, 7
    assert fills.count(BLUE) == 2  # kept and below: 1, 8
    assert fills.count(GREY) == 3  # dropped with a probability: 4, 5, 9
    bands = [r for r in root.findall("s:rect", NS) if r.get("fill") == BAND]
    assert len(bands) == 3  # dropped runs: [0], [4, 5, 6], [9]
    assert len(root.findall("s:polyline", NS)) == 2  # kept runs of two or more: 1-3 and 7-8
    # the threshold line sits at half the plot height
    dashed = [ln for ln in root.findall("s:line", NS) if ln.get("stroke-dasharray") and ln.get("x2") != "8"]
    ph = HEIGHT - TOP - BOTTOM
    assert float(dashed[0].get("y1")) == pytest.approx(TOP + 0.5 * ph, abs=0.06)
    # a point's height is its probability: p = 0.9 at slice 3
    tips = {c.find("s:title", NS).text: float(c.get("cy")) for c in circles}
    y3 = next(y for t, y in tips.items() if t.startswith("slice 3 "))
    assert y3 == pytest.approx(TOP + 0.1 * ph, abs=0.06)


def test_labels_are_escaped_and_shown_on_hover():
    text = slice_probability_svg([0.4, 0.6], [True, True], 0.5, labels=["<script>x</script>", "b&c.png"])
    assert "<script>" not in text
    root = _parse(text)
    tips = [c.find("s:title", NS).text for c in root.findall("s:circle", NS)]
    assert tips == ["slice 0 (<script>x</script>): p = 0.400, selected", "slice 1 (b&c.png): p = 0.600, positive"]


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="selected"):
        slice_probability_svg([0.1, 0.2], [True], 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        slice_probability_svg([], [], 0.5)
    with pytest.raises(ValueError, match="labels"):
        slice_probability_svg([0.1], [True], 0.5, labels=["a", "b"])


def test_chart_of_a_result_uses_its_threshold_and_none_for_an_xray():
    result = {
        "decision": {"params": {"slice_threshold": 0.8}},
        "slice_probabilities": [
            {"index": 0, "label": "a", "selected": True, "p": 0.7},
            {"index": 1, "label": "b", "selected": True, "p": 0.9},
            {"index": 2, "label": "c", "selected": False, "p": None},
        ],
    }
    root = _parse(slice_chart(result))
    assert [c.get("fill") for c in root.findall("s:circle", NS)] == [BLUE, RED]  # 0.7 is below 0.8
    assert slice_chart({"decision": {}, "evidence": {}}) is None
