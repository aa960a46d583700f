"""Grad-CAM maps, evidence-in-mask share and slice overlays, on tiny hand-made networks."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lungsight.explain import GradCAM, cam_energy_inside, overlay_image, save_overlay
from lungsight.explain.overlay import OUTLINE_RGB, PANEL_GAP


class TinyCNN(nn.Module):
    """conv -> relu -> conv (target, stride 2) -> relu -> global average pool -> linear."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.target = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu2(self.target(self.relu1(self.conv1(x))))
        return self.fc(a.mean(dim=(2, 3)))


class QuadrantNet(nn.Module):
    """Class-1 logit = mean of target channel 0 (= input); class-0 logit = mean of channel 1 (= 1 - input)."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.target = nn.Conv2d(1, 2, 1)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.target.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.target.bias.copy_(torch.tensor([0.0, 1.0]))
            self.fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.target(self.pool(x))).mean(dim=(2, 3)))


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _quadrant_input(value: float = 1.0) -> tuple[torch.Tensor, np.ndarray]:
    x = torch.zeros(1, 1, 32, 32)
    x[..., :16, :16] = value
    mask = np.zeros((32, 32), dtype=bool)
    mask[:16, :16] = True
    return x, mask


def test_shape_range_and_dtype() -> None:
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = torch.rand(2, 1, 32, 40)
    with GradCAM(model, model.target) as cam:
        maps = cam(x, [0, 2])
    assert maps.shape == (2, 32, 40)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0 and maps.max() <= 1.0
    for m in maps:
        assert m.max() == pytest.approx(1.0) or m.max() == 0.0


def test_class_index_count_must_match_batch() -> None:
    model = TinyCNN().eval()
    with GradCAM(model, model.target) as cam, pytest.raises(ValueError):
        cam(torch.rand(2, 1, 16, 16), [0, 1, 2])


def test_quadrant_evidence_is_where_the_activation_is() -> None:
    model = _frozen(QuadrantNet())
    x, mask = _quadrant_input()
    with GradCAM(model, model.target) as cam:
        covid = cam(x, 1)[0]
        other = cam(x, 0)[0]
    assert cam_energy_inside(covid, mask) > 0.9
    assert cam_energy_inside(other, mask) < 0.1
    assert covid[:16, :16].max() == pytest.approx(1.0)


def test_all_zero_map_stays_zero() -> None:
    model = _frozen(QuadrantNet())
    x, _ = _quadrant_input(value=0.0)
    with GradCAM(model, model.target) as cam:
        m = cam(x, 1)
    assert np.isfinite(m).all()
    assert not m.any()
    assert cam_energy_inside(m[0], np.ones((32, 32), dtype=bool)) is None


def test_frozen_model_works_and_parameters_get_no_grad() -> None:
    torch.manual_seed(1)
    frozen = _frozen(TinyCNN())
    with GradCAM(frozen, frozen.target) as cam:
        assert cam(torch.rand(1, 1, 24, 24), 1).max() > 0
    trainable = TinyCNN().eval()
    trainable.load_state_dict(frozen.state_dict())
    x = torch.rand(1, 1, 24, 24)
    with GradCAM(trainable, trainable.target) as cam:
        cam(x, 1)
    assert all(p.grad is None for p in trainable.parameters())


def test_inplace_relu_after_target_gives_same_map() -> None:
    torch.manual_seed(2)
    inplace = TinyCNN(inplace=True).eval()
    plain = TinyCNN(inplace=False).eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.rand(3, 1, 20, 20)
    with GradCAM(inplace, inplace.target) as a, GradCAM(plain, plain.target) as b:
        np.testing.assert_allclose(a(x, 1), b(x, 1), atol=1e-6)


def _reference_cam(model: TinyCNN, x: torch.Tensor, cls: int) -> np.ndarray:
    """Grad-CAM written out by hand on the plain (not in-place) network, differentiating the whole graph."""
    x = x.clone().requires_grad_(True)
    act = model.target(model.relu1(model.conv1(x)))
    logits = model.fc(model.relu2(act).mean(dim=(2, 3)))
    (grad,) = torch.autograd.grad(logits[:, cls].sum(), act)
    cam = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * act).sum(dim=1, keepdim=True))
    cam = torch.nn.functional.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True)).detach().numpy()


def test_graph_is_cut_at_the_target_layer_with_the_same_map() -> None:
    torch.manual_seed(4)
    model = TinyCNN(inplace=False).eval()
    x = torch.rand(2, 1, 20, 20)
    reached: list[str] = []
    model.conv1.register_full_backward_hook(lambda *_: reached.append("conv1"))
    model.fc.register_full_backward_hook(lambda *_: reached.append("fc"))
    with GradCAM(model, model.target) as cam:
        maps = cam(x, 2)
    assert reached == ["fc"]  # the backward pass stopped at the target; the layers before it were not visited
    assert (maps.max(axis=(1, 2)) > 0).all()
    np.testing.assert_allclose(maps, _reference_cam(model, x, 2), atol=1e-6)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_callers_grad_mode_is_restored(grad_enabled: bool) -> None:
    model = TinyCNN().eval()
    with torch.set_grad_enabled(grad_enabled), GradCAM(model, model.target) as cam:
        assert cam(torch.rand(1, 1, 16, 16), 0).max() > 0
        assert torch.is_grad_enabled() is grad_enabled


def test_hooks_removed_after_close_and_ordinary_forward_unaffected() -> None:
    model = TinyCNN().eval()
    cam = GradCAM(model, model.target)
    assert len(model.target._forward_hooks) == 1
    with torch.no_grad():
        model(torch.rand(1, 1, 16, 16))  # a normal inference pass while the hook is in place
    cam.close()
    assert len(model.target._forward_hooks) == 0
    with pytest.raises(RuntimeError):
        cam(torch.rand(1, 1, 16, 16), 0)
    with GradCAM(model, model.target):
        assert len(model.target._forward_hooks) == 1
    assert len(model.target._forward_hooks) == 0


def test_cam_energy_inside_hand_computed() -> None:
    cam = np.array([[1.0, 0.0], [0.0, 3.0]])
    assert cam_energy_inside(cam, np.array([[True, False], [False, False]])) == pytest.approx(0.25)
    assert cam_energy_inside(cam, np.array([[False, False], [False, True]])) == pytest.approx(0.75)
    assert cam_energy_inside(cam, np.ones((2, 2), dtype=bool)) == pytest.approx(1.0)
    assert cam_energy_inside(cam, np.zeros((2, 2), dtype=bool)) == 0.0
    with_nan = np.array([[np.nan, 1.0], [1.0, 0.0]])
    assert cam_energy_inside(with_nan, np.array([[True, True], [False, False]])) == pytest.approx(0.5)
    assert cam_energy_inside(np.zeros((2, 2)), np.ones((2, 2), dtype=bool)) is None
    with pytest.raises(ValueError):
        cam_energy_inside(cam, np.ones((3, 3), dtype=bool))


def test_overlay_colours_only_where_the_map_is_hot() -> None:
    grey = np.full((8, 8), 0.5, dtype=np.float32)
    plain = overlay_image(grey, None)
    assert plain.shape == (8, 8, 3) and plain.dtype == np.uint8
    assert (plain == 128).all()
    cam = np.zeros((4, 4), dtype=np.float32)
    cam[:2, :2] = 1.0  # lower resolution than the slice: resized bilinearly
    out = overlay_image(grey, cam)
    assert out.shape == (8, 8, 3)
    assert (out[6:, 6:] == 128).all()  # cold corner untouched
    hot = out[0, 0].astype(int)
    assert hot[0] > hot[2] and not (hot == 128).all()  # jet red blended in


def test_overlay_pixels_match_the_blend_computed_by_hand() -> None:
    """Every grey level against map values across the colour floor: each pixel is round(0.6 grey + 0.4 jet), jet
    taken at the map's 8-bit level, and a map at or below 0.05 leaves the grey untouched. The built-in jet table is
    matplotlib's to within one level (the two round some exact halves differently)."""
    import matplotlib

    from lungsight.explain.overlay import _colour_table

    table = _colour_table("jet").astype(np.float64)
    reference = np.round(matplotlib.colormaps["jet"](np.arange(256) / 255.0)[:, :3] * 255)
    assert np.abs(table - reference).max() <= 1
    grey = np.repeat(np.arange(256, dtype=np.float32)[:, None] / 255.0, 9, axis=1)
    cam = np.tile(np.array([0.0, 0.03, 0.05, 0.0501, 0.2, 0.5, 0.77, 0.999, 1.0], np.float32), (256, 1))
    out = overlay_image(grey, cam, alpha=0.4)
    g = np.floor(grey.astype(np.float64) * 255 + 0.5)
    level = np.floor(cam.astype(np.float64) * 255 + 0.5)
    jet = table[level.astype(int)]
    expected = np.where((cam > 0.05)[..., None], np.floor(g[..., None] * 0.6 + jet * 0.4 + 0.5), g[..., None])
    np.testing.assert_array_equal(out, expected.astype(np.uint8))


def test_overlay_reads_nan_as_zero_and_clips_out_of_range_values() -> None:
    dirty = np.array([[np.nan, np.inf, -np.inf, 2.0, -1.0, 0.5]], np.float32)
    clean = np.array([[0.0, 1.0, 0.0, 1.0, 0.0, 0.5]], np.float32)
    np.testing.assert_array_equal(overlay_image(dirty, dirty[:, ::-1]), overlay_image(clean, clean[:, ::-1]))


def test_overlay_mask_outline_is_a_thin_contour() -> None:
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    out = overlay_image(np.zeros((16, 16)), None, mask_outline=mask)
    drawn = (out == OUTLINE_RGB).all(axis=2)
    assert drawn[4, 4:12].all() and drawn[11, 4:12].all() and drawn[4:12, 4].all()
    assert not drawn[5:11, 5:11].any() and not drawn[~mask].any()


def test_save_overlay_layout_atomic_and_fast(tmp_path) -> None:
    rng = np.random.default_rng(0)
    slice01 = rng.random((64, 48), dtype=np.float32)
    path = save_overlay(slice01, rng.random((8, 6)), tmp_path / "a" / "b" / "slice.png")
    with Image.open(path) as im:
        assert im.size == (2 * 48 + PANEL_GAP, 64) and im.mode == "RGB"
    captioned = save_overlay(slice01, None, tmp_path / "c.png", caption="slice 0003 · p = 0.91")
    with Image.open(captioned) as im:
        assert im.size[0] == 2 * 48 + PANEL_GAP and im.size[1] > 64
    assert sorted(p.name for p in tmp_path.rglob("*.png")) == ["c.png", "slice.png"]

    big = rng.random((512, 512), dtype=np.float32)
    cam = rng.random((16, 16), dtype=np.float32)
    save_overlay(big, cam, tmp_path / "big.png", caption="warm-up")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        save_overlay(big, cam, tmp_path / "big.png", caption="slice 0100 · p = 0.97")
        times.append(time.perf_counter() - t0)
    assert min(times) < 0.25  # about 40 ms on an idle core; generous because CI cores are shared


def test_linear_head_shortcut_gives_grad_cams_maps_without_a_backward() -> None:
    """Where the logits are a linear layer on the mean of the target's output, the maps come from the forward pass
    alone after the first batch has shown them equal to Grad-CAM's."""
    torch.manual_seed(5)
    model = TinyCNN(inplace=False).eval()
    backward: list[str] = []
    model.fc.register_full_backward_hook(lambda *_: backward.append("fc"))
    batches = [torch.rand(3, 1, 20, 20) for _ in range(3)]
    with GradCAM(model, model.relu2, model.fc) as fast, GradCAM(model, model.relu2) as full:
        assert fast.shortcut is None and full.shortcut is False
        for k, x in enumerate(batches):
            classes = [2, 0, 1]
            want_logits, want = full.logits_and_maps(x, classes)
            backward.clear()
            got_logits, got = fast.logits_and_maps(x, classes)
            assert backward == ([] if k else ["fc"])  # the first batch is Grad-CAM's, the others need no backward
            assert fast.shortcut is True
            torch.testing.assert_close(got_logits, want_logits)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        assert fast(batches[0], 1).shape == (3, 20, 20)


@pytest.mark.parametrize("where", ["before the relu", "head of other width"])
def test_linear_head_shortcut_refused_where_it_would_differ(where: str) -> None:
    """A ReLU between the target and the pooling (or a head that does not fit the target) keeps Grad-CAM."""
    torch.manual_seed(6)
    model = TinyCNN(inplace=False).eval()
    head = model.fc if where == "before the relu" else nn.Linear(5, 3)
    x = torch.rand(2, 1, 20, 20) - 0.5
    with GradCAM(model, model.target, head) as checked, GradCAM(model, model.target) as full:
        for _ in range(2):
            np.testing.assert_allclose(checked(x, 0), full(x, 0), atol=1e-7)
        assert checked.shortcut is False
