"""The model registry, safe weights I/O, named-model resolution with SHA-256 checks, and the offline path."""

import json

import pytest
import torch

from conftest import write_tiny_model
from lungsight.errors import ModelError, WeightsUnavailableError
from lungsight.models import MODELS, build_model
from lungsight.models import pretrained as pt
from lungsight.models.weights import load_state_dict, read_checkpoint, sha256_file

SMALL = {"inception-v3": 96, "xception": 96}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_runs_and_exposes_a_4d_cam_layer(name):
    size = SMALL.get(name, 64)
    model = build_model(name, num_classes=2, input_size=size).eval()
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = output.shape

    handle = model.cam_layer.register_forward_hook(hook)
    x = torch.randn(2, MODELS[name].in_chans, size, size)
    with torch.no_grad():
        out = model(x)
    handle.remove()
    assert out.shape == (2, 2)
    assert len(seen["shape"]) == 4
    # the Grad-CAM layer is not a second copy of the weights in the state dict
    assert not any(k.startswith("cam_layer") for k in model.state_dict())


def test_vgg16_head_is_paper_000s_head():
    m = build_model("vgg16-head", input_size=224)
    layers = [type(x).__name__ for x in m.head]
    assert layers == ["AvgPool2d", "Flatten", "Linear", "ReLU", "Dropout", "Linear"]
    assert m.head[2].in_features == 3 * 3 * 512 and m.head[2].out_features == 64 and m.head[4].p == 0.5


def test_fpn_has_five_scales_and_small_relu_heads():
    m = build_model("resnet50v2-fpn", input_size=64)
    assert len(m.heads) == 5
    assert all(isinstance(h[-1], torch.nn.ReLU) and h[-2].out_features == 2 for h in m.heads)
    assert m.classifier.in_features == 10


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ModelError, match="unknown model 'nope'"):
        build_model("nope")


def test_imagenet_download_failure_says_what_to_do(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(timm, "create_model", offline)
    monkeypatch.setattr("lungsight.models.architectures.timm.create_model", offline)
    with pytest.raises(WeightsUnavailableError, match=r"--weights FILE.*--pretrained none"):
        build_model("resnet18", pretrained="imagenet")


def test_vgg16_head_imagenet_offline(monkeypatch):
    from torchvision.models import VGG16_Weights

    def offline(self, *a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(VGG16_Weights, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailableError, match="offline"):
        build_model("vgg16-head", pretrained="imagenet")


def test_local_weights_file_initialises_and_freezes_the_vgg_base(tmp_path):
    from safetensors.torch import save_file
    from torchvision.models import vgg16

    ref = vgg16(weights=None)
    path = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    m = build_model("vgg16-head", pretrained=path)
    assert torch.equal(m.features[0].weight, ref.features[0].weight)
    assert not any(p.requires_grad for p in m.features.parameters())
    assert all(p.requires_grad for p in m.head.parameters())


def test_local_timm_weights_file(tmp_path):
    ref = build_model("resnet18", input_size=64)
    path = tmp_path / "r18.pth"
    torch.save(ref.net.state_dict(), path)
    m = build_model("resnet18", pretrained=path)
    assert torch.equal(m.net.layer1[0].conv1.weight, ref.net.layer1[0].conv1.weight)


def test_weights_files_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"x": object()}, path)  # needs pickle to load
    with pytest.raises(ModelError, match="not a readable weights file"):
        load_state_dict(path)


def _model_file(tmp_path, name="m.safetensors"):
    return write_tiny_model(tmp_path / name)


def test_checkpoint_round_trip_keeps_config_and_weights(tmp_path):
    model, path = _model_file(tmp_path)
    state, cfg = read_checkpoint(path)
    assert cfg["arch"] == "resnet18" and cfg["input_size"] == 64
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temporary file


def test_named_models_are_verified_imported_and_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGSIGHT_HOME", str(tmp_path / "home"))
    _, path = _model_file(tmp_path)
    entry = pt.import_model("mine", path)
    assert entry.source == "home" and entry.sha256 == sha256_file(path)
    _, cfg, _ = pt.load_model("mine")
    assert cfg["arch"] == "resnet18"
    with pytest.raises(ModelError, match="already imported"):
        pt.import_model("mine", path)
    # a tampered file is refused
    with open(entry.path, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\1")
    with pytest.raises(ModelError, match="SHA-256"):
        pt.load_model("mine")
    # a registered URL is fetched on first use, verified, and then served from LUNGSIGHT_HOME
    pt.register_url("remote", path.as_uri(), sha256_file(path))
    _, cfg, e = pt.load_model("remote")
    assert e.path.is_file() and cfg["input_size"] == 64
    pt.register_url("bad", path.as_uri(), "0" * 64)
    with pytest.raises(ModelError, match="does not match"):
        pt.load_model("bad")
    assert not (tmp_path / "home" / "models" / "bad.safetensors").exists()
    # an entry without a recorded SHA-256 (a hand-edited index) is refused, present file or not
    index_path = tmp_path / "home" / "models" / "index.json"
    index = json.loads(index_path.read_text())
    index["unchecked"] = {"file": entry.path.name}
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelError, match="records no SHA-256"):
        pt.load_model("unchecked")


def test_import_refuses_a_file_that_is_not_a_lungsight_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGSIGHT_HOME", str(tmp_path / "home"))
    bad = tmp_path / "notes.safetensors"
    bad.write_text("hello")
    with pytest.raises(ModelError, match="not a readable lungsight model file"):
        pt.import_model("x", bad)
    assert not (tmp_path / "home" / "models" / "index.json").exists()


def test_bundled_index_lists_ct_default():
    index = json.loads((pt.BUNDLED / "index.json").read_text())
    assert "ct-default" in index and len(index["ct-default"]["sha256"]) == 64


def test_model_files_are_readable_by_others(tmp_path):
    """safetensors recreates the file it writes: the atomic write sets 0644 after writing, not before."""
    _, path = write_tiny_model(tmp_path / "m.safetensors")
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("arch", ["alexnet", "googlenet"])
def test_torchvision_models_take_a_local_imagenet_style_weights_file(tmp_path, arch):
    """Papers 000/001's AlexNet and GoogLeNet: a torchvision state dict (1000 classes) initialises all but the head."""
    import torchvision.models as tvm

    kw = {"aux_logits": True, "init_weights": True} if arch == "googlenet" else {}
    reference = tvm.get_model(arch, weights=None, **kw)
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(arch, num_classes=2, pretrained=path)
    first_conv = "features.0.weight" if arch == "alexnet" else "conv1.conv.weight"
    assert torch.equal(model.net.state_dict()[first_conv], reference.state_dict()[first_conv])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2)
