"""``view-cnn``: a small single-channel CNN that tells a frontal chest X-ray from a lateral one and from a CT slice.

It guards the X-ray model's input (paper 004 classifies frontal views only) and routes a lone PNG/JPEG to the CT
or the X-ray path. The task is coarse (the outline of the body, the spine's position, the round field of a CT),
so five 3x3 convolution blocks at 128 px suffice: about 0.25 million parameters, 1 MB of float32 weights. The
bundled instance is ``xr-view`` (``lungsight/pretrained/xr-view.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from lungsight.models.architectures import CamMixin
from lungsight.models.registry import GREY_MEAN, GREY_STD, ModelSpec, register

#: The classes of ``view-cnn``, in output order.
VIEW_CLASSES: tuple[str, ...] = ("frontal", "lateral", "ct")


def _block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
    )


class ViewCNN(CamMixin, nn.Module):
    """Conv blocks 16-32-64-128-128 (strided stem, max-pooling after each of the first three) -> global average
    pool -> dropout -> linear. At 128 px the last two blocks work on 8 x 8 positions, whose receptive fields cover
    most of the image: the outline of the body is what tells the views apart. About 25 million multiply-adds per
    image, so it trains on one CPU thread in minutes."""

    def __init__(self, num_classes: int = len(VIEW_CLASSES), in_chans: int = 1, dropout: float = 0.3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _block(in_chans, 16, stride=2),
            nn.MaxPool2d(2),
            _block(16, 32),
            nn.MaxPool2d(2),
            _block(32, 64),
            nn.MaxPool2d(2),
            _block(64, 128),
            _block(128, 128),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(128, num_classes)
        )
        self.cam_path = "features.7"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _build(num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: object) -> nn.Module:
    if imagenet or weights_file is not None:
        raise ValueError("view-cnn has no pretrained backbone; train it from scratch (lungsight train-view)")
    return ViewCNN(num_classes, in_chans)


register(
    ModelSpec(
        "view-cnn",
        "small CNN, single-channel: frontal vs lateral chest X-ray vs CT slice (xr-view's architecture)",
        "ours",
        128,
        in_chans=1,
        mean=GREY_MEAN,
        std=GREY_STD,
        defaults={"optimizer": "adamw", "lr": 2e-3, "batch_size": 32, "epochs": 30, "augment": "light"},
    ),
    _build,
)
