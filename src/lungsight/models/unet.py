"""The lung U-Net: MONAI's ``UNet`` (residual units, instance norm), its input, its checkpoints and its segmenter.

The network and its input are defined once here and used by training (:mod:`lungsight.train.segmentation`) and by
:class:`UNetSegmenter`, so a model is served on exactly the inputs it was trained on:

* input: the X-ray resized to ``input_size`` squared (aspect ratio not kept, as in the lung U-Nets paper 004
  used), histogram-equalised (sources differ wildly in contrast), then ``(x - 0.5) / 0.29``: an equalised image is
  uniform on [0, 1], whose mean is 0.5 and standard deviation 0.29;
* output: one logit per pixel; sigmoid >= ``threshold`` is lung; the two largest components are kept and their
  holes filled; the mask is resized back to the image.

A checkpoint is a ``.safetensors`` file with the configuration in its header (``task: "lung-segmentation"``), written
by :func:`save_lung_unet` (:func:`lungsight.models.weights.save_checkpoint`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import UNet
from torch import nn

from lungsight.errors import ModelError
from lungsight.models.weights import read_checkpoint, save_checkpoint
from lungsight.preprocess.lung_fields import (
    LungMask,
    equalise,
    keep_largest,
    mask_quality,
    resize_mask,
    template_mask,
    to_work,
)

TASK = "lung-segmentation"
UNIFORM_MEAN, UNIFORM_STD = 0.5, 0.29  # mean and standard deviation of the uniform distribution on [0, 1]
DEFAULT_CONFIG: dict[str, Any] = {
    "task": TASK,
    "arch": "monai-unet",
    "input_size": 256,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "dropout": 0.0,
    "threshold": 0.5,
}


def lung_unet_config(**overrides: Any) -> dict[str, Any]:
    """:data:`DEFAULT_CONFIG` with ``overrides`` (unknown keys are refused)."""
    unknown = set(overrides) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"unknown lung U-Net settings: {', '.join(sorted(unknown))}")
    return {**DEFAULT_CONFIG, **overrides}


def build_lung_unet(config: dict[str, Any]) -> nn.Module:
    """A 2-D one-channel-in, one-logit-out MONAI ``UNet`` as the configuration describes."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(config["channels"]),
        strides=tuple(config["strides"]),
        num_res_units=int(config["num_res_units"]),
        dropout=float(config["dropout"]),
    )


def unet_image(image01: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` X-ray in [0, 1] -> ``(size, size)`` float32, resized and histogram-equalised (still in [0, 1])."""
    return equalise(to_work(image01, size))


def normalise(x01: torch.Tensor) -> torch.Tensor:
    """Equalised image(s) in [0, 1] -> the network's input scale."""
    return (x01 - UNIFORM_MEAN) / UNIFORM_STD


def save_lung_unet(model: nn.Module, config: dict[str, Any], path: Path) -> Path:
    """Write the model and its configuration atomically as one ``.safetensors`` file."""
    return save_checkpoint(model, config, path)


def load_lung_unet(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, configuration) from a file written by :func:`save_lung_unet`."""
    state, config = read_checkpoint(Path(path))
    if config.get("task") != TASK:
        raise ModelError(f"{path}: not a lung segmentation model (task {config.get('task')!r}, expected {TASK!r})")
    model = build_lung_unet(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"{path}: weights do not match the configured U-Net ({str(exc).splitlines()[0]})") from None
    model.eval()
    return model, config


class UNetSegmenter:
    """A trained lung U-Net behind the :class:`~lungsight.preprocess.lung_fields.LungSegmenter` interface."""

    def __init__(self, model: nn.Module, config: dict[str, Any], name: str = "unet") -> None:
        self.model, self.config, self.name = model.eval(), config, name
        self.size = int(config["input_size"])
        self.threshold = float(config["threshold"])

    @classmethod
    def from_file(cls, path: Path) -> UNetSegmenter:
        model, config = load_lung_unet(path)
        return cls(model, config, name=f"unet:{Path(path).name}")

    @torch.no_grad()
    def probabilities(self, image01: np.ndarray) -> np.ndarray:
        """Per-pixel lung probability at the network's input size, ``(size, size)`` float32."""
        x = normalise(torch.from_numpy(unet_image(image01, self.size)))[None, None]
        return torch.sigmoid(self.model(x))[0, 0].numpy()

    def segment_small(self, image01: np.ndarray) -> np.ndarray:
        """The thresholded, two-largest-components mask at the input size (no fallback)."""
        return keep_largest(self.probabilities(image01) >= self.threshold, 2)

    def segment_detail(self, image01: np.ndarray) -> LungMask:
        """The U-Net's mask, or the anatomical template when that mask is implausible."""
        small = self.segment_small(image01)
        quality = mask_quality(small)
        if not quality["ok"]:
            return LungMask(template_mask(image01), "template", quality)
        return LungMask(resize_mask(small, np.shape(image01)), "unet", quality)

    def segment(self, image01: np.ndarray) -> np.ndarray:
        return self.segment_detail(image01).mask
