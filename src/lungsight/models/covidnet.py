"""``covidnet``: the COVID-Net-style network of paper 004, sized for CPU training from scratch.

COVID-Net (Wang et al. 2020) stacks PEPX modules - 1x1 *projection* to half the channels, 1x1 *expansion*,
3x3 *depth-wise* convolution, 1x1 *projection*, 1x1 *extension* to the output channels - in four stages (3, 4, 6
and 3 modules) whose modules are densely connected: each takes the sum of the stage input and of every earlier
module's output. Paper 004 kept that body and fed the flattened features to three dense layers, the first two with
ReLU and dropout 0.3, trained with weighted cross-entropy (Adam 2e-5, halved on a 3-epoch plateau).

Ours differs, and says so in the model card and ``lungsight models list``:

* widths ``base * (1, 2, 4, 8)`` with ``base`` = 32 by default (COVID-Net "small" uses 256 ... 2048; at that width
  the first dense layer alone holds 100 M weights, which neither trains from scratch on a few hundred images nor fits
  the 50 MB budget of a bundled model);
* batch normalisation and ReLU after each PEPX module (training from scratch without ImageNet weights, which the
  original relied on, is unstable otherwise);
* the last feature map is average-pooled to 4x4 before it is flattened, so the dense head has the same size at any
  input resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lungsight.models.architectures import CamMixin

STAGE_DEPTHS = (3, 4, 6, 3)


class PEPX(nn.Module):
    """Projection - expansion - depth-wise - projection - extension, then batch norm and ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        half, three_quarters = max(1, c_in // 2), max(1, 3 * c_in // 4)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, half, 1, bias=False),
            nn.Conv2d(half, three_quarters, 1, bias=False),
            nn.Conv2d(three_quarters, three_quarters, 3, padding=1, groups=three_quarters, bias=False),
            nn.Conv2d(three_quarters, half, 1, bias=False),
            nn.Conv2d(half, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PEPXStage(nn.Module):
    """``depth`` densely connected PEPX modules: module k reads the sum of the stage input and modules 1..k-1.

    The stage input is first brought to ``c_out`` channels (a 1x1 convolution, as in COVID-Net's large variant) and,
    except for the first stage, halved in resolution by max pooling. The output is the sum of all module outputs.
    """

    def __init__(self, c_in: int, c_out: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.downsample = downsample
        self.shortcut = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.first = PEPX(c_in, c_out)
        self.rest = nn.ModuleList(PEPX(c_out, c_out) for _ in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = F.max_pool2d(x, 2)
        total = self.shortcut(x) + self.first(x)
        for module in self.rest:
            total = total + module(total)
        return total


class CovidNet(CamMixin, nn.Module):
    """Paper 004's COVID-Net variant (see the module docstring for where ours differs)."""

    def __init__(self, num_classes: int = 3, in_chans: int = 1, base: int = 32, dropout: float = 0.3) -> None:
        super().__init__()
        widths = [base * m for m in (1, 2, 4, 8)]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, base, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(base),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        stages, c_in = [], base
        for k, (width, depth) in enumerate(zip(widths, STAGE_DEPTHS, strict=True)):
            stages.append(PEPXStage(c_in, width, depth, downsample=k > 0))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(widths[-1] * 16, 1024),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(1024, 256),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )
        self.cam_path = "stages.3"  # the last stage's summed output (1/32 of the input size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(x))))
