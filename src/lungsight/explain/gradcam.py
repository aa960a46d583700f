"""Grad-CAM (Selvaraju et al. 2017): where in the image the evidence for a class lies.

This is the one place where lungsight hooks a network to read gradients (the only other hook, in
:mod:`lungsight.evaluate.embedding`, reads a layer's features for the embedding plots). The map of a class
c on a target layer with activations A_k is ReLU(sum_k w_k A_k), where w_k is the spatial mean of
d logit_c / d A_k. Maps are upsampled to the input size and normalised per image by their maximum.

When the logits are a linear layer on the spatial mean of A (global average pooling, then ``Linear``), that gradient
is the layer's weight W_ck / (h w) at every position, so Grad-CAM is the class activation map of Zhou et al. (2016)
and needs no backward pass. Given that layer, :class:`GradCAM` checks the equality on its first batch and then
computes the maps from the forward pass alone (the "linear-head shortcut").
"""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


class GradCAM:
    """Grad-CAM on one layer of a classifier whose forward returns logits of shape (N, C).

    During a call the forward hook cuts the graph at the target layer: the layer's output is replaced by a leaf
    that requires grad, so the backward pass runs only through the layers after it (often a few percent of the
    network) and works whether or not the parameters require grad. Use as a context manager, or call
    :meth:`close` to remove the hook.
    """

    def __init__(self, model: nn.Module, target_layer: nn.Module, linear_head: nn.Linear | None = None) -> None:
        self.model = model
        self.target_layer = target_layer
        # The shortcut: None until the first batch has compared it with Grad-CAM, then whether it held there.
        self.linear_head = linear_head
        self.shortcut: bool | None = None if linear_head is not None else False
        self._capturing = False
        self._activation: Tensor | None = None
        self._handle: RemovableHandle | None = target_layer.register_forward_hook(self._forward_hook)

    def _forward_hook(self, module: nn.Module, inputs: tuple[object, ...], output: object) -> Tensor | None:
        if not self._capturing or not isinstance(output, Tensor) or not output.is_floating_point():
            return None
        if self.shortcut:
            # No gradient: the output as it is. An in-place op after the layer would change it, but then the first
            # batch's check failed (its logits differ from the head's on the stored output): not reached.
            self._activation = output
            return None
        # A layer that runs more than once per forward pass: the last call is the one explained.
        self._activation = output.detach().requires_grad_(True)
        torch.set_grad_enabled(True)
        # The network goes on from a copy, so that a following in-place op (ReLU(inplace=True)) can neither
        # overwrite the stored activation nor act in place on a leaf.
        return self._activation.clone()

    def __call__(self, x: Tensor, class_idx: int | Sequence[int]) -> np.ndarray:
        """Grad-CAM maps for images ``x`` (N, C, H, W): float32 array (N, H, W) with values in [0, 1].

        ``class_idx`` is one class for the whole batch or one class per image.
        """
        _, raw = self.logits_and_maps(x, class_idx)
        return finish_maps(raw, tuple(x.shape[-2:]))

    def logits_and_maps(self, x: Tensor, class_idx: int | Sequence[int]) -> tuple[Tensor, Tensor]:
        """One forward pass that classifies and explains: the logits (N, C), detached, and the raw maps
        ReLU(sum_k w_k A_k) at the target layer's resolution (N, h, w), before upsampling and normalisation.

        A predictor can so classify a whole series and keep the raw maps (a few hundred bytes a slice), then
        finish only the ones it shows with :func:`finish_maps`, with no second pass through the network. The
        maps do not depend on the batch (in eval mode every image is its own computation).
        """
        if self._handle is None:
            raise RuntimeError("GradCAM has been closed")
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        n = x.shape[0]
        idx = [int(class_idx)] * n if isinstance(class_idx, int) else [int(c) for c in class_idx]
        if len(idx) != n:
            raise ValueError(f"{len(idx)} class indices for a batch of {n} images")
        if self.shortcut:
            return self._linear_head_maps(x, idx)
        if torch.is_inference_mode_enabled():
            raise RuntimeError("Grad-CAM needs gradients: call it outside torch.inference_mode()")

        self._activation = None
        self._capturing = True
        try:
            # No graph for the layers before the target: the hook switches gradients on from its leaf onwards,
            # and leaving no_grad() restores the caller's mode.
            with torch.no_grad():
                logits = self.model(x.detach())
            if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
                raise ValueError("the model must return logits of shape (N, C)")
            activation = self._activation
            if activation is None:
                raise RuntimeError("the target layer was not reached, or its output is not a float tensor")
            rows = torch.arange(n, device=logits.device)
            cols = torch.tensor(idx, device=logits.device)
            with torch.enable_grad():
                score = logits[rows, cols].sum()
                # Differentiate with respect to the target activation only: parameters' .grad stay untouched.
                (gradient,) = torch.autograd.grad(score, activation, allow_unused=True)
        finally:
            self._capturing = False
            self._activation = None
        if gradient is None:  # the logits do not depend on the target layer
            gradient = torch.zeros_like(activation)
        activation = activation.detach()
        if activation.ndim != 4:
            raise ValueError(f"target layer output must be (N, K, h, w), got shape {tuple(activation.shape)}")
        raw = _weighted_maps(gradient.float().mean(dim=(2, 3)), activation)
        if self.shortcut is None:
            self.shortcut = self._shortcut_holds(logits.detach(), activation, cols, raw)
        return logits.detach(), raw

    def _linear_maps(self, activation: Tensor, cols: Tensor) -> Tensor | None:
        """ReLU(sum_k W_ck / (h w) A_k) for each image's class c, or None if the head cannot take ``activation``."""
        head = self.linear_head
        if head is None or activation.ndim != 4 or head.weight.shape[1] != activation.shape[1]:
            return None
        h, w = activation.shape[-2:]
        return _weighted_maps(head.weight.detach()[cols].float() / (h * w), activation)

    def _shortcut_holds(self, logits: Tensor, activation: Tensor, cols: Tensor, raw: Tensor) -> bool:
        """Whether the linear head reproduces this batch's logits from the mean of ``activation`` and its maps equal
        Grad-CAM's (to float rounding): then the layers after the target are the pooling and that head."""
        maps = self._linear_maps(activation, cols)
        if maps is None or self.linear_head is None or logits.shape[1] != self.linear_head.out_features:
            return False
        with torch.no_grad():
            again = self.linear_head(activation.float().mean(dim=(2, 3))).to(logits.device)
        scale = float(raw.abs().amax()) if raw.numel() else 0.0
        return bool(
            torch.allclose(again, logits.float(), rtol=1e-4, atol=1e-4)
            and torch.allclose(maps, raw, rtol=1e-4, atol=1e-5 * max(scale, 1e-12))
        )

    def _linear_head_maps(self, x: Tensor, idx: list[int]) -> tuple[Tensor, Tensor]:
        """The shortcut: one forward pass without gradients, the maps from the target's output and the head."""
        self._activation = None
        self._capturing = True
        try:
            with torch.inference_mode():
                logits = self.model(x)
                activation = self._activation
                maps = None if activation is None else self._linear_maps(activation, torch.tensor(idx))
        finally:
            self._capturing = False
            self._activation = None
        if maps is None:
            raise RuntimeError("the target layer's output no longer fits the linear head")
        return logits, maps

    def close(self) -> None:
        """Remove the hooks from the target layer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _weighted_maps(weights: Tensor, activation: Tensor) -> Tensor:
    """ReLU(sum_k w_nk A_nk) for each image n: weights (N, K), activations (N, K, h, w) -> raw maps (N, h, w)."""
    return F.relu((weights[:, :, None, None] * activation.float()).sum(dim=1))


def finish_maps(raw: Tensor, size: tuple[int, int]) -> np.ndarray:
    """Raw maps (N, h, w) from :meth:`GradCAM.logits_and_maps` -> float32 maps (N, H, W) in [0, 1]: upsampled
    bilinearly to ``size`` and divided by each map's maximum (an all-zero map stays zero)."""
    cam = F.interpolate(raw[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / peak.clamp_min(torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))
    return cam.clamp_(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)


def cam_energy_inside(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of a map's total energy (sum of its values) that lies inside a boolean mask of the same shape.

    Used as the "evidence-in-lung" share. Returns ``None`` when the map has no energy (all zero).
    """
    cam = np.asarray(cam, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if cam.shape != mask.shape:
        raise ValueError(f"map shape {cam.shape} does not match mask shape {mask.shape}")
    values = np.clip(np.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0), 0.0, None)
    total = float(values.sum())
    if total <= 0.0:
        return None
    return float(values[mask].sum() / total)
