"""t-SNE embeddings, embedding pictures and penultimate-layer features of timm, torchvision and our own networks."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torchvision.models import mobilenet_v3_small

from lungsight.evaluate.embedding import penultimate_features, plot_embedding, tsne_2d
from lungsight.models import build_model
from test_multiclass import check_png


def _blobs(n_per: int = 30, d: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 8, (3, d))
    labels = np.repeat(np.arange(3), n_per)
    return centres[labels] + rng.normal(0, 1, (labels.size, d)), labels


def test_tsne_shape_determinism_and_separation():
    x, labels = _blobs()
    a = tsne_2d(x, seed=0)
    assert a.shape == (90, 2) and a.dtype == np.float64 and np.isfinite(a).all()
    np.testing.assert_array_equal(tsne_2d(x, seed=0), a)
    # well-separated clusters stay separated: every point's nearest neighbour in 2-D is of its own cluster
    dist = np.linalg.norm(a[:, None] - a[None], axis=2)
    np.fill_diagonal(dist, np.inf)
    assert (labels[dist.argmin(axis=1)] == labels).mean() > 0.95


def test_tsne_small_sets_and_bad_input():
    x, _ = _blobs(n_per=2)  # 6 rows: perplexity clipped to (6 - 1) / 3
    assert tsne_2d(x).shape == (6, 2)
    assert tsne_2d(x, perplexity=50).shape == (6, 2)
    with pytest.raises(ValueError, match="at least 4"):
        tsne_2d(x[:3])
    with pytest.raises(ValueError, match="2-D"):
        tsne_2d(x[0])
    x[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tsne_2d(x)
    with pytest.raises(ValueError, match="perplexity"):
        tsne_2d(np.ones((10, 2)), perplexity=0)


def test_plot_embedding(tmp_path):
    x, labels = _blobs()
    xy = tsne_2d(x)
    names = np.array(["normal", "pneumonia", "covid"])[labels]
    check_png(plot_embedding(xy, names, "by class", tmp_path / "class.png"))
    source = ["cohen" if i % 3 else "actualmed" for i in range(90)]
    out = plot_embedding(xy, source, "by source", tmp_path / "sub" / "source.png", markers=names)
    assert out == tmp_path / "sub" / "source.png"
    check_png(out)
    with pytest.raises(ValueError, match="labels"):
        plot_embedding(xy, source[:5], "x", tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        plot_embedding(x, names, "x", tmp_path / "bad.png")


@pytest.fixture(scope="module")
def images() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.rand(3, 3, 32, 32), torch.rand(2, 3, 32, 32)]


def test_timm_model_gives_the_pooled_features(images):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=3, drop_rate=0.5)
    model.train()
    feats = penultimate_features(model, images)
    assert feats.shape == (5, model.fc.in_features) == (5, 512) and feats.dtype == np.float32
    assert model.training  # mode restored
    with torch.no_grad():
        model.eval()
        want = torch.cat([model.forward_head(model.forward_features(x), pre_logits=True) for x in images])
    np.testing.assert_allclose(feats, want.numpy(), rtol=1e-5, atol=1e-6)
    # (image, label) batches as a DataLoader yields them
    labelled = [(x, torch.zeros(len(x))) for x in images]
    np.testing.assert_allclose(penultimate_features(model, labelled), feats, rtol=1e-5, atol=1e-6)


def test_torchvision_model_uses_the_last_linear(images):
    model = mobilenet_v3_small(num_classes=3)  # classifier: Linear(576, 1024) → Hardswish → Dropout → Linear(1024, 3)
    feats = penultimate_features(model, images)
    assert feats.shape == (5, model.classifier[-1].in_features) == (5, 1024)


def test_registry_model_single_channel():
    model = build_model("resnet18", num_classes=3, input_size=64)
    torch.manual_seed(1)
    feats = penultimate_features(model, [torch.rand(4, 1, 64, 64)])
    assert feats.shape == (4, 512)
    assert np.isfinite(feats).all() and feats.std() > 0


class _ConvHead(nn.Module):
    """A network whose classifier is a 1×1 convolution: no Linear layer at all."""

    def __init__(self, feature_layer: str | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Conv2d(8, 3, 1)
        if feature_layer is not None:
            self.feature_layer = feature_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).flatten(1)


def test_feature_layer_attribute_and_no_linear(images):
    model = _ConvHead("body")
    feats = penultimate_features(model, images)
    assert feats.shape == (5, 8)
    with torch.no_grad():
        np.testing.assert_allclose(feats, model.body(torch.cat(images)).flatten(1).numpy(), rtol=1e-5, atol=1e-6)
    model.feature_layer = model.body  # a module works as well as its path
    np.testing.assert_allclose(penultimate_features(model, images), feats, rtol=1e-6)
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        penultimate_features(_ConvHead(), images)
    with pytest.raises(ValueError, match="no batches"):
        penultimate_features(model, [])
