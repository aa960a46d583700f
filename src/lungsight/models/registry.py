"""The model registry: every network lungsight can train or serve, by name, with its input contract.

``build_model(name, pretrained=...)`` returns an ``nn.Module`` whose ``cam_layer`` attribute is the layer Grad-CAM
hooks. ``pretrained`` is ``None`` (train from scratch), ``"imagenet"`` (the real torchvision/timm download, which fails
with a clear message offline) or the path of a local weights file (``.safetensors``, or a ``.pth`` state dict read with
``weights_only=True``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lungsight.errors import ModelError, WeightsUnavailableError
from lungsight.models.architectures import FPNClassifier, TimmClassifier, TorchvisionClassifier, VGG16Head
from lungsight.models.covidnet import CovidNet
from lungsight.models.efficientnet_lite import build_efficientnet_lite0
from lungsight.models.weights import load_state_dict

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GREY_MEAN = (0.5,)
GREY_STD = (0.25,)


@dataclass(frozen=True)
class ModelSpec:
    """What a registered model is and what it expects as input."""

    name: str
    description: str
    paper: str
    input_size: int
    in_chans: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    defaults: dict = field(default_factory=dict)  # the paper's training settings (optimizer, lr, batch size ...)


_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec, builder: Callable[..., nn.Module]) -> None:
    MODELS[spec.name] = spec
    _BUILDERS[spec.name] = builder


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; registered: {', '.join(sorted(MODELS))}") from None


def _offline_error(name: str, exc: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"could not obtain ImageNet weights for {name!r} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}). "
        "This machine may be offline: pass a local weights file with --weights FILE, "
        "or train from scratch with --pretrained none"
    )


def build_model(
    name: str, num_classes: int = 2, *, pretrained: str | Path | None = None, input_size: int | None = None
) -> nn.Module:
    """Instantiate a registered model (see module docstring for ``pretrained``)."""
    spec = get_spec(name)
    size = input_size or spec.input_size
    imagenet = pretrained == "imagenet"
    weights_file = None if pretrained in (None, "imagenet") else Path(pretrained)
    if weights_file is not None and not weights_file.is_file():
        raise ModelError(f"{weights_file}: weights file not found")
    try:
        return _BUILDERS[name](
            num_classes=num_classes,
            input_size=size,
            in_chans=spec.in_chans,
            imagenet=imagenet,
            weights_file=weights_file,
        )
    except (ModelError, ValueError):
        raise
    except Exception as exc:  # timm/torchvision raise many network and hub error types
        if imagenet:
            raise _offline_error(name, exc) from exc
        if weights_file is not None:
            raise ModelError(f"{weights_file}: cannot load as {name!r} weights ({type(exc).__name__}: {exc})") from exc
        raise


def _timm(arch: str, cam_layer: str, drop_rate: float = 0.0) -> Callable[..., nn.Module]:
    def build(num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: Path | None):
        return TimmClassifier(
            arch,
            cam_layer,
            num_classes,
            in_chans,
            drop_rate,
            pretrained=imagenet,
            weights_file=str(weights_file) if weights_file else None,
        )

    return build


def _torchvision(arch: str, cam_layer: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: Path | None):
        return TorchvisionClassifier(
            arch, cam_layer, num_classes, pretrained=imagenet, weights_file=str(weights_file) if weights_file else None
        )

    return build


def _vgg16_head(num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: Path | None):
    model = VGG16Head(num_classes, input_size)
    if imagenet:
        from torchvision.models import VGG16_Weights

        state = VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    elif weights_file is not None:
        state = load_state_dict(weights_file)
    else:
        return model
    base = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not base:
        raise ModelError(f"{weights_file}: no 'features.*' VGG16 convolutional weights in this file")
    model.features.load_state_dict(base)
    model.freeze_base()
    return model


def _fpn(num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: Path | None):
    return FPNClassifier(
        "resnetv2_50",
        num_classes,
        in_chans,
        pretrained=imagenet,
        weights_file=str(weights_file) if weights_file else None,
    )


def _covidnet(num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: Path | None):
    if imagenet:
        raise ModelError(
            "covidnet has no ImageNet weights (paper 004 trained it on X-rays); train from scratch with "
            "--pretrained none or pass a trained covidnet file with --weights FILE"
        )
    model = CovidNet(num_classes, in_chans)
    if weights_file is not None:
        model.load_state_dict(load_state_dict(weights_file))
    return model


_PAPER_004 = {
    "optimizer": "adam",
    "lr": 2e-5,
    "batch_size": 32,
    "epochs": 24,
    "augment": "paper004",
    "scheduler": "plateau",
    "pretrained": None,
}
_PAPER_002 = {"optimizer": "nadam", "lr": 1e-4, "batch_size": 14, "epochs": 50, "augment": "paper002"}
_PAPER_001 = {"optimizer": "sgd", "lr": 1e-3, "batch_size": 16, "epochs": 30, "augment": "paper002"}
_PAPER_000 = {"optimizer": "adam", "lr": 1e-3, "batch_size": 16, "epochs": 30, "augment": "paper002"}
_CPU = {"optimizer": "adamw", "lr": 1e-3, "batch_size": 32, "epochs": 30, "augment": "light"}
_FINE_TUNE = {
    "optimizer": "adamw",
    "lr": 3e-4,
    "batch_size": 32,
    "epochs": 10,
    "augment": "light",
    "scheduler": "onecycle",
}

register(
    ModelSpec(
        "vgg16-head",
        "VGG16 conv base (frozen with ImageNet weights) + AvgPool2x2/Dense64/Dropout0.5",
        "000",
        224,
        defaults=_PAPER_000,
    ),
    _vgg16_head,
)
register(
    ModelSpec("resnet50", "ResNet50, dropout 0.5 after the pooled features", "001", 299, defaults=_PAPER_001),
    _timm("resnet50", "layer4", drop_rate=0.5),
)
register(
    ModelSpec(
        "resnet50v2-fpn",
        "ResNet50V2 + concatenating FPN, five per-scale heads",
        "002",
        512,
        defaults=_PAPER_002,
    ),
    _fpn,
)
register(
    ModelSpec("resnet50v2", "ResNet50V2 (pre-activation) baseline", "002", 512, defaults=_PAPER_002),
    _timm("resnetv2_50", "norm"),
)
register(
    ModelSpec("xception", "Xception baseline", "002", 299, defaults=_PAPER_002),
    _timm("legacy_xception", "act4"),
)
register(ModelSpec("vgg19", "VGG19 comparison model", "000", 224, defaults=_PAPER_000), _timm("vgg19", "features"))
register(
    ModelSpec("inception-v3", "InceptionV3 comparison model", "000", 299, defaults=_PAPER_000),
    _timm("inception_v3", "Mixed_7c"),
)
register(
    ModelSpec("alexnet", "AlexNet comparison model (torchvision)", "000", 224, defaults=_PAPER_000),
    _torchvision("alexnet", "features.11"),
)
register(
    ModelSpec("googlenet", "GoogLeNet (Inception v1) comparison model (torchvision)", "001", 224, defaults=_PAPER_001),
    _torchvision("googlenet", "inception5b"),
)
register(
    ModelSpec("densenet121", "DenseNet121 comparison model", "SPEC", 224, defaults=_PAPER_000),
    _timm("densenet121", "features"),
)
register(
    ModelSpec(
        "resnet18",
        "ResNet18, single-channel input: ct-default's architecture until 2026-12-01 (docs/model-selection.md)",
        "ours",
        112,
        in_chans=1,
        mean=GREY_MEAN,
        std=GREY_STD,
        defaults=_CPU,
    ),
    _timm("resnet18", "layer4", drop_rate=0.2),
)
register(
    ModelSpec(
        "efficientnet-lite0",
        "EfficientNet-Lite0 (timm tf_efficientnet_lite0) with ImageNet weights that work offline: ct-default's "
        "architecture (docs/model-selection.md)",
        "ours",
        160,
        defaults=_FINE_TUNE,
    ),
    build_efficientnet_lite0,
)
register(
    ModelSpec(
        "covidnet",
        "COVID-Net-style PEPX network after paper 004, narrowed for CPU (models/covidnet.py says how)",
        "004",
        224,
        in_chans=1,
        mean=GREY_MEAN,
        std=GREY_STD,
        defaults=_PAPER_004,
    ),
    _covidnet,
)
register(
    ModelSpec(
        "mobilenetv3-small",
        "MobileNetV3-Small, single-channel input: the fastest CPU candidate",
        "ours",
        224,
        in_chans=1,
        mean=GREY_MEAN,
        std=GREY_STD,
        defaults=_CPU,
    ),
    _timm("mobilenetv3_small_100", "blocks", drop_rate=0.2),
)
