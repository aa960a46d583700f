"""Labelled slice datasets read from disk on demand (a dataset is never held in memory)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from lungsight.errors import InputError
from lungsight.io.images import natural_key
from lungsight.preprocess.transforms import augmentation, fit_square, normalise
from lungsight.preprocess.window import to_unit

POSITIVE = "covid"


@dataclass(frozen=True)
class Item:
    path: Path
    label: str
    patient_id: str

    @property
    def file(self) -> str:
        return self.path.name


def read_labels(data_dir: Path) -> list[Item]:
    """Rows of ``data_dir/labels.csv`` (``file,label,patient_id``; ``file`` relative to ``data_dir/images`` or
    ``data_dir``), checked: every file must exist and every row must have a label and a patient id."""
    data_dir = Path(data_dir)
    csv_path = data_dir / "labels.csv"
    if not csv_path.is_file():
        raise InputError(f"{data_dir}: no labels.csv (expected columns file,label,patient_id)")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"file", "label", "patient_id"} - set(reader.fieldnames or [])
        if missing:
            raise InputError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    if not rows:
        raise InputError(f"{csv_path}: no rows")
    base = data_dir / "images" if (data_dir / "images").is_dir() else data_dir
    items = []
    for n, row in enumerate(rows, start=2):
        if not row["file"] or not row["label"] or not row["patient_id"]:
            raise InputError(f"{csv_path}:{n}: empty file, label or patient_id")
        path = base / row["file"]
        if not path.is_file():
            raise InputError(f"{csv_path}:{n}: {path} does not exist")
        items.append(Item(path, row["label"].strip(), row["patient_id"].strip()))
    items.sort(key=lambda it: (it.patient_id, natural_key(it.file)))
    return items


def class_names(items: list[Item]) -> list[str]:
    """Sorted labels with the positive class ('covid') last, so that its index is the highest."""
    labels = sorted({it.label for it in items} - {POSITIVE})
    return [*labels, POSITIVE] if any(it.label == POSITIVE for it in items) else labels


def load_unit(path: Path) -> np.ndarray:
    """Read one training image with the same reader and windowing as prediction: ``(H, W)`` float32 in [0, 1]."""
    from lungsight.io import load_study

    study = load_study(path)
    return to_unit(study.pixels[0], study.intensity)


class SliceDataset(Dataset):
    """Items -> (normalised tensor, class index), optionally augmented."""

    def __init__(
        self,
        items: Sequence[Item],
        classes: list[str],
        size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
    ) -> None:
        self.items = items
        self.index = {c: i for i, c in enumerate(classes)}
        self.size, self.in_chans, self.mean, self.std = size, in_chans, mean, std
        self.augment = augmentation(augment)

    def __len__(self) -> int:
        return len(self.items)

    def image(self, i: int) -> np.ndarray:
        """Item ``i`` as a grey image in [0, 1] (subclasses read prepared images instead)."""
        return load_unit(self.items[i].path)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = fit_square(self.image(i), self.size)  # (1, S, S)
        if self.augment is not None:
            x = self.augment(x).clamp_(0.0, 1.0)
        return normalise(x, self.in_chans, self.mean, self.std)[0], self.index[self.items[i].label]
