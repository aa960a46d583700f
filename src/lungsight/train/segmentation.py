"""Training a lung (or CT infection) U-Net (:mod:`lungsight.models.unet`) on images with masks.

Layouts of X-rays with lung masks (``layout="auto"`` recognises them by their folders):

* ``montgomery``: ``CXR_png/NAME.png`` with ``ManualMask/leftMask/NAME.png`` and ``ManualMask/rightMask/NAME.png``
  (the two lungs are joined);
* ``shenzhen``: ``CXR_png/NAME.png`` with ``mask/NAME_mask.png`` (or ``mask/NAME.png``); images without a mask
  are skipped and counted;
* ``jsrt`` and ``pairs``: ``images/NAME.*`` with ``masks/NAME.*`` (or ``masks/NAME_mask.*``), or with one file of
  that name in each sub-folder of ``masks/`` (SCR's ``masks/left lung/``, ``masks/right lung/``: joined).

and CT volumes with mask volumes (``layout="nifti"``, axial slices are the examples; :func:`discover_volumes`):

* a COVID-19-CT-Seg folder: ``ct_scans/`` (or ``COVID-19-CT-Seg_20cases/``) with ``lung_mask/`` or
  ``infection_mask/`` (folder names in any case; ``target`` picks which), files matched by name (Kaggle's ``_org``,
  ``covid-19-pneumonia-`` and ``-dcm`` name parts are ignored in the match);
* a MedSeg folder: ``tr_im.nii.gz`` with ``tr_mask.nii.gz`` (infection: labels 1 ground glass and 2 consolidation)
  or ``tr_lungmasks_updated.nii.gz`` (lung);
* one volume file with ``masks``: a mask volume, or a folder of mask volumes whose union is the target (the lobe
  masks of ``ct-volume/masks/``), or ``"hu"``: lung masks derived from the HU values by
  :func:`lungsight.preprocess.ct_lungs.derive_lung_mask_hu` - a threshold rule, not a manual mask.

Volumes are read with :func:`lungsight.load_study` (HU, canonical display order) and shown to the U-Net through the
lung window without equalisation (``preprocess: "window"``); masks with :func:`lungsight.io.nifti.read_nifti` in the
same order. For a lung target only slices that contain lung are used; for an infection target, the slices that
contain lung by the HU rule. Neighbouring slices are nearly the same image, so a random slice split would score a
model on near-copies of its training slices: CT volumes are split into *contiguous slabs* instead - in each volume a
seeded run of ``val_fraction`` of its slices (at least one) is held out, and ``slab_gap`` slices on either side of it
are used for neither training nor validation (:func:`split_slabs`).

The images are read with :func:`lungsight.load_study` (PNG, JPEG, TIFF, DICOM) and held in memory at the input size
(256 px: 0.25 MB each). Loss: Dice + binary cross-entropy (MONAI ``DiceCELoss``); Adam, learning rate 1e-4, halved
when the validation Dice has not improved for 3 epochs (``ReduceLROnPlateau``); stop after 10 epochs without
improvement. Light augmentation: rotation +/-10 degrees, shift 5 %, zoom 10 %, brightness and contrast +/-10 %.
For X-rays a random 15 % of the images (at least one) is held out - of the patients, when ``groups`` names a CSV
that gives each image's patient (``file`` and ``patientid`` or ``patient_id`` columns, such as the Cohen collection's
``metadata.csv``), so that no patient is on both sides -, for volumes the slabs above; the Dice on the held-out
images is reported every epoch, next to the Dice of the trivial all-ones mask (the empty mask scores 0).
``encoder="xception"`` trains paper 003's Xception-encoder U-Net instead of MONAI's.

Run folder (``out``)::

    run.json           the settings
    state.pt           resumable state (model, optimiser, scheduler, progress), written atomically every epoch
    best.safetensors   the best model so far (highest validation Dice), with its configuration in the header
    history.csv        one row per epoch: train loss, validation Dice, learning rate, seconds
    model.safetensors  the best model, written at the end: ``lungsight segment apply --model`` or
                       ``load_segmenter(path)`` use it
    summary.json       the figures, and which images (X-rays) or slabs (volumes) were held out
"""

from __future__ import annotations

import csv
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
from lungsight.io.nifti import read_nifti
from lungsight.models.unet import (
    TASK,
    build_lung_unet,
    lung_unet_config,
    normalise,
    save_lung_unet,
    unet_image,
)
from lungsight.models.weights import atomic_torch_save, read_checkpoint
from lungsight.preprocess.ct_lungs import derive_lung_mask_hu
from lungsight.preprocess.lung_fields import resize_mask
from lungsight.preprocess.window import to_unit
from lungsight.train.runs import prepare_run_folder

LAYOUTS = ("auto", "montgomery", "shenzhen", "jsrt", "pairs", "nifti")
TARGETS = ("lung", "infection")
TASK_OF_TARGET = {"lung": TASK, "infection": "infection-segmentation"}
READABLE = IMAGE_SUFFIXES | {".dcm"}
MEDSEG_INFECTION_LABELS = (1, 2)  # MedSeg tr_mask.nii.gz: 1 ground glass, 2 consolidation, 3 pleural effusion


@dataclass(frozen=True)
class Pair:
    """One training example: an X-ray and the mask file(s) whose union is its lung mask."""

    image: Path
    masks: tuple[Path, ...]


@dataclass(frozen=True)
class VolumePair:
    """One CT volume and its target: the union of ``masks`` (voxels whose value is in ``labels``, or any non-zero
    voxel when ``labels`` is empty), or, with no mask files, lung masks derived from HU."""

    volume: Path
    masks: tuple[Path, ...]
    labels: tuple[int, ...] = ()

    @property
    def derived(self) -> bool:
        return not self.masks


def _is_nifti(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and (name.endswith(".nii") or name.endswith(".nii.gz"))


def _volume_key(path: Path) -> str:
    """A volume's name without suffix and without the parts that differ between COVID-19-CT-Seg's folders on Kaggle."""
    name = path.name.lower().removesuffix(".gz").removesuffix(".nii")
    for part in ("_org", "covid-19-pneumonia-", "-dcm"):
        name = name.replace(part, "")
    return name


def _volumes(folder: Path) -> dict[str, Path]:
    return {_volume_key(p): p for p in sorted(folder.iterdir(), key=lambda p: natural_key(p.name)) if _is_nifti(p)}


def _subfolder(root: Path, *names: str) -> Path | None:
    found = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    return next((found[n] for n in names if n in found), None)


def discover_volumes(root: Path, target: str = "lung", masks: str | None = None) -> list[VolumePair]:
    """CT volumes with their target masks (layouts in the module docstring); ``masks="hu"`` derives lung masks."""
    root = Path(root)
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    derived = masks == "hu"
    if derived and target != "lung":
        raise InputError("--masks hu derives lung masks; it cannot stand in for a --target infection mask")
    if _is_nifti(root):
        if not masks:
            raise InputError(f"{root}: a single volume needs --masks (a mask volume, a folder of them, or 'hu')")
        if derived:
            return [VolumePair(root, ())]
        mask_path = Path(masks)
        files = list(_volumes(mask_path).values()) if mask_path.is_dir() else [mask_path]
        if not files or not all(_is_nifti(f) for f in files):
            raise InputError(f"{mask_path}: no NIfTI mask volume found")
        return [VolumePair(root, tuple(files))]
    if not root.is_dir():
        raise InputError(f"{root}: not a NIfTI volume or a folder")
    if masks is not None and not derived:
        raise InputError(f"{root}: --masks FILE goes with a single volume; a folder brings its own masks")
    if (root / "tr_im.nii.gz").is_file():  # MedSeg
        volume = root / "tr_im.nii.gz"
        if derived:
            return [VolumePair(volume, ())]
        if target == "infection":
            mask = root / "tr_mask.nii.gz"
            if not mask.is_file():
                raise InputError(f"{root}: no tr_mask.nii.gz for an infection target (MedSeg layout)")
            return [VolumePair(volume, (mask,), MEDSEG_INFECTION_LABELS)]
        lung = root / "tr_lungmasks_updated.nii.gz"
        if not lung.is_file():
            raise InputError(f"{root}: no tr_lungmasks_updated.nii.gz for a lung target (or pass --masks hu)")
        return [VolumePair(volume, (lung,))]
    images_dir = _subfolder(root, "ct_scans", "covid-19-ct-seg_20cases") or root
    volumes = _volumes(images_dir)
    if derived:
        pairs = [VolumePair(v, ()) for v in volumes.values()]
    else:
        mask_dir = _subfolder(root, f"{target}_mask")
        if mask_dir is None:
            raise InputError(f"{root}: no {target}_mask/ folder next to the CT volumes (COVID-19-CT-Seg layout)")
        mask_files = _volumes(mask_dir)
        pairs = [VolumePair(v, (mask_files[k],)) for k, v in volumes.items() if k in mask_files]
    if not pairs:
        raise InputError(f"{root}: no CT volume with a matching {target} mask found (nifti layout)")
    return pairs


def read_volume_pair(pair: VolumePair, target: str = "lung") -> tuple[np.ndarray, np.ndarray]:
    """(``(n, H, W)`` HU volume, ``(n, H, W)`` bool target) in display order."""
    try:
        study = lungsight.load_study(pair.volume, modality="CT")
    except LungsightError as exc:
        raise InputError(f"{pair.volume}: cannot read ({exc})") from None
    if study.intensity != "hu":
        raise InputError(f"{pair.volume}: not a CT volume in Hounsfield units")
    hu = study.pixels
    if pair.derived:
        return hu, derive_lung_mask_hu(hu)
    target_mask = np.zeros(hu.shape, dtype=bool)
    for path in pair.masks:
        m = read_nifti(path, str(path)).pixels
        if m.shape != hu.shape:
            raise InputError(f"{path}: mask shape {m.shape} does not match the volume's {hu.shape}")
        target_mask |= np.isin(np.rint(m), pair.labels) if pair.labels else m > 0.5
    return hu, target_mask


def volume_slices(pair: VolumePair, target: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs ``(k, S, S)`` in [0, 1], targets ``(k, S, S)`` bool, slice indices ``(k,)``) of the slices used:
    those with lung in the target (lung) or by the HU rule (infection)."""
    hu, target_mask = read_volume_pair(pair, target)
    has = (target_mask if target == "lung" else derive_lung_mask_hu(hu)).any(axis=(1, 2))
    idx = np.flatnonzero(has)
    if not len(idx):
        raise InputError(f"{pair.volume}: no slice contains lung")
    xs = np.stack([unet_image(to_unit(hu[k], "hu"), size, "window") for k in idx])
    ys = np.stack([resize_mask(target_mask[k], (size, size)) for k in idx])
    return xs, ys, idx


def split_slabs(groups: np.ndarray, val_fraction: float, seed: int, gap: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices of slices grouped by volume (``groups[i]``, slices of a volume consecutive and in
    order): per volume a contiguous slab of ``val_fraction`` of its slices (at least one) at a seeded position is
    held out, and ``gap`` slices either side of it are left out of both sets."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        n = len(members)
        n_val = max(1, round(val_fraction * n))
        if n - n_val - 2 * gap < 1:
            raise InputError(f"volume {g}: {n} usable slices are too few for a slab of {n_val} and gaps of {gap}")
        start = int(rng.integers(0, n - n_val + 1))
        pos = np.arange(n)
        val.append(members[(pos >= start) & (pos < start + n_val)])
        train.append(members[(pos < start - gap) | (pos >= start + n_val + gap)])
    return np.concatenate(train), np.concatenate(val)


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
    if layout == "nifti":
        raise InputError(f"{root}: the nifti layout holds volumes; use discover_volumes")
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


def read_image_and_mask(pair: Pair) -> tuple[np.ndarray, np.ndarray]:
    """(grey image in [0, 1], lung mask) at the image's own size: the mask is the union of the pair's mask files,
    each taken as lung above half its maximum and resized to the image when its size differs (:func:`resize_mask`)."""
    image = _read(pair.image)
    mask = np.zeros(image.shape, dtype=bool)
    for path in pair.masks:
        m = _read(path)
        mask |= resize_mask(m > 0.5 * max(float(m.max()), 1e-6), image.shape)
    return image, mask


def read_pair(pair: Pair, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(equalised image, lung mask), both ``(size, size)``: the U-Net's input (in [0, 1]) and its target."""
    image, mask = read_image_and_mask(pair)
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
    encoder: str = "monai"
    target: str = "lung"
    masks: str | None = None
    slab_gap: int = 1
    groups: str | None = None
    threads: int | None = None
    command: str = field(default_factory=lambda: " ".join(["lungsight", *sys.argv[1:]]))

    def unet_config(self) -> dict[str, Any]:
        return lung_unet_config(
            task=TASK_OF_TARGET[self.target],
            arch="xception-unet" if self.encoder == "xception" else "monai-unet",
            encoder=self.encoder,
            preprocess="window" if self.layout == "nifti" else "equalise",
            input_size=self.input_size,
            channels=list(self.channels),
            strides=[2] * (len(self.channels) - 1),
            num_res_units=self.num_res_units,
        )


_RESUME_KEYS = (
    *("data", "layout", "epochs", "batch_size", "lr", "input_size", "channels", "num_res_units", "seed"),
    *("encoder", "target", "masks", "slab_gap", "groups"),
)


def _prepare_run(cfg: SegTrainConfig, resume: bool) -> Path:
    """Create the run folder; refuse a non-empty one unless resuming with the same settings."""
    return prepare_run_folder(Path(cfg.out), asdict(cfg), resume, _RESUME_KEYS, path_keys=("data", "masks", "groups"))


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


def split_indices(
    n: int, val_fraction: float, seed: int, groups: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) indices: a seeded random ``val_fraction`` (at least one) held out - of the images, or of
    the patients when ``groups`` gives each image's patient, so that a patient's images stay on one side."""
    if n < 2:
        raise InputError(f"need at least two image+mask pairs to train and validate, found {n}")
    labels = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1]
    n_groups = int(labels.max()) + 1
    if n_groups < 2:
        raise InputError(f"need images of at least two patients to train and validate, found {n_groups}")
    order = np.random.default_rng(seed).permutation(n_groups)
    n_val = min(n_groups - 1, max(1, round(val_fraction * n_groups)))
    held = np.isin(labels, order[:n_val])
    return np.flatnonzero(~held), np.flatnonzero(held)


def read_groups(path: Path, pairs: list[Pair]) -> tuple[list[str], int]:
    """Each pair's patient from a CSV with a ``file`` column and a ``patientid`` or ``patient_id`` column (matched by
    file name, or by name without extension); an image the CSV does not list is a patient of its own. Returns
    the patients and how many images were not listed."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = set(reader.fieldnames or ())
            key = next((k for k in ("patientid", "patient_id") if k in fields), None)
            if "file" not in fields or key is None:
                raise InputError(f"{path}: needs a 'file' column and a 'patientid' or 'patient_id' column")
            by_name: dict[str, str] = {}
            for row in reader:
                name = Path(row["file"] or "").name
                by_name.setdefault(name, row[key])
                by_name.setdefault(Path(name).stem, row[key])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: cannot read the patients' CSV ({exc})") from None
    groups, unlisted = [], 0
    for pair in pairs:
        patient = by_name.get(pair.image.name, by_name.get(pair.image.stem))
        if patient is None:
            unlisted += 1
            patient = f"unlisted:{pair.image.name}"
        groups.append(f"patient:{patient}")
    return groups, unlisted


def _load_volumes(cfg: SegTrainConfig) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[dict[str, Any]]]:
    """All usable slices of the nifti layout: inputs, targets, volume index per slice, and what each volume gave."""
    pairs = discover_volumes(Path(cfg.data), cfg.target, cfg.masks)
    if cfg.max_images:
        pairs = pairs[: cfg.max_images]
    xs, ys, groups, volumes = [], [], [], []
    for g, pair in enumerate(tqdm(pairs, desc="reading volumes and masks", leave=False, disable=None)):
        x, y, idx = volume_slices(pair, cfg.target, cfg.input_size)
        xs.append(x)
        ys.append(y)
        groups.append(np.full(len(idx), g))
        volumes.append({"volume": pair.volume.name, "target": "derived-hu" if pair.derived else "mask", "slices": idx})
    images = torch.from_numpy(np.concatenate(xs))
    masks = torch.from_numpy(np.concatenate(ys).astype(np.float32))
    return images, masks, np.concatenate(groups), volumes


def _held_out(volumes: list[dict[str, Any]], groups: np.ndarray, val_idx: np.ndarray) -> list[dict[str, Any]]:
    """Per volume, the slice indices (in display order of the volume) that were held out."""
    positions = {i: int(np.sum(groups[:i] == groups[i])) for i in val_idx}
    return [
        {
            "volume": v["volume"],
            "target": v["target"],
            "val_slices": [int(v["slices"][positions[i]]) for i in val_idx if groups[i] == g],
        }
        for g, v in enumerate(volumes)
    ]


def train_segmentation(cfg: SegTrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Train (or resume training) a lung U-Net; returns the summary (also written to ``summary.json``)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    held_out: list[dict[str, Any]] = []
    held_out_images: list[str] = []
    if cfg.layout == "nifti":
        if cfg.groups:
            raise InputError("--groups is for X-ray layouts; CT volumes are split into slabs within each volume")
        layout, skipped = "nifti", 0
        images, masks, groups, volumes = _load_volumes(cfg)
        train_idx, val_idx = split_slabs(groups, cfg.val_fraction, cfg.seed, cfg.slab_gap)
        held_out = _held_out(volumes, groups, val_idx)
        n_pairs = len(images)
        out = _prepare_run(cfg, resume)
        print(
            f"nifti layout: {len(volumes)} volume(s), {n_pairs} slices with lung ({cfg.target} target"
            f"{', derived from HU' if any(v['target'] == 'derived-hu' for v in volumes) else ''}); "
            f"train {len(train_idx)} / held-out slab {len(val_idx)}; U-Net ({cfg.encoder}) at {cfg.input_size}px",
            flush=True,
        )
    else:
        layout, pairs, skipped = discover_pairs(Path(cfg.data), cfg.layout)
        if cfg.max_images:
            pairs = pairs[: cfg.max_images]
        groups, unlisted = read_groups(Path(cfg.groups), pairs) if cfg.groups else (None, 0)
        train_idx, val_idx = split_indices(len(pairs), cfg.val_fraction, cfg.seed, groups)
        held_out_images = [pairs[i].image.name for i in val_idx]
        n_pairs = len(pairs)
        out = _prepare_run(cfg, resume)
        by = ""
        if groups is not None:
            by = f" by patient ({len(set(groups))} patients, {unlisted} images not in {Path(cfg.groups).name})"
        print(
            f"{layout} layout: {len(pairs)} image+mask pairs ({skipped} images without a mask skipped); "
            f"train {len(train_idx)} / validation {len(val_idx)}{by}; U-Net ({cfg.encoder}) at {cfg.input_size}px",
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
            meta |= {"target": cfg.target, "held_out": held_out} if held_out else {}
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
        "n_pairs": n_pairs,
        "n_skipped": skipped,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "best_epoch": st["best_epoch"],
        "best_val_dice": st["best_dice"],
        "baseline_all_lung_dice": all_lung,
        "epochs_run": st["epoch"],
        "encoder": cfg.encoder,
        "target": cfg.target,
    }
    if held_out:
        summary["held_out"] = held_out
    if held_out_images:
        summary["held_out_images"] = held_out_images
        summary["split"] = "by patient" if cfg.groups else "by image"
    atomic_write_json(out / "summary.json", summary)
    print(f"model written to {out / 'model.safetensors'} (validation Dice {st['best_dice']:.3f})", flush=True)
    return summary
