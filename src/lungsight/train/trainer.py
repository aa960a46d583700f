"""Patient-grouped k-fold training with early stopping, atomic checkpoints and resume after a kill.

Run folder layout (``--out``)::

    run.json                 the configuration and the command line
    holdout.csv              (``holdout > 0`` only) patients kept out of every fold: data no fold model saw
    fold_1/ ... fold_k/      state.pt (resumable state, deleted once the fold is complete), best.safetensors,
                             history.csv, predictions.csv, val_predictions.csv (the selected model on its
                             validation split, for calibration), metrics.json, done.json (the fold is complete)
    cv_predictions.csv       out-of-fold slice probabilities of every image
    cv_metrics.json          per-fold and mean +/- sd metrics, slice and patient level, every decision rule
    cv_table.md, roc.png, confusion.png
    model.safetensors        (``folds=0`` only) the model fitted on all the data
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lungsight.about import __version__
from lungsight.errors import InputError
from lungsight.fileio import atomic_write_csv, atomic_write_json
from lungsight.models.registry import build_model, get_spec
from lungsight.models.weights import atomic_torch_save, read_checkpoint, save_checkpoint
from lungsight.preprocess.window import LUNG_WINDOW
from lungsight.train.data import POSITIVE, Item, SliceDataset, class_names, read_labels
from lungsight.train.runs import prepare_run_folder
from lungsight.train.splits import class_weights, patient_folds, validation_split

log = logging.getLogger("lungsight.train")


@dataclass
class TrainConfig:
    data: str
    model: str
    out: str
    folds: int = 5
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    weight_decay: float = 1e-4
    input_size: int | None = None
    augment: str | None = None
    pretrained: str | None = None
    patience: int = 10
    min_epochs: int | None = None
    slice_threshold: float = 0.5
    val_fraction: float = 0.15
    holdout: float = 0.0  # share of patients kept out of training and CV (holdout.csv), for honest evaluation
    seed: int = 0
    workers: int = 1
    max_patients: int | None = None
    scheduler: str | None = None  # "cosine", "onecycle" (warm-up, then cosine) or "plateau" (halve after 3 flat epochs)
    task: str = "ct"  # "ct": labels.csv of CT slices; "cxr": X-ray metadata folders (train/cxr.py)
    extra_data: list[str] = field(default_factory=list)  # further X-ray sources (task "cxr")
    scheme: str = "segmented"  # paper 004's X-ray preprocessing (task "cxr")
    segmenter: str | None = None  # X-ray lung segmenter: None = the classical default, or a U-Net file
    cache: str | None = None  # prepared X-rays (task "cxr"; default <out>/cache; safe to share between runs)
    threads: int | None = None  # torch threads (default: every core; 1 is far faster on a machine others share)
    command: str = field(default_factory=lambda: " ".join(["lungsight", *sys.argv[1:]]))

    def resolved(self) -> TrainConfig:
        """Fill unset values from the model's paper defaults."""
        d = get_spec(self.model).defaults
        c = TrainConfig(**asdict(self))
        c.epochs = c.epochs or d.get("epochs", 30)
        c.batch_size = c.batch_size or d.get("batch_size", 16)
        c.lr = c.lr or d.get("lr", 1e-3)
        c.optimizer = c.optimizer or d.get("optimizer", "adamw")
        c.scheduler = c.scheduler or d.get("scheduler", "cosine")
        c.augment = c.augment or d.get("augment", "paper002")
        c.input_size = c.input_size or get_spec(self.model).input_size
        c.min_epochs = max(1, c.epochs // 3) if c.min_epochs is None else max(1, c.min_epochs)
        return c


def _optimizer(name: str, params: Any, lr: float, wd: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=wd)
    if name == "nadam":
        return torch.optim.NAdam(params, lr=lr, weight_decay=wd)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    raise InputError(f"unknown optimizer {name!r}; choose adamw, adam, nadam or sgd")


def model_config(cfg: TrainConfig, classes: list[str]) -> dict[str, Any]:
    """What a saved model needs to be served on exactly the inputs it was trained on."""
    spec = get_spec(cfg.model)
    common = {
        "arch": cfg.model,
        "task": cfg.task,
        "classes": classes,
        "positive_class": POSITIVE if POSITIVE in classes else classes[-1],
        "input_size": cfg.input_size,
        "in_chans": spec.in_chans,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "lungsight_version": __version__,
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
    }
    if cfg.task == "cxr":
        from lungsight.train.cxr import PREP_SIZE, XR_LUNG_SHARE_FLAG

        return common | {
            "modality": "XR",
            "scheme": cfg.scheme,
            "segmenter": cfg.segmenter,
            "prep_size": PREP_SIZE,
            "lung_share_flag": XR_LUNG_SHARE_FLAG,
        }
    return common | {
        "modality": "CT",
        "window": list(LUNG_WINDOW),
        "slice_threshold": cfg.slice_threshold,
        "default_rule": "threshold-10",
        "consecutive_n": 15,
    }


def _loader(ds: SliceDataset, batch: int, shuffle: bool, workers: int, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        num_workers=workers,
        generator=g,
        persistent_workers=False,
        drop_last=False,
    )


@torch.no_grad()
def predict_items(model: nn.Module, ds: SliceDataset, batch: int, workers: int) -> np.ndarray:
    """Softmax probabilities ``(n, classes)`` for every item of ``ds``, in order."""
    model.eval()
    out = [torch.softmax(model(x), dim=1) for x, _ in _loader(ds, batch, False, workers, 0)]
    return torch.cat(out).numpy() if out else np.zeros((0, len(ds.index)))


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    """AUC of the last (positive) class for two classes; macro one-vs-rest AUC over the classes present for more."""
    from sklearn.metrics import roc_auc_score

    present = sorted(set(y.tolist()))
    if len(present) < 2:
        return float("nan")
    if p.shape[1] == 2:
        return float(roc_auc_score(y == 1, p[:, 1]))
    return float(np.mean([roc_auc_score(y == c, p[:, c]) for c in present]))


class FoldTrainer:
    """Trains one model on ``train_idx``, early-stopping on ``val_idx``; resumable from ``fold_dir/state.pt``."""

    def __init__(self, cfg: TrainConfig, items: list[Item], classes: list[str], fold_dir: Path) -> None:
        self.cfg, self.items, self.classes, self.dir = cfg, items, classes, fold_dir
        self.spec = get_spec(cfg.model)

    def make_ds(self, idx: np.ndarray, augment: str) -> SliceDataset:
        """The items at ``idx`` as model inputs, with the given augmentation."""
        s = self.spec
        return SliceDataset(
            [self.items[i] for i in idx], self.classes, self.cfg.input_size, s.in_chans, s.mean, s.std, augment
        )

    def fit(self, train_idx: np.ndarray, val_idx: np.ndarray | None, tag: str) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, len(self.classes), pretrained=cfg.pretrained, input_size=cfg.input_size)
        model.to(memory_format=torch.channels_last)  # faster on CPU; checkpoints are saved contiguous
        params = [p for p in model.parameters() if p.requires_grad]
        opt = _optimizer(cfg.optimizer, params, cfg.lr, cfg.weight_decay)
        plateau, per_step = cfg.scheduler == "plateau", cfg.scheduler == "onecycle"
        steps = math.ceil(len(train_idx) / cfg.batch_size)
        sched: Any
        if plateau:
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3)
        elif per_step:  # warm-up over the first 15 % of the steps, then cosine decay: for fine-tuning
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.15
            )
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
        weights = torch.tensor(class_weights(self.items, train_idx, self.classes), dtype=torch.float32)
        loss_fn = nn.CrossEntropyLoss(weight=weights)
        state_path, best_path = self.dir / "state.pt", self.dir / "best.safetensors"
        st = {"epoch": 0, "best_score": -math.inf, "best_epoch": 0, "bad_epochs": 0, "history": []}
        if state_path.exists():
            saved = torch.load(state_path, map_location="cpu", weights_only=True)
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["optimizer"])
            sched.load_state_dict(saved["scheduler"])
            st = saved["progress"]
            print(f"[{tag}] resuming after epoch {st['epoch']}", flush=True)
        train_ds = self.make_ds(train_idx, cfg.augment)
        val_ds = self.make_ds(val_idx, "none") if val_idx is not None and len(val_idx) else None
        y_val = np.array([self.classes.index(self.items[i].label) for i in val_idx]) if val_ds else None
        for epoch in range(st["epoch"] + 1, cfg.epochs + 1):
            if st["bad_epochs"] >= cfg.patience:
                break
            t0 = time.perf_counter()
            model.train()
            total, n = 0.0, 0
            loader = _loader(train_ds, cfg.batch_size, True, cfg.workers, cfg.seed * 1000 + epoch)
            bar = tqdm(loader, desc=f"[{tag}] epoch {epoch}/{cfg.epochs}", leave=False, disable=None)
            for x, y in bar:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                if per_step:
                    sched.step()
                total += loss.item() * len(y)
                n += len(y)
                bar.set_postfix(loss=f"{total / n:.4f}")
            if not plateau and not per_step:
                sched.step()
            row = {"epoch": epoch, "train_loss": total / max(n, 1), "lr": opt.param_groups[0]["lr"]}
            if val_ds is not None:
                pv = predict_items(model, val_ds, cfg.batch_size, cfg.workers)
                row["val_loss"] = float(
                    nn.functional.nll_loss(torch.log(torch.tensor(pv) + 1e-8), torch.tensor(y_val), weight=weights)
                )
                row["val_auc"] = _auc(y_val, pv)
                score = row["val_auc"] if not math.isnan(row["val_auc"]) else -row["val_loss"]
            else:
                score = epoch  # no validation: the last epoch is the model
            if plateau:
                sched.step(score if val_ds is not None else -row["train_loss"])
            row["seconds"] = time.perf_counter() - t0
            st["history"].append(row)
            st["epoch"] = epoch
            # Warm-up: before min_epochs no model is selected (a small validation split can favour an untrained
            # model by chance) and patience does not run.
            if epoch >= cfg.min_epochs and score > st["best_score"]:
                st.update(best_score=score, best_epoch=epoch, bad_epochs=0)
                save_checkpoint(model, model_config(cfg, self.classes) | {"epoch": epoch}, best_path)
            elif epoch >= cfg.min_epochs:
                st["bad_epochs"] += 1
            atomic_torch_save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "progress": st,
                },
                state_path,
            )
            atomic_write_csv(self.dir / "history.csv", st["history"])
            shown = ", ".join(f"{k} {v:.4g}" for k, v in row.items() if k not in ("epoch",))
            print(f"[{tag}] epoch {epoch}/{cfg.epochs}: {shown}", flush=True)
        state, _ = read_checkpoint(best_path)
        model.load_state_dict(state)
        model.eval()
        return model


def finish_fold(fold_dir: Path, record: dict[str, Any]) -> None:
    """Mark a fold complete (``done.json``) and delete its resumable state, which is no longer needed.

    The state holds the weights and the optimiser's moments (two to four times the model's size): kept for every
    fold of every run of a bench it fills a disk. ``best.safetensors`` stays.
    """
    atomic_write_json(fold_dir / "done.json", record)
    (fold_dir / "state.pt").unlink(missing_ok=True)


def _write_predictions(
    path: Path, items: list[Item], idx: np.ndarray, probs: np.ndarray, fold: int, classes: list[str]
) -> list[dict[str, Any]]:
    rows = [
        {
            "file": str(items[i].path),
            "patient_id": items[i].patient_id,
            "label": items[i].label,
            "fold": fold,
            "p": float(probs[j, -1]),
            **{f"p_{c}": float(probs[j, k]) for k, c in enumerate(classes)},
        }
        for j, i in enumerate(idx)
    ]
    atomic_write_csv(path, rows)
    return rows


def _subset_patients(items: list[Item], max_patients: int | None, seed: int) -> list[Item]:
    if not max_patients:
        return items
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for it in items:
        by_label.setdefault(it.label, [])
        if it.patient_id not in by_label[it.label]:
            by_label[it.label].append(it.patient_id)
    keep: set[str] = set()
    for pats in by_label.values():
        keep |= set(rng.permutation(pats)[: max(2, max_patients // len(by_label))].tolist())
    return [it for it in items if it.patient_id in keep]


def hold_out(items: list[Item], fraction: float, seed: int, path: Path) -> list[Item]:
    """Keep about ``fraction`` of the patients (stratified by label) out of training; list them in ``path``.

    The kept-out patients are written to ``path`` (file, label, patient_id) and the remaining items are returned.
    Deterministic for a seed, so a resumed run holds out the same patients.
    """
    if not 0 < fraction < 1:
        raise InputError(f"--holdout {fraction}: give a share of patients between 0 and 1")
    rest, held = validation_split(items, np.arange(len(items)), fraction, seed + 7919)
    atomic_write_csv(
        path, [{"file": str(items[i].path), "label": items[i].label, "patient_id": items[i].patient_id} for i in held]
    )
    return [items[i] for i in rest]


#: Settings that must not change when a run is resumed.
RESUME_KEYS = (
    "data",
    "model",
    "folds",
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "input_size",
    "augment",
    "seed",
    "scheduler",
    "task",
    "extra_data",
    "scheme",
    "segmenter",
    "holdout",
)


def prepare_run(cfg: TrainConfig, resume: bool) -> tuple[Path, TrainConfig]:
    """Create the run folder; refuse to write into a non-empty one unless resuming the same configuration.
    Returns the folder and ``cfg`` with the command line that started the run (a resumed run's tables and model
    name the original command, not ``--resume``'s)."""
    out = prepare_run_folder(
        Path(cfg.out), asdict(cfg), resume, RESUME_KEYS, defaults={"holdout": 0.0}, path_keys=("data", "extra_data")
    )
    first = json.loads((out / "run.json").read_text()).get("command") or cfg.command
    return out, replace(cfg, command=first)


def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run cross-validation (``folds >= 2``) or a final fit on all data (``folds == 0``). Returns the summary."""
    torch.set_num_threads(cfg.threads or max(1, os.cpu_count() or 1))
    cfg = cfg.resolved()
    if cfg.holdout and cfg.task != "ct":
        raise InputError("--holdout is implemented for CT runs (task ct) only")
    if cfg.task == "cxr":
        from lungsight.train.cxr import train_cxr

        return train_cxr(cfg, resume=resume)
    if cfg.task != "ct":
        raise InputError(f"unknown task {cfg.task!r}; choose ct or cxr")
    items = _subset_patients(read_labels(Path(cfg.data)), cfg.max_patients, cfg.seed)
    classes = class_names(items)
    if len(classes) < 2:
        raise InputError(f"{cfg.data}: need at least two labels, found {classes}")
    if cfg.pretrained:  # obtain the weights (or fail with the way forward) before a run folder exists
        build_model(cfg.model, len(classes), pretrained=cfg.pretrained, input_size=cfg.input_size)
    out, cfg = prepare_run(cfg, resume)
    if cfg.holdout:
        items = hold_out(items, cfg.holdout, cfg.seed, out / "holdout.csv")
    n_pat = len({it.patient_id for it in items})
    print(
        f"{len(items)} images, {n_pat} patients, classes {classes}; model {cfg.model} at {cfg.input_size}px",
        flush=True,
    )
    if cfg.folds == 0:
        trainer = FoldTrainer(cfg, items, classes, out / "full")
        (out / "full").mkdir(exist_ok=True)
        model = trainer.fit(np.arange(len(items)), None, "all data")
        save_checkpoint(model, model_config(cfg, classes), out / "model.safetensors")
        print(f"model written to {out / 'model.safetensors'}", flush=True)
        return {"model": str(out / "model.safetensors")}
    all_rows: list[dict[str, Any]] = []
    for k, (train_idx, test_idx) in enumerate(patient_folds(items, cfg.folds, cfg.seed), start=1):
        fold_dir = out / f"fold_{k}"
        fold_dir.mkdir(exist_ok=True)
        done = fold_dir / "done.json"
        if done.exists():
            print(f"[fold {k}/{cfg.folds}] already complete", flush=True)
            with open(fold_dir / "predictions.csv", newline="") as f:
                all_rows += [dict(r) for r in csv.DictReader(f)]
            continue
        tr, va = validation_split(items, train_idx, cfg.val_fraction, cfg.seed + k)
        tag = f"fold {k}/{cfg.folds}"
        print(f"[{tag}] train {len(tr)} / val {len(va)} / test {len(test_idx)} images", flush=True)
        trainer = FoldTrainer(cfg, items, classes, fold_dir)
        model = trainer.fit(tr, va, tag)
        test_ds = trainer.make_ds(test_idx, "none")
        probs = predict_items(model, test_ds, cfg.batch_size, cfg.workers)
        rows = _write_predictions(fold_dir / "predictions.csv", items, test_idx, probs, k, classes)
        val_probs = predict_items(model, trainer.make_ds(va, "none"), cfg.batch_size, cfg.workers)
        _write_predictions(fold_dir / "val_predictions.csv", items, va, val_probs, k, classes)
        all_rows += rows
        finish_fold(fold_dir, {"fold": k, "n_test": len(test_idx)})
    from lungsight.train.report import write_cv_report

    return write_cv_report(out, all_rows, classes, cfg)
