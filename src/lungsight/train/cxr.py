"""Three-class chest X-ray training (paper 004): patient-grouped CV with the evidence-in-lung share of every fold.

The X-ray path differs from the CT one in its data (metadata folders of several sources, read by
:mod:`lungsight.train.cxr_data`) and its preprocessing (lung segmentation, then paper 004's ``raw``, ``cropped``
or ``segmented`` scheme, :mod:`lungsight.preprocess.xray`). Segmenting an X-ray costs more than a training step,
so every image is prepared once into ``cache/`` of the run folder (one small ``.npz`` per image: the scheme's
output and the lung mask in the same frame) and batches stream from there; augmentation is applied on top.

After each fold, the held-out images are classified and explained: the Grad-CAM map of the predicted class is
compared with the lung mask (:func:`lungsight.explain.gradcam.cam_energy_inside`), so the CV report holds the
share of evidence inside the lungs next to the accuracy figures - the number paper 004 showed only as pictures.
Run folder additions to the CT layout: ``cache/``, and per fold ``features.npy`` (penultimate-layer features of
the held-out images, for the t-SNE pictures).
"""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lungsight.errors import InputError
from lungsight.explain.gradcam import GradCAM, cam_energy_inside
from lungsight.fileio import atomic_write, atomic_write_csv, atomic_write_text, ensure_dir
from lungsight.models.registry import build_model
from lungsight.models.weights import save_checkpoint
from lungsight.preprocess.transforms import unfit_square
from lungsight.preprocess.window import to_unit
from lungsight.train.cxr_data import CXR_CLASSES, CxrRecord, read_cxr_datasets, sensor_hint
from lungsight.train.data import SliceDataset
from lungsight.train.splits import patient_folds, validation_split
from lungsight.train.trainer import (
    FoldTrainer,
    TrainConfig,
    _subset_patients,
    finish_fold,
    model_config,
    predict_items,
    prepare_run,
)

#: Side of the square every scheme's output is cached at (the model input is resized from it).
PREP_SIZE = 256
#: A prediction whose Grad-CAM energy inside the lungs is below this share is flagged (evidence mostly outside).
XR_LUNG_SHARE_FLAG = 0.5
#: Attributes of every image that the bias audit splits by.
AUDIT_KEYS = ("sex", "view", "source", "sensor")


def read_xray_unit(path: Path) -> np.ndarray:
    """One X-ray file -> ``(H, W)`` float32 grey values in [0, 1], with the reader used at prediction time."""
    from lungsight.io import load_study

    study = load_study(path, modality="XR")
    return to_unit(study.pixels[0], study.intensity)


def _cache_key(path: Path, scheme: str, segmenter: str) -> str:
    text = f"{path.resolve()}|{path.stat().st_size}|{scheme}|{segmenter}|{PREP_SIZE}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def prepare_cache(records: list[CxrRecord], scheme: str, segmenter: str | None, folder: Path) -> list[Path]:
    """Prepare every record once (segment, apply the scheme) into ``folder``; returns one ``.npz`` per record."""
    from lungsight.preprocess.lung_fields import load_segmenter, segmenter_fingerprint
    from lungsight.preprocess.xray import prepare_xray

    ensure_dir(folder)
    seg = load_segmenter(segmenter)
    fingerprint = segmenter_fingerprint(segmenter)
    files, fallbacks = [], 0
    for r in tqdm(records, desc=f"preparing X-rays ({scheme})", disable=None):
        target = folder / f"{_cache_key(r.path, scheme, fingerprint)}.npz"
        files.append(target)
        if target.exists():
            continue
        x = prepare_xray(read_xray_unit(r.path), scheme, seg, PREP_SIZE)
        fallbacks += not x.mask_ok
        buf = io.BytesIO()
        np.savez(
            buf,
            image=(np.clip(x.image, 0, 1) * 255 + 0.5).astype(np.uint8),
            mask=x.lung_mask.astype(bool),
            mask_ok=np.array(x.mask_ok),
        )
        data = buf.getvalue()
        atomic_write(target, lambda tmp, data=data: tmp.write_bytes(data))
    if fallbacks:
        print(f"{fallbacks} of {len(records)} lung masks were implausible; their scheme fell back", flush=True)
    return files


def load_prepared(path: Path) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(image in [0, 1], lung mask, mask plausible)`` from a cache file."""
    with np.load(path) as z:
        return z["image"].astype(np.float32) / 255.0, z["mask"], bool(z["mask_ok"])


class XrayDataset(SliceDataset):
    """Prepared X-rays (``files``, one per record, from :func:`prepare_cache`) -> (normalised tensor, class index)."""

    def __init__(
        self,
        records: list[CxrRecord],
        files: list[Path],
        classes: list[str],
        size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "none",
    ) -> None:
        super().__init__(records, classes, size, in_chans, mean, std, augment)  # type: ignore[arg-type]
        self.files = files

    def image(self, i: int) -> np.ndarray:
        return load_prepared(self.files[i])[0]


class XrayFoldTrainer(FoldTrainer):
    """:class:`FoldTrainer` on prepared X-rays."""

    def __init__(
        self, cfg: TrainConfig, items: list[CxrRecord], classes: list[str], fold_dir: Path, files: list[Path]
    ) -> None:
        super().__init__(cfg, items, classes, fold_dir)  # type: ignore[arg-type]
        self.files = files

    def make_ds(self, idx: np.ndarray, augment: str) -> XrayDataset:  # type: ignore[override]
        s = self.spec
        return XrayDataset(
            [self.items[i] for i in idx],  # type: ignore[misc]
            [self.files[i] for i in idx],
            self.classes,
            self.cfg.input_size,
            s.in_chans,
            s.mean,
            s.std,
            augment,
        )


def evidence_shares(
    model: nn.Module, ds: XrayDataset, predicted: np.ndarray, batch: int = 16
) -> list[tuple[float | None, float, bool]]:
    """Per image of ``ds``: the share of the predicted class's Grad-CAM energy inside the (undilated) lung mask,
    the share of the frame the mask covers - what a map spread evenly over the image would score - and whether
    the mask was plausible."""
    shares: list[tuple[float | None, float, bool]] = []
    model.eval()
    with GradCAM(model, model.cam_layer) as cam:
        for start in range(0, len(ds), batch):
            idx = range(start, min(start + batch, len(ds)))
            x = torch.stack([ds[i][0] for i in idx])
            maps = cam(x, [int(predicted[i]) for i in idx])
            for k, i in enumerate(idx):
                _, mask, mask_ok = load_prepared(ds.files[i])
                full = unfit_square(maps[k : k + 1], *mask.shape)[0]
                shares.append((cam_energy_inside(full, mask), float(mask.mean()), mask_ok))
    return shares


def fold_features(model: nn.Module, ds: XrayDataset, batch: int = 32) -> np.ndarray:
    """Penultimate-layer features of every image of ``ds`` (for the t-SNE pictures)."""
    from lungsight.evaluate.embedding import penultimate_features

    loader = DataLoader(ds, batch_size=batch, shuffle=False)
    return penultimate_features(model, (x for x, _ in loader))


def _classes(records: list[CxrRecord]) -> list[str]:
    present = {r.label for r in records}
    return [c for c in CXR_CLASSES if c in present]


def _rows(
    records: list[CxrRecord],
    idx: np.ndarray,
    probs: np.ndarray,
    shares: list[tuple[float | None, float, bool]],
    fold: int,
    classes: list[str],
) -> list[dict[str, Any]]:
    return [
        {
            "file": records[i].path.name,
            "patient_id": records[i].patient_id,
            "label": records[i].label,
            "fold": fold,
            "predicted": classes[int(np.argmax(probs[j]))],
            **{f"p_{c}": float(probs[j, k]) for k, c in enumerate(classes)},
            "lung_share": "" if shares[j][0] is None else float(shares[j][0]),
            "lung_area": shares[j][1],
            "mask_ok": int(shares[j][2]),
            **{key: getattr(records[i], key) or "unknown" for key in ("sex", "view", "source")},
            "sensor": sensor_hint(records[i].path.name),
        }
        for j, i in enumerate(idx)
    ]


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # np.save on a path would append ".npy" to the temporary name
        np.save(f, array)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [dict(r) for r in csv.DictReader(f)]


def train_cxr(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Cross-validation (``folds >= 2``) or a final fit (``folds == 0``) of a three-class X-ray model."""
    from lungsight.preprocess.xray import SCHEMES

    if cfg.scheme not in SCHEMES:
        raise InputError(f"unknown scheme {cfg.scheme!r}; choose one of {', '.join(SCHEMES)}")
    roots = [Path(cfg.data), *map(Path, cfg.extra_data)]
    records, left_out = read_cxr_datasets(roots)
    records = _subset_patients(records, cfg.max_patients, cfg.seed)  # type: ignore[arg-type]
    classes = _classes(records)
    if len(classes) < 2:
        raise InputError(f"{', '.join(map(str, roots))}: need at least two classes, found {classes}")
    if cfg.pretrained:
        build_model(cfg.model, len(classes), pretrained=cfg.pretrained, input_size=cfg.input_size)
    out, cfg = prepare_run(cfg, resume)
    atomic_write_csv(out / "left_out.csv", [{"file": f, "reason": why} for f, why in left_out])
    counts = {c: sum(r.label == c for r in records) for c in classes}
    n_pat = len({r.patient_id for r in records})
    print(
        f"{len(records)} X-rays, {n_pat} patients, {counts} ({len(left_out)} rows left out, see left_out.csv); "
        f"model {cfg.model} at {cfg.input_size}px, scheme {cfg.scheme}",
        flush=True,
    )
    files = prepare_cache(records, cfg.scheme, cfg.segmenter, Path(cfg.cache) if cfg.cache else out / "cache")
    if cfg.folds == 0:
        (out / "full").mkdir(exist_ok=True)
        model = XrayFoldTrainer(cfg, records, classes, out / "full", files).fit(
            np.arange(len(records)), None, "all data"
        )
        save_checkpoint(model, model_config(cfg, classes), out / "model.safetensors")
        print(f"model written to {out / 'model.safetensors'}", flush=True)
        return {"model": str(out / "model.safetensors")}
    rows: list[dict[str, Any]] = []
    features: list[np.ndarray] = []
    for k, (train_idx, test_idx) in enumerate(patient_folds(records, cfg.folds, cfg.seed), start=1):  # type: ignore[arg-type]
        fold_dir = out / f"fold_{k}"
        fold_dir.mkdir(exist_ok=True)
        if (fold_dir / "done.json").exists():
            print(f"[fold {k}/{cfg.folds}] already complete", flush=True)
            rows += _read_rows(fold_dir / "predictions.csv")
            features.append(np.load(fold_dir / "features.npy"))
            continue
        tr, va = validation_split(records, train_idx, cfg.val_fraction, cfg.seed + k)  # type: ignore[arg-type]
        tag = f"fold {k}/{cfg.folds}"
        print(f"[{tag}] train {len(tr)} / val {len(va)} / test {len(test_idx)} X-rays", flush=True)
        trainer = XrayFoldTrainer(cfg, records, classes, fold_dir, files)
        model = trainer.fit(tr, va, tag)
        test_ds = trainer.make_ds(test_idx, "none")
        probs = predict_items(model, test_ds, cfg.batch_size, cfg.workers)
        shares = evidence_shares(model, test_ds, probs.argmax(axis=1))
        fold_rows = _rows(records, test_idx, probs, shares, k, classes)
        feats = fold_features(model, test_ds)
        atomic_write(fold_dir / "features.npy", lambda tmp, a=feats: _save_npy(tmp, a))
        atomic_write_csv(fold_dir / "predictions.csv", fold_rows)
        finish_fold(fold_dir, {"fold": k, "n_test": len(test_idx)})
        rows += fold_rows
        features.append(feats)
    return write_cxr_cv_report(out, rows, classes, cfg, np.concatenate(features))


def share_summary(shares: list[float], areas: list[float]) -> dict[str, Any]:
    """Evidence-in-lung figures over images: mean/median share, the fraction flagged, and the chance level (the
    mean share of the frame the lungs cover: a map spread evenly over the image scores that much)."""
    a, area = np.array(shares, dtype=float), np.array(areas, dtype=float)
    if not len(a):
        return {"n": 0, "mean": None, "median": None, "flagged_fraction": None, "chance_level": None}
    if len(area) != len(a):  # a run written before the lung area was recorded
        area = np.array([])
    return {
        "n": len(a),
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "flagged_fraction": float(np.mean(a < XR_LUNG_SHARE_FLAG)),
        "chance_level": float(area.mean()) if len(area) else None,
        "flag_below": XR_LUNG_SHARE_FLAG,
    }


def write_cxr_cv_report(
    out: Path, rows: list[dict[str, Any]], classes: list[str], cfg: TrainConfig, features: np.ndarray
) -> dict[str, Any]:
    """cv_predictions.csv, cv_metrics.json (pooled + per fold + mean ± sd + lung shares), cv_table.md, pictures."""
    from lungsight.evaluate.multiclass import (
        multiclass_fold_table_markdown,
        multiclass_metrics,
        summarize_multiclass_folds,
        write_multiclass_evaluation,
    )

    atomic_write_csv(out / "cv_predictions.csv", rows)
    y = np.array([classes.index(r["label"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    explained = [r for r in rows if r["lung_share"] not in ("", None)]
    shares = [float(r["lung_share"]) for r in explained]
    areas = [float(r["lung_area"]) for r in explained if r.get("lung_area") not in ("", None)]
    per_fold = []
    for k in sorted({int(r["fold"]) for r in rows}):
        sel = [i for i, r in enumerate(rows) if int(r["fold"]) == k]
        m = multiclass_metrics(y[sel], probs[sel], classes)
        fold_shares = [float(rows[i]["lung_share"]) for i in sel if rows[i]["lung_share"] not in ("", None)]
        per_fold.append({"fold": k, **m, "lung_share": float(np.mean(fold_shares)) if fold_shares else None})
    lung = share_summary(shares, areas)
    result = write_multiclass_evaluation(
        out,
        y,
        probs,
        classes,
        [r["patient_id"] for r in rows],
        attributes={key: [r.get(key, "unknown") for r in rows] for key in AUDIT_KEYS},
        by=AUDIT_KEYS,
        embeddings=features,
        extra={
            "per_fold": per_fold,
            "mean_sd": summarize_multiclass_folds(per_fold),
            "evidence_in_lung": lung,
            "scheme": cfg.scheme,
            "model": cfg.model,
            "command": cfg.command,
        },
        metrics_name="cv_metrics.json",
    )
    chance = "" if lung["chance_level"] is None else f" (chance level {lung['chance_level']:.3f}: the lungs' share"
    chance += "" if lung["chance_level"] is None else " of the frame, what an evenly spread map would score)"
    share_text = (
        f"mean {lung['mean']:.3f}, median {lung['median']:.3f}{chance}; {100 * lung['flagged_fraction']:.1f} % of "
        f"predictions flagged (< {XR_LUNG_SHARE_FLAG})"
        if lung["n"]
        else "not measured"
    )
    atomic_write_text(
        out / "cv_table.md",
        f"# Cross-validation: {cfg.model}, scheme {cfg.scheme}\n\nCommand: `{cfg.command}`\n\n"
        f"{multiclass_fold_table_markdown(per_fold)}\n\nEvidence in the lungs (Grad-CAM energy share): "
        f"{share_text}\n",
    )
    print(
        f"CV ({cfg.scheme}): macro AUC {result.get('macro_auc')}, balanced accuracy "
        f"{result.get('balanced_accuracy')}, evidence in lungs {share_text}",
        flush=True,
    )
    return result
