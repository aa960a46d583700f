"""Golden end-to-end tests: real files through the CLI and the Python API with the bundled ct-default, compared
with recorded references (decision, kept slices, per-slice probabilities within a tolerance)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "golden"))

from cases import BUNDLED_EXAMPLE, CASES, PROB_TOLERANCE, REFERENCES, summary

import lungsight
from lungsight.cli import main
from lungsight.examples import EXAMPLE_CT

REFS = json.loads(REFERENCES.read_text())


@pytest.fixture(scope="module")
def detector():
    return lungsight.Detector.from_pretrained("ct-default")


def _compare(got: dict, want: dict) -> None:
    assert got["label"] == want["label"]
    assert got["rule"] == want["rule"]
    assert got["selected"] == want["selected"]
    assert got["rules"] == want["rules"]
    assert len(got["p"]) == len(want["p"])
    for g, w in zip(got["p"], want["p"], strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            assert g == pytest.approx(w, abs=PROB_TOLERANCE)


def test_references_were_recorded_with_the_bundled_model(detector):
    assert REFS["model_sha256"] == detector.entry.sha256, "ct-default changed: re-record tests/golden"


@pytest.mark.parametrize("name", sorted(CASES))
def test_python_api_matches_reference(name, shared_data, detector):
    path = shared_data / CASES[name]
    _compare(summary(detector.predict(lungsight.load_study(path), explain=False).result), REFS[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dicom-series", "covid-ct-png"])
def test_cli_matches_reference(name, shared_data, tmp_path, capsys):
    assert main(["predict", str(shared_data / CASES[name]), "--out", str(tmp_path)]) == 0
    _compare(summary(json.loads((tmp_path / "result.json").read_text())), REFS[name])


def test_bundled_example_needs_no_shared_data(detector, tmp_path):
    pred = detector.predict(lungsight.load_study(EXAMPLE_CT))
    _compare(summary(pred.result), REFS[BUNDLED_EXAMPLE])
    report = pred.save(tmp_path)
    assert report.name == "report.html" and len(list((tmp_path / "overlays").glob("*.png"))) == 4


def test_batch_apis_agree_with_predict(detector, shared_data):
    import numpy as np

    from lungsight.preprocess.window import to_unit

    study = lungsight.load_study(shared_data / CASES["dicom-series"])
    result = detector.predict(study, explain=False).result
    unit = to_unit(study.pixels, study.intensity)
    p_pos = [s["p"] for s in result["slice_probabilities"]]
    # predict windows the stored values in fewer passes (equal to to_unit's input up to about 1e-6): the
    # probabilities agree to rounding through the network
    np.testing.assert_allclose(detector.slice_probabilities(unit, batch_size=7)[:, -1], p_pos, atol=1e-4)
    np.testing.assert_allclose(detector.image_probabilities(list(unit[:3]))[:, -1], p_pos[:3], atol=1e-4)


def test_one_pass_explanation_matches_a_separate_grad_cam(detector):
    """predict classifies and explains in one pass (Grad-CAM's backward runs beside the classifying forward); its
    probabilities must be those of the plain forward and its maps those of a separate Grad-CAM of the same slices."""
    import numpy as np

    from lungsight.preprocess.window import to_unit

    study = lungsight.load_study(EXAMPLE_CT)
    explained = detector.predict(study, top_k=3, batch_size=5)
    plain = detector.predict(study, explain=False)
    got = [s["p"] for s in explained.result["slice_probabilities"]]
    want = [s["p"] for s in plain.result["slice_probabilities"]]
    assert [g is None for g in got] == [w is None for w in want]
    np.testing.assert_allclose([g for g in got if g is not None], [w for w in want if w is not None], atol=1e-5)
    top = [ev.index for ev in explained.evidence]
    kept_p = {s["index"]: s["p"] for s in plain.result["slice_probabilities"] if s["selected"]}
    assert top == sorted(kept_p, key=lambda i: -kept_p[i])[:3]  # the most suspicious kept slices, in order
    reference = detector.explain(to_unit(study.pixels[top], study.intensity, tuple(detector.config["window"])))
    for ev, ref in zip(explained.evidence, reference, strict=True):
        assert ev.cam.shape == ref.shape and ev.cam.max() > 0.9
        np.testing.assert_allclose(ev.cam, ref, atol=1e-4)


def test_every_batch_of_a_16_bit_series_is_windowed_with_the_whole_series_bounds(detector):
    """A 16-bit slice series of no known unit is scaled between its own percentiles: those of the whole series,
    not of each batch, so the probabilities do not depend on the batch size."""
    import numpy as np

    from lungsight.preprocess.window import to_unit
    from lungsight.study import Study

    hu = lungsight.load_study(EXAMPLE_CT).pixels
    study = Study(pixels=np.clip(hu + 1024.0, 0, None) * 4.0, modality="CT", intensity="grey16")
    got = detector.predict(study, select=False, explain=False, batch_size=4)
    whole = detector.slice_probabilities(to_unit(study.pixels, "grey16"))[:, detector.positive]
    np.testing.assert_allclose([s["p"] for s in got.result["slice_probabilities"]], whole, atol=1e-5)


def test_ct_default_explains_from_its_linear_head_with_grad_cams_maps(detector):
    """ct-default's logits are a linear layer on the average of its Grad-CAM layer, so after the first batch its
    maps come from the forward pass alone: equal to Grad-CAM's on real slices, and no backward runs."""
    import torch

    from lungsight.explain import GradCAM
    from lungsight.preprocess.window import to_unit

    study = lungsight.load_study(EXAMPLE_CT)
    x = detector.inputs(to_unit(study.pixels[40:52], study.intensity, tuple(detector.config["window"])))
    head = detector.model.linear_head
    assert head is not None
    backward: list[int] = []
    hook = head.register_full_backward_hook(lambda *_: backward.append(1))
    try:
        with detector.grad_cam() as fast, GradCAM(detector.model, detector.model.cam_layer) as full:
            for k, batch in enumerate((x[:4], x[4:8], x[8:])):
                want_logits, want = full.logits_and_maps(batch, detector.positive)
                backward.clear()
                got_logits, got = fast.logits_and_maps(batch, detector.positive)
                assert backward == ([] if k else [1]) and fast.shortcut is True
                torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-5)
                assert float(want.amax()) > 0
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.amax()))
    finally:
        hook.remove()
