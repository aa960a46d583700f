"""Paper 004's COVID-Net variant: its structure, its training defaults, and that it can learn."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import write_tiny_model
from lungsight.errors import ModelError
from lungsight.inference.route import model_modality
from lungsight.models import build_model
from lungsight.models.covidnet import PEPX, STAGE_DEPTHS, CovidNet, PEPXStage
from lungsight.models.registry import get_spec
from lungsight.models.weights import read_checkpoint_config, save_checkpoint
from lungsight.preprocess.transforms import augmentation
from lungsight.train.trainer import TrainConfig


def test_pepx_is_projection_expansion_depthwise_projection_extension():
    block = PEPX(64, 128)
    convs = [m for m in block.body if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.groups) for c in convs] == [
        (64, 32, (1, 1), 1),
        (32, 48, (1, 1), 1),
        (48, 48, (3, 3), 48),  # depth-wise
        (48, 32, (1, 1), 1),
        (32, 128, (1, 1), 1),
    ]


def test_stages_have_covidnets_depths_and_the_head_paper_004s_dropout():
    model = CovidNet(num_classes=3)
    stages = [s for s in model.stages if isinstance(s, PEPXStage)]
    assert [1 + len(s.rest) for s in stages] == list(STAGE_DEPTHS) == [3, 4, 6, 3]
    linears = [m for m in model.head if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [1024, 256, 3]
    assert [m.p for m in model.head if isinstance(m, nn.Dropout)] == [0.3, 0.3]
    assert model.cam_layer is stages[-1]


def test_stage_modules_are_densely_connected():
    """Module k reads the running sum: zeroing the first module's output changes what every later module sees."""
    torch.manual_seed(0)
    stage = PEPXStage(8, 8, depth=3, downsample=False).eval()
    x = torch.randn(1, 8, 8, 8)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone())) for m in stage.rest]
    with torch.no_grad():
        stage(x)
        expected_first = stage.shortcut(x) + stage.first(x)
    for h in hooks:
        h.remove()
    assert torch.allclose(seen[0], expected_first)
    with torch.no_grad():
        assert torch.allclose(seen[1], expected_first + stage.rest[0](expected_first))


def test_covidnet_has_no_imagenet_weights_and_says_what_to_do():
    with pytest.raises(ModelError, match="--pretrained none"):
        build_model("covidnet", 3, pretrained="imagenet")


def test_covidnet_defaults_are_paper_004s():
    cfg = TrainConfig(data="d", model="covidnet", out="o").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.batch_size, cfg.epochs, cfg.scheduler, cfg.augment) == (
        "adam",
        2e-5,
        32,
        24,
        "plateau",
        "paper004",
    )
    assert get_spec("covidnet").paper == "004"


def test_covidnet_learns_a_separable_toy_problem():
    torch.manual_seed(0)
    model = CovidNet(num_classes=2, base=8)
    x = torch.rand(16, 1, 48, 48)
    y = torch.arange(16) % 2
    x[y == 1, :, :24] += 1.0  # bright upper half = class 1
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for m in model.modules():  # batch-norm statistics of the final weights (a few steps leave them lagging)
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy == 1.0


def test_paper004_augmentation_keeps_shape_and_range():
    torch.manual_seed(0)
    x = torch.rand(1, 96, 96)
    out = augmentation("paper004")(x)
    assert out.shape == x.shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x)


def test_model_modality_comes_from_the_checkpoint_header(tmp_path):
    _, ct = write_tiny_model(tmp_path / "ct.safetensors")
    assert read_checkpoint_config(ct)["arch"] == "resnet18"
    assert model_modality(ct) == "CT"
    model = CovidNet(num_classes=3, base=8)
    xr = save_checkpoint(
        model, {"arch": "covidnet", "task": "cxr", "modality": "XR", "classes": []}, tmp_path / "x.safetensors"
    )
    assert model_modality(xr) == "XR"
    assert model_modality("ct-default") == "CT"
