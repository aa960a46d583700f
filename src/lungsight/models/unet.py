"""The lung U-Net: MONAI's ``UNet`` (residual units, instance norm) or an Xception-encoder U-Net, its input, its
checkpoints and its segmenter.

Two encoders (``encoder`` in the configuration):

* ``monai`` (default): MONAI's ``UNet`` with ``channels``/``strides``/``num_res_units``;
* ``xception``: paper 003's U-Net - a timm Xception (``xception_name``, default ``xception41``) as encoder
  (``features_only``, five feature maps at strides 2..32, randomly initialised: no download) and a small decoder that
  upsamples, concatenates the encoder's feature map of that stride and applies two 3x3 convolutions (batch norm,
  ReLU) per stage (:class:`XceptionUNet`).

The network and its input are defined once here and used by training (:mod:`lungsight.train.segmentation`) and by
:class:`UNetSegmenter`, so a model is served on exactly the inputs it was trained on:

* input: the image resized to ``input_size`` squared (aspect ratio not kept, as in the lung U-Nets paper 004
  used); ``preprocess: "equalise"`` (X-rays) histogram-equalises it (sources differ wildly in contrast),
  ``preprocess: "window"`` (CT slices) keeps the lung-window grey levels (HU mean the same in every scan); then
  ``(x - 0.5) / 0.29``: an equalised image is uniform on [0, 1], whose mean is 0.5 and standard deviation 0.29;
* output: one logit per pixel; sigmoid >= ``threshold`` is lung; the two largest components are kept and their
  holes filled; the mask is resized back to the image.

A checkpoint is a ``.safetensors`` file with the configuration in its header (``task: "lung-segmentation"``, or
``"infection-segmentation"`` for a CT infection model, :mod:`lungsight.inference.infection`), written by
:func:`save_lung_unet` (:func:`lungsight.models.weights.save_checkpoint`). Files written before the ``encoder`` and
``preprocess`` keys existed are MONAI X-ray models and load as such.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
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
TASKS = (TASK, "infection-segmentation")
ENCODERS = ("monai", "xception")
PREPROCESS = ("equalise", "window")
UNIFORM_MEAN, UNIFORM_STD = 0.5, 0.29  # mean and standard deviation of the uniform distribution on [0, 1]
DEFAULT_CONFIG: dict[str, Any] = {
    "task": TASK,
    "arch": "monai-unet",
    "encoder": "monai",
    "xception_name": "xception41",
    "decoder_channels": [256, 128, 64, 32, 16],
    "preprocess": "equalise",
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


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class XceptionUNet(nn.Module):
    """U-Net with a timm Xception encoder (paper 003): one grey channel in, one logit per pixel out.

    The decoder walks the encoder's feature maps from the deepest (stride 32) up: upsample to the next map's size,
    concatenate it (the skip connection), two 3x3 convolutions; a last stage at stride 1 and a 1x1 convolution give
    the logit map at the input size. Sizes are matched by interpolation, so encoders whose maps are not exact halves
    (``legacy_xception``) work too.
    """

    def __init__(self, xception_name: str, decoder_channels: list[int]) -> None:
        super().__init__()
        self.encoder = timm.create_model(xception_name, features_only=True, pretrained=False, in_chans=1)
        skips = self.encoder.feature_info.channels()[::-1]  # deepest first
        if len(decoder_channels) != len(skips):
            raise ValueError(f"decoder_channels needs {len(skips)} entries for {xception_name}")
        stages, c_in = [], skips[0]
        for skip, c_out in zip([*skips[1:], 0], decoder_channels, strict=True):
            stages.append(_conv_block(c_in + skip, c_out))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.head = nn.Conv2d(c_in, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)[::-1]
        y = feats[0]
        for stage, skip in zip(self.stages, [*feats[1:], None], strict=True):
            size = x.shape[-2:] if skip is None else skip.shape[-2:]
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            y = stage(y if skip is None else torch.cat([y, skip], dim=1))
        return self.head(y)


def build_lung_unet(config: dict[str, Any]) -> nn.Module:
    """A 2-D one-channel-in, one-logit-out U-Net as the configuration describes (MONAI or Xception encoder)."""
    encoder = config.get("encoder", "monai")
    if encoder == "xception":
        return XceptionUNet(str(config["xception_name"]), list(config["decoder_channels"]))
    if encoder != "monai":
        raise ValueError(f"unknown U-Net encoder {encoder!r}; choose one of {', '.join(ENCODERS)}")
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=tuple(config["channels"]),
        strides=tuple(config["strides"]),
        num_res_units=int(config["num_res_units"]),
        dropout=float(config["dropout"]),
    )


def unet_image(image01: np.ndarray, size: int, preprocess: str = "equalise") -> np.ndarray:
    """``(H, W)`` image in [0, 1] -> ``(size, size)`` float32 in [0, 1], resized and (``"equalise"``, X-rays)
    histogram-equalised or (``"window"``, lung-windowed CT slices) left as it is."""
    if preprocess not in PREPROCESS:
        raise ValueError(f"unknown U-Net preprocessing {preprocess!r}; choose one of {', '.join(PREPROCESS)}")
    small = to_work(image01, size)
    return equalise(small) if preprocess == "equalise" else small


def normalise(x01: torch.Tensor) -> torch.Tensor:
    """Equalised image(s) in [0, 1] -> the network's input scale."""
    return (x01 - UNIFORM_MEAN) / UNIFORM_STD


def save_lung_unet(model: nn.Module, config: dict[str, Any], path: Path) -> Path:
    """Write the model and its configuration atomically as one ``.safetensors`` file."""
    return save_checkpoint(model, config, path)


def load_lung_unet(path: Path, task: str = TASK) -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, configuration) from a file written by :func:`save_lung_unet` for ``task``."""
    state, config = read_checkpoint(Path(path))
    if config.get("task") != task:
        raise ModelError(f"{path}: not a {task.replace('-', ' ')} model (task {config.get('task')!r})")
    config = {**DEFAULT_CONFIG, **config}
    try:
        model = build_lung_unet(config)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"{path}: cannot build the configured U-Net ({exc})") from None
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
        self.preprocess = str(config.get("preprocess", "equalise"))

    @classmethod
    def from_file(cls, path: Path, name: str | None = None) -> UNetSegmenter:
        """The segmenter of a lung U-Net file, named ``name`` (a bundled model's name) or ``unet:FILE``."""
        model, config = load_lung_unet(path)
        return cls(model, config, name=name or f"unet:{Path(path).name}")

    @torch.no_grad()
    def probabilities(self, image01: np.ndarray) -> np.ndarray:
        """Per-pixel lung probability at the network's input size, ``(size, size)`` float32."""
        x = normalise(torch.from_numpy(unet_image(image01, self.size, self.preprocess)))[None, None]
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
