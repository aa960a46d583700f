"""Training a lung U-Net (:mod:`lungsight.models.unet`) on a folder of X-rays with manual lung masks.

Layouts (``layout="auto"`` recognises them by their folders):

* ``montgomery``: ``CXR_png/NAME.png`` with ``ManualMask/leftMask/NAME.png`` and ``ManualMask/rightMask/NAME.png``
  (the two lungs are joined);
* ``shenzhen``: ``CXR_png/NAME.png`` with ``mask/NAME_mask.png`` (or ``mask/NAME.png``); images without a mask
  are skipped and counted;
* ``jsrt`` and ``pairs``: ``images/NAME.*`` with ``masks/NAME.*`` (or ``masks/NAME_mask.*``), or with one file of
  that name in each sub-folder of ``masks/`` (SCR's ``masks/left lung/``, ``masks/right lung/``: joined).

The images are read with :func:`lungsight.load_study` (PNG, JPEG, TIFF, DICOM) and held in memory at the input size
(256 px: 0.25 MB each). Loss: Dice + binary cross-entropy (MONAI ``DiceCELoss``); Adam, learning rate 1e-4, halved
when the validation Dice has not improved for 3 epochs (``ReduceLROnPlateau``); stop after 10 epochs without
improvement. Light augmentation: rotation +/-10 degrees, shift 5 %, zoom 10 %, brightness and contrast +/-10 %.
A random 15 % of the images (at least one) is held out and the Dice on it is reported every epoch, next to the Dice
of the trivial all-lung mask (the empty mask scores 0).

Run folder (``out``)::

    run.json           the settings
    state.pt           resumable state (model, optimiser, scheduler, progress), written atomically every epoch
    best.safetensors   the best model so far (highest validation Dice), with its configuration in the header
    history.csv        one row per epoch: train loss, validation Dice, learning rate, seconds
    model.safetensors  the best model, written at the end: ``lungsight segment apply --model`` or
                       ``load_segmenter(path)`` use it
    summary.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

import lungsight
from lungsight.about import __version__
from lungsight.errors import InputError, LungsightError
from lungsight.fileio import atomic_write_csv, atomic_write_json
from lungsight.io.images import IMAGE_SUFFIXES, natural_key
from lungsight.models.unet import build_lung_unet, lung_unet_config, normalise, save_lung_unet, unet_image
from lungsight.models.weights import atomic_torch_save, read_checkpoint
from lungsight.preprocess.lung_fields import resize_mask
from lungsight.preprocess.window import to_unit

LAYOUTS = ("auto", "montgomery", "shenzhen", "jsrt", "pairs")
READABLE = IMAGE_SUFFIXES | {".dcm"}


@dataclass(frozen=True)
class Pair:
    """One training example: an X-ray and the mask file(s) whose union is its lung mask."""

    image: Path
    masks: tuple[Path, ...]


def detect_layout(root: Path) -> str:
    """The layout of an image+mask folder, from its sub-folders (see the module docstring)."""
    root = Path(root)
    if (root / "CXR_png").is_dir() and (root / "ManualMask" / "leftMask").is_dir():
        return "montgomery"
    if (root / "CXR_png").is_dir() and (root / "mask").is_dir():
        return "shenzhen"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "jsrt" if any(p.is_dir() for p in (root / "masks").iterdir()) else "pairs"
    raise InputError(
        f"{root}: no known image+mask layout (expected CXR_png/ with ManualMask/ or mask/, or images/ with masks/)"
    )


def _files(folder: Path) -> dict[str, Path]:
    """Readable image files of a folder by stem (non-recursive, hidden files left out)."""
    return {
        p.stem: p
        for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name))
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in READABLE
    }


def _match(stem: str, masks: dict[str, Path]) -> Path | None:
    return masks.get(stem) or masks.get(f"{stem}_mask")


def discover_pairs(root: Path, layout: str = "auto") -> tuple[str, list[Pair], int]:
    """(layout used, image+mask pairs in natural file order, number of images skipped for want of a mask)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "montgomery":
        images_dir, mask_dirs = root / "CXR_png", [root / "ManualMask" / "leftMask", root / "ManualMask" / "rightMask"]
    elif layout == "shenzhen":
        images_dir, mask_dirs = root / "CXR_png", [root / "mask"]
    else:
        images_dir, masks_root = root / "images", root / "masks"
        if not masks_root.is_dir():
            raise InputError(f"{root}: no masks/ folder for the {layout} layout")
        subdirs = sorted(p for p in masks_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        mask_dirs = subdirs or [masks_root]
    for folder in (images_dir, *mask_dirs):
        if not folder.is_dir():
            raise InputError(f"{root}: {folder.relative_to(root)}/ is missing for the {layout} layout")
    mask_files = [_files(d) for d in mask_dirs]
    pairs, skipped = [], 0
    for stem, image in _files(images_dir).items():
        found = [_match(stem, m) for m in mask_files]
        if all(found):
            pairs.append(Pair(image, tuple(found)))  # type: ignore[arg-type]
        else:
            skipped += 1
    if not pairs:
        raise InputError(f"{root}: no image with a matching mask found ({layout} layout)")
    return layout, pairs, skipped


def _read(path: Path) -> np.ndarray:
    try:
        study = lungsight.load_study(path, modality="XR")
        return to_unit(study.pixels[0], study.intensity)
    except LungsightError as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def read_pair(pair: Pair, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(equalised image, lung mask), both ``(size, size)``: the U-Net's input (in [0, 1]) and its target."""
    image = _read(pair.image)
    mask = np.zeros(image.shape, dtype=bool)
    for path in pair.masks:
        m = _read(path)
        mask |= resize_mask(m > 0.5 * max(float(m.max()), 1e-6), image.shape)
    return unet_image(image, size), resize_mask(mask, (size, size))


class MaskDataset(Dataset):
    """Preloaded ``(1, S, S)`` normalised images and float masks, optionally augmented."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, augment: bool) -> None:
        self.images, self.masks = images, masks
        self.transform = (
            v2.Compose(
                [
                    v2.RandomAffine(degrees=10.0, translate=(0.05, 0.05), scale=(0.9, 1.1)),
                    v2.ColorJitter(brightness=0.1, contrast=0.1),
                ]
            )
            if augment
            else None
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.images[i][None], self.masks[i][None]
        if self.transform is not None:
            x, y = self.transform(tv_tensors.Image(x), tv_tensors.Mask(y))
            x, y = x.as_subclass(torch.Tensor).clamp(0.0, 1.0), y.as_subclass(torch.Tensor)
        return normalise(x), y.float()


@dataclass
class SegTrainConfig:
    data: str
    out: str
    layout: str = "auto"
    epochs: int = 50
    batch_size: int = 8
    lr: float = 1e-4
    input_size: int = 256
    channels: tuple[int, ...] = (16, 32, 64, 128, 256)
    num_res_units: int = 2
    val_fraction: float = 0.15
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    early_stop: int = 10
    augment: bool = True
    seed: int = 0
    max_images: int | None = None
    command: str = field(default_factory=lambda: " ".join(["lungsight", *sys.argv[1:]]))

    def unet_config(self) -> dict[str, Any]:
        return lung_unet_config(
            input_size=self.input_size,
            channels=list(self.channels),
            strides=[2] * (len(self.channels) - 1),
            num_res_units=self.num_res_units,
        )


_RESUME_KEYS = ("data", "layout", "epochs", "batch_size", "lr", "input_size", "channels", "num_res_units", "seed")


def _prepare_run(cfg: SegTrainConfig, resume: bool) -> Path:
    """Create the run folder; refuse a non-empty one unless resuming with the same settings."""
    out = Path(cfg.out)
    run_json = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if not resume:
            raise InputError(f"{out}: folder exists and is not empty; pass --resume to continue it or a new --out")
        if not run_json.exists():
            raise InputError(f"{out}: not a lungsight run folder (no run.json); refusing to write into it")
        previous = json.loads(run_json.read_text())
        now = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as they were saved
        changed = [k for k in _RESUME_KEYS if previous.get(k) != now.get(k)]
        if changed:
            raise InputError(f"{out}: --resume with different settings ({', '.join(changed)}); use a new --out")
        return out
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_json, asdict(cfg))
    return out


def _load_all(pairs: list[Pair], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for pair in tqdm(pairs, desc="reading images and masks", leave=False, disable=None):
        x, y = read_pair(pair, size)
        xs.append(torch.from_numpy(x))
        ys.append(torch.from_numpy(y.astype(np.float32)))
    return torch.stack(xs), torch.stack(ys)


@torch.no_grad()
def validation_dice(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, threshold: float) -> float:
    """Mean per-image Dice of the thresholded sigmoid output against ``masks`` (images in [0, 1], ``(N, S, S)``)."""
    model.eval()
    preds = [torch.sigmoid(model(normalise(images[i : i + 8, None]))) >= threshold for i in range(0, len(images), 8)]
    pred = torch.cat(preds).float()
    return float(compute_dice(pred, masks[:, None], include_background=True, ignore_empty=False).mean())


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a seeded random ``val_fraction`` (at least one image) held out."""
    if n < 2:
        raise InputError(f"need at least two image+mask pairs to train and validate, found {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_segmentation(cfg: SegTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train (or resume training) a lung U-Net; returns the summary (also written to ``summary.json``)."""
    layout, pairs, skipped = discover_pairs(Path(cfg.data), cfg.layout)
    if cfg.max_images:
        pairs = pairs[: cfg.max_images]
    train_idx, val_idx = split_indices(len(pairs), cfg.val_fraction, cfg.seed)
    out = _prepare_run(cfg, resume)
    print(
        f"{layout} layout: {len(pairs)} image+mask pairs ({skipped} images without a mask skipped); "
        f"train {len(train_idx)} / validation {len(val_idx)}; U-Net at {cfg.input_size}px",
        flush=True,
    )
    images, masks = _load_all(pairs, cfg.input_size)
    all_lung = float(
        compute_dice(torch.ones_like(masks[val_idx, None]), masks[val_idx, None], ignore_empty=False).mean()
    )
    print(f"validation baselines: empty mask Dice 0.000, all-lung mask Dice {all_lung:.3f}", flush=True)

    torch.manual_seed(cfg.seed)
    config = cfg.unet_config()
    model = build_lung_unet(config)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience
    )
    loss_fn = DiceCELoss(sigmoid=True)
    state_path, best_path = out / "state.pt", out / "best.safetensors"
    st: dict[str, Any] = {"epoch": 0, "best_dice": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
    if resume and state_path.exists():
        saved = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        st = saved["progress"]
        print(f"resuming after epoch {st['epoch']}", flush=True)
    train_ds = MaskDataset(images[train_idx], masks[train_idx], cfg.augment)
    g = torch.Generator()
    for epoch in range(st["epoch"] + 1, cfg.epochs + 1):
        if st["bad_epochs"] >= cfg.early_stop:
            break
        t0 = time.perf_counter()
        g.manual_seed(cfg.seed * 1000 + epoch)
        torch.manual_seed(cfg.seed * 1000 + epoch)  # the augmentation draws from the global generator
        model.train()
        total, n = 0.0, 0
        loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, generator=g)
        bar = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=None)
        for x, y in bar:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
            n += len(x)
            bar.set_postfix(loss=f"{total / n:.4f}")
        dice = validation_dice(model, images[val_idx], masks[val_idx], config["threshold"])
        sched.step(dice)
        row = {
            "epoch": epoch,
            "train_loss": total / max(n, 1),
            "val_dice": dice,
            "lr": opt.param_groups[0]["lr"],
            "seconds": time.perf_counter() - t0,
        }
        st["history"].append(row)
        st["epoch"] = epoch
        if dice > st["best_dice"]:
            st.update(best_dice=dice, best_epoch=epoch, bad_epochs=0)
            meta = {"epoch": epoch, "val_dice": dice, "layout": layout, "lungsight_version": __version__}
            save_lung_unet(model, config | {"training": meta}, best_path)
        else:
            st["bad_epochs"] += 1
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
        atomic_torch_save(state | {"progress": st}, state_path)
        atomic_write_csv(out / "history.csv", st["history"])
        print(
            f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f}, validation Dice {dice:.3f} "
            f"(best {st['best_dice']:.3f} at epoch {st['best_epoch']}), lr {row['lr']:.2g}, {row['seconds']:.1f}s",
            flush=True,
        )
    state, best_config = read_checkpoint(best_path)
    model.load_state_dict(state)
    save_lung_unet(model, best_config, out / "model.safetensors")
    summary = {
        "model": str(out / "model.safetensors"),
        "layout": layout,
        "n_pairs": len(pairs),
        "n_skipped": skipped,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "best_epoch": st["best_epoch"],
        "best_val_dice": st["best_dice"],
        "baseline_all_lung_dice": all_lung,
        "epochs_run": st["epoch"],
    }
    atomic_write_json(out / "summary.json", summary)
    print(f"model written to {out / 'model.safetensors'} (validation Dice {st['best_dice']:.3f})", flush=True)
    return summary
