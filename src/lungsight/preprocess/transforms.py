"""Geometry and normalisation shared by training and prediction, and the training augmentation."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def tensor_view(a: np.ndarray) -> torch.Tensor:
    """``a`` as a tensor that shares its memory where it can (a writeable, C-contiguous float32 or int16 array:
    int16 is how readers store whole Hounsfield units), else a float32 copy; callers only read it."""
    if a.dtype in (np.float32, np.int16) and a.flags.c_contiguous and a.flags.writeable:
        return torch.from_numpy(a)
    return torch.from_numpy(np.array(a, dtype=np.float32, order="C"))


def fit_square(unit: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(N, H, W)`` grey images in [0, 1] to ``size`` x ``size`` (bilinear, antialiased when shrinking).

    The aspect ratio is not kept: CT slices from DICOM/NIfTI are square already, and the public 8-bit slice
    collections are tight crops of varying shape (many on a white background) whose black padding would add
    edges that are not anatomy.
    """
    x = torch.as_tensor(unit, dtype=torch.float32)
    return _square(x[None] if x.ndim == 2 else x, size).clamp_(0.0, 1.0)


def _square(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(N, H, W)`` -> ``(N, size, size)``, bilinear, antialiased when shrinking (``x`` itself when it fits)."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    return F.interpolate(
        x[:, None], size=(size, size), mode="bilinear", antialias=max(h, w) > size, align_corners=False
    )[:, 0]


def normalise(x: torch.Tensor, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """``(N, S, S)`` grey in [0, 1] -> ``(N, C, S, S)`` normalised model input (grey copied to each channel)."""
    x = x[:, None].expand(-1, in_chans, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x - m) / s


def model_batch(
    unit: np.ndarray | torch.Tensor, size: int, in_chans: int, mean: tuple[float, ...], std: tuple[float, ...]
) -> torch.Tensor:
    """Grey slices in [0, 1] -> the normalised ``(N, C, size, size)`` tensor a model expects."""
    return normalise(fit_square(unit, size), in_chans, mean, std)


def windowed_model_batch(
    values: np.ndarray,
    bounds: tuple[float, float],
    size: int,
    in_chans: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
) -> torch.Tensor:
    """Stored values ``(N, H, W)`` (HU, grey levels) -> the normalised model input: the same as
    ``model_batch(to_unit(values, bounds=bounds), ...)`` up to float rounding (about 1e-6), in fewer passes.

    The values are clipped to ``bounds`` (one pass at the stored size, on PyTorch's threads; int16 HU are turned
    into float32 first; ``values`` is never written), resized, and only then scaled to [0, 1] and normalised, in
    one pass at the model's size: clipping commutes with the window's increasing linear map, and the resize's
    weights are non-negative and sum to one, so the result stays within the window.
    """
    lo, hi = (float(b) for b in bounds)
    x = tensor_view(values)
    x = x[None] if x.ndim == 2 else x
    # int16 HU: converted, then clipped in place (twice as fast as clipping them to float bounds in one pass)
    x = _square(x.clamp(lo, hi) if x.is_floating_point() else x.to(torch.float32).clamp_(lo, hi), size)
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    scale = 1.0 / (hi - lo)
    gain, offset = scale / s, (-lo * scale - m) / s
    return torch.addcmul(offset, x[:, None], gain).expand(-1, in_chans, -1, -1).contiguous()


def augmentation(name: str) -> v2.Transform | None:
    """Training augmentation by name, applied to ``(1, S, S)`` grey tensors in [0, 1].

    * ``paper002`` - paper 002's setting: horizontal and vertical flips, rotation 0-360 degrees, zoom and shift 5 %.
    * ``paper002+intensity`` - the same plus +/-10 % brightness and contrast jitter.
    * ``light`` - horizontal flip, rotation +/-15 degrees, zoom and shift 10 %, +/-20 % brightness and contrast:
      for tight 8-bit crops (covid-ct), where full rotations add black corners that are not anatomy.
    * ``paper004`` - paper 004's X-ray setting: horizontal flip, Gaussian noise (variance 0.015), rotation
      (+/-10 degrees), elastic deformation and scaling (+/-10 %).
    * ``none``.
    """
    if name == "none":
        return None
    geometric = [
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomAffine(degrees=180.0, translate=(0.05, 0.05), scale=(0.95, 1.05)),
    ]
    if name == "paper002":
        return v2.Compose(geometric)
    if name == "light":
        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=15.0, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                v2.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        )
    if name == "paper002+intensity":
        return v2.Compose([*geometric, v2.ColorJitter(brightness=0.1, contrast=0.1)])
    if name == "paper004":
        return v2.Compose(
            [
                v2.RandomHorizontalFlip(),
                v2.RandomAffine(degrees=10.0, scale=(0.9, 1.1)),
                v2.RandomApply([v2.ElasticTransform(alpha=20.0, sigma=5.0)], p=0.3),
                v2.GaussianNoise(mean=0.0, sigma=0.015**0.5, clip=True),
            ]
        )
    raise ValueError(f"unknown augmentation {name!r}; choose one of {', '.join(AUGMENTATIONS)}")


AUGMENTATIONS = ("paper002", "paper002+intensity", "paper004", "light", "none")


def unfit_square(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo :func:`fit_square` for maps computed on the model input: ``(N, S, S)`` -> ``(N, height, width)``."""
    x = torch.as_tensor(maps, dtype=torch.float32)[:, None]
    return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)[:, 0].numpy()
