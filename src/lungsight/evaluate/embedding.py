"""Embedding pictures (paper 004, Figs. 5 and 6): the features of the layer feeding a network's final classifier,
projected to two dimensions with t-SNE and coloured by class or by source dataset.

Well-separated class clusters say the network learned something class-specific; tight clusters by source dataset say
it may also have learned where an image came from (a shortcut), which is why both colourings are drawn.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from sklearn.manifold import TSNE
from threadpoolctl import threadpool_limits
from torch import nn

from lungsight.evaluate.plots import plot_embedding

__all__ = ["penultimate_features", "plot_embedding", "tsne_2d"]

#: Upper end of the usual t-SNE perplexity range (5–50); scikit-learn's default.
MAX_PERPLEXITY = 30.0


def tsne_2d(features: ArrayLike, seed: int = 0, perplexity: float | None = None) -> np.ndarray:
    """Project ``features`` (n × d) to (n × 2) with scikit-learn's t-SNE (PCA initialisation, Barnes-Hut).

    The perplexity defaults to 30 and is clipped to (n − 1) / 3, the largest the original Barnes-Hut code
    accepts, so small sets work. The same ``seed`` on the same data gives the same picture. The gradient loop runs
    on one OpenMP thread: its threads busy-wait, and on a machine whose cores are shared that made a 120-point
    embedding take 20 s instead of 0.3 s.
    """
    x = np.asarray(features, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (n × d), got shape {x.shape}")
    n = x.shape[0]
    if n < 4:
        raise ValueError(f"t-SNE needs at least 4 rows, got {n}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    wanted = MAX_PERPLEXITY if perplexity is None else float(perplexity)
    if wanted <= 0:
        raise ValueError(f"perplexity must be positive, got {perplexity}")
    tsne = TSNE(
        n_components=2,
        perplexity=min(wanted, (n - 1) / 3),
        init="pca",
        learning_rate="auto",
        random_state=seed,
        n_jobs=1,
    )
    with threadpool_limits(limits=1, user_api="openmp"):
        return tsne.fit_transform(x).astype(np.float64)


def _feature_module(model: nn.Module) -> nn.Module | None:
    """``model.feature_layer`` as a module (it may be given as a submodule path), or ``None``."""
    layer = getattr(model, "feature_layer", None)
    if layer is None:
        return None
    if isinstance(layer, str):
        return model.get_submodule(layer)
    if isinstance(layer, nn.Module):
        return layer
    raise ValueError(f"model.feature_layer must be a module or a submodule path, got {type(layer).__name__}")


def _batch_tensor(batch: Any) -> torch.Tensor:
    if isinstance(batch, tuple | list):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise ValueError(f"batches must be tensors or (tensor, ...) tuples, got {type(batch).__name__}")
    return batch


def penultimate_features(model: nn.Module, batches: Iterable[Any]) -> np.ndarray:
    """The features feeding the model's final classifier layer, one row per image: (n images, d) float32.

    By default these are the input of the last ``nn.Linear`` the forward pass runs (e.g. the pooled features
    entering ``fc`` in a ResNet, the 1024-wide hidden layer before a MobileNetV3's last Linear, the concatenated
    per-scale outputs in the FPN classifier). A model with a ``feature_layer`` attribute (a module or a submodule
    path) gives the *output* of that module instead, for networks whose classifier is not a Linear. Each batch is a
    tensor or a ``(tensor, ...)`` tuple as a DataLoader yields; it is moved to the model's device. The model runs in
    eval mode (dropout off) without gradients and is put back in the mode it was in.
    """
    target = _feature_module(model)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)] if target is None else []
    if target is None and not linears:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer: set model.feature_layer to the module whose output "
            "feeds the classifier"
        )
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    captured: list[torch.Tensor] = []

    def keep_input(_module: nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])

    def keep_output(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"model.feature_layer returns {type(output).__name__}, not a tensor")
        captured.append(output)

    if target is not None:
        handles = [target.register_forward_hook(keep_output)]
    else:
        handles = [m.register_forward_pre_hook(keep_input) for m in linears]
    was_training = model.training
    model.eval()
    rows: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for batch in batches:
                x = _batch_tensor(batch).to(device)
                captured.clear()
                model(x)
                if not captured:
                    raise ValueError(f"{type(model).__name__}: the forward pass never reached the feature layer")
                feats = captured[-1]
                rows.append(feats.reshape(x.shape[0], -1).float().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not rows:
        raise ValueError("no batches: nothing to embed")
    return np.concatenate(rows, axis=0)
