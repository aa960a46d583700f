"""Shared fixtures: where the real data lives, and helpers that build modified DICOM copies in tmp_path."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

#: Edits one dataset of a series (index in file-name order); returns False to leave the file out of the copy.
Edit = Callable[[Dataset, int], "bool | None"]


def _shared_data() -> Path:
    env = os.environ.get("LUNGSIGHT_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real data (``../shared/data`` or ``$LUNGSIGHT_SHARED_DATA``); skips when absent."""
    root = _shared_data()
    if not root.is_dir():
        pytest.skip(f"shared data folder {root} is absent")
    return root


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def ct_dicom_dir(shared_data: Path) -> Path:
    """The real 20-slice CT DICOM series (JPEG 2000 lossless)."""
    return _need(shared_data / "ct-volume" / "dicom")


@pytest.fixture(scope="session")
def ct_phi_dir(shared_data: Path) -> Path:
    """The same series with made-up identifying tags written in."""
    return _need(shared_data / "ct-volume" / "dicom-with-phi")


@pytest.fixture(scope="session")
def ct_nifti_sm(shared_data: Path) -> Path:
    """``example_ct_sm.nii.gz``: 30 slices of the lower chest, with lung lobe masks in ``masks/``."""
    return _need(shared_data / "ct-volume" / "example_ct_sm.nii.gz")


@pytest.fixture(scope="session")
def covid_ct_dir(shared_data: Path) -> Path:
    """Folder of 8-bit CT slice images (PNG and JPEG)."""
    return _need(shared_data / "covid-ct" / "images")


def _read(path: Path, *, pixels: bool = True) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, stop_before_pixels=not pixels)


def _copy_series(
    src: Path,
    dst: Path,
    edit: Edit | None = None,
    rename: Callable[[int, str], str] | None = None,
    decompress: bool = False,
) -> list[Path]:
    dst.mkdir(parents=True, exist_ok=True)
    written = []
    for index, path in enumerate(sorted(src.glob("*.dcm"))):
        ds = _read(path)
        if decompress:
            ds.decompress()
        if edit is not None and edit(ds, index) is False:
            continue
        target = dst / (rename(index, path.name) if rename else path.name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(target)
        written.append(target)
    return written


@pytest.fixture(scope="session")
def dicom_read() -> Callable[..., Dataset]:
    """``dicom_read(path, pixels=True)``: ``pydicom.dcmread`` without the fixtures' validation warnings."""
    return _read


@pytest.fixture(scope="session")
def dicom_copy() -> Callable[..., list[Path]]:
    """``dicom_copy(src, dst, edit=None, rename=None, decompress=False)`` copies a series, editing it.

    Files are taken in file-name order; ``edit(ds, index)`` changes a dataset in place and returns False to
    leave it out; ``rename(index, name)`` gives the copy's file name. Returns the written paths.
    """
    return _copy_series


def write_tiny_model(path: Path, seed: int = 0) -> tuple[object, Path]:
    """A random-weight ResNet18 (64 px) saved as a complete lungsight model file: for tests whose behaviour does
    not depend on what the model learned. Returns (model, path)."""
    import torch

    from lungsight.models import build_model
    from lungsight.models.weights import save_checkpoint

    torch.manual_seed(seed)
    model = build_model("resnet18", input_size=64)
    cfg = {
        "arch": "resnet18",
        "classes": ["non-covid", "covid"],
        "positive_class": "covid",
        "input_size": 64,
        "in_chans": 1,
        "mean": [0.5],
        "std": [0.25],
        "window": [-1350.0, 150.0],
        "slice_threshold": 0.5,
        "default_rule": "threshold-10",
        "consecutive_n": 15,
    }
    return model, save_checkpoint(model, cfg, path)
