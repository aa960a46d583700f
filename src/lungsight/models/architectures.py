"""Network definitions that are ours: paper 000's VGG16 head and paper 002's concatenating FPN classifier.

Everything else is built by timm or torchvision in :mod:`lungsight.models.registry`.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg16


class CamMixin:
    """``cam_layer``: the module Grad-CAM hooks, kept as a path so that it is not a second copy in the state dict."""

    cam_path: str

    @property
    def cam_layer(self) -> nn.Module:
        return self.get_submodule(self.cam_path)  # type: ignore[attr-defined]

    @property
    def linear_head(self) -> nn.Linear | None:
        """The final linear layer, where the logits may be that layer on the spatial mean of ``cam_layer``'s output
        (Grad-CAM then needs no backward pass; :class:`lungsight.explain.GradCAM` checks it before relying on it)."""
        return None


class VGG16Head(CamMixin, nn.Module):
    """Paper 000: VGG16 convolutional base + AvgPool 2x2 -> Flatten -> Dense 64 ReLU -> Dropout 0.5 -> Dense.

    The base is frozen when it carries ImageNet weights (the paper trains only the head); trained from scratch it is
    left trainable, since a frozen random base would learn nothing. At 224 px the flattened width is 3*3*512 = 4608.
    """

    def __init__(self, num_classes: int = 2, input_size: int = 224) -> None:
        super().__init__()
        self.features = vgg16(weights=None).features
        side = (input_size // 32) // 2
        if side < 1:
            raise ValueError(f"vgg16-head needs an input of at least 64 px, got {input_size}")
        self.head = nn.Sequential(
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(512 * side * side, 64),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(64, num_classes),
        )
        self.cam_path = "features.29"  # ReLU after the last convolution (14x14 at 224 px)

    def freeze_base(self) -> None:
        for p in self.features.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConcatFPN(nn.Module):
    """Feature pyramid whose top-down merge concatenates (paper 002) instead of adding (the original FPN)."""

    def __init__(self, in_channels: list[int], width: int = 128) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.merge = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for _ in in_channels[:-1]
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        out = [self.lateral[-1](feats[-1])]
        for i in range(len(feats) - 2, -1, -1):
            lat = self.lateral[i](feats[i])
            up = F.interpolate(out[0], size=lat.shape[-2:], mode="nearest")
            out.insert(0, self.merge[i](torch.cat([lat, up], dim=1)))
        return out


class FPNClassifier(CamMixin, nn.Module):
    """Paper 002: ResNet50V2 backbone + concatenating FPN giving five scales; each scale -> global average pool ->
    dropout -> Dense(num_classes, ReLU); the five small heads are concatenated -> Dense -> softmax (in the loss).
    """

    def __init__(
        self,
        backbone: str = "resnetv2_50",
        num_classes: int = 2,
        in_chans: int = 3,
        width: int = 128,
        dropout: float = 0.5,
        pretrained: bool = False,
        weights_file: str | None = None,
    ) -> None:
        super().__init__()
        overlay = {"file": weights_file} if weights_file else None
        self.backbone = timm.create_model(
            backbone,
            features_only=True,
            pretrained=pretrained or bool(weights_file),
            in_chans=in_chans,
            pretrained_cfg_overlay=overlay,
        )
        chans = self.backbone.feature_info.channels()
        self.fpn = ConcatFPN(chans, width)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Dropout(dropout),
                nn.Linear(width, num_classes),
                nn.ReLU(),
            )
            for _ in chans
        )
        self.classifier = nn.Linear(num_classes * len(chans), num_classes)
        self.cam_path = f"fpn.merge.{len(chans) - 2}"  # merged level at stride 16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.fpn(self.backbone(x))
        return self.classifier(torch.cat([h(p) for h, p in zip(self.heads, levels, strict=True)], dim=1))


class TimmClassifier(CamMixin, nn.Module):
    """A timm classification network with the Grad-CAM layer named per architecture."""

    def __init__(
        self,
        arch: str,
        cam_layer: str,
        num_classes: int = 2,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        pretrained: bool = False,
        weights_file: str | None = None,
    ) -> None:
        super().__init__()
        overlay = {"file": weights_file} if weights_file else None
        self.net = timm.create_model(
            arch,
            pretrained=pretrained or bool(weights_file),
            num_classes=num_classes,
            in_chans=in_chans,
            drop_rate=drop_rate,
            pretrained_cfg_overlay=overlay,
        )
        self.cam_path = f"net.{cam_layer}"
        self.get_submodule(self.cam_path)  # fail early on a wrong layer name

    @property
    def linear_head(self) -> nn.Linear | None:
        head, pool = self.net.get_classifier(), getattr(self.net, "global_pool", None)
        averaged = getattr(pool, "pool_type", None) == "avg"
        return head if isinstance(head, nn.Linear) and averaged else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TorchvisionClassifier(CamMixin, nn.Module):
    """A torchvision classification network (for the papers' models timm does not have: AlexNet, GoogLeNet) with
    its last layer replaced for ``num_classes`` and the Grad-CAM layer named per architecture."""

    def __init__(
        self,
        arch: str,
        cam_layer: str,
        num_classes: int = 2,
        pretrained: bool = False,
        weights_file: str | None = None,
    ) -> None:
        super().__init__()
        import torchvision.models as tvm

        extra = {"aux_logits": False, "init_weights": True} if arch == "googlenet" else {}
        if pretrained:
            extra.pop("init_weights", None)
            self.net = tvm.get_model(arch, weights=tvm.get_model_weights(arch).DEFAULT, **extra)
        else:
            self.net = tvm.get_model(arch, weights=None, **extra)
        if weights_file:
            from lungsight.models.weights import load_state_dict

            state = {k: v for k, v in load_state_dict(weights_file).items() if not k.startswith(("aux1.", "aux2."))}
            self.net.load_state_dict(state)
        if arch == "alexnet":
            self.net.classifier[6] = nn.Linear(self.net.classifier[6].in_features, num_classes)
        elif arch == "googlenet":
            self.net.fc = nn.Linear(self.net.fc.in_features, num_classes)
        else:
            raise ValueError(f"no head replacement known for torchvision model {arch!r}")
        self.cam_path = f"net.{cam_layer}"
        self.get_submodule(self.cam_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
