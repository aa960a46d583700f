"""Training the view classifier: frontal chest X-ray vs lateral chest X-ray vs CT slice (``view-cnn``).

Data: the ``view`` column of the Cohen collection's ``metadata.csv`` (PA, AP, AP Supine -> frontal; L -> lateral;
every finding, since the view does not depend on it) and the CT slices of ``covid-ct`` (``labels.csv``) as the third
class. Patient-grouped k-fold cross-validation reports accuracy, per-class recall (lateral recall matters most: a
missed lateral reaches the frontal-only X-ray model) and the confusion matrix; then one model is fitted on all the
data with the same settings and a fixed number of epochs, so that the CV figures describe exactly that procedure.

Run folder (``--out``)::

    run.json            the configuration
    cv_predictions.csv  out-of-fold probabilities of every image (with --folds k)
    cv_metrics.json     per-fold and pooled accuracy, balanced accuracy, per-class recall/precision, confusion
    confusion.png       pooled out-of-fold confusion matrix
    model.safetensors   the model fitted on all the data

Command: ``lungsight train-view --cohen ../shared/data/cxr-cohen --ct ../shared/data/covid-ct --out runs/view``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from torch import nn

from lungsight.about import __version__
from lungsight.errors import InputError
from lungsight.fileio import atomic_write_csv, atomic_write_json, ensure_dir
from lungsight.io import load_study
from lungsight.io.contract import view_kind
from lungsight.models.registry import build_model, get_spec
from lungsight.models.view import VIEW_CLASSES
from lungsight.models.weights import save_checkpoint
from lungsight.preprocess.transforms import augmentation, fit_square, normalise
from lungsight.preprocess.window import LUNG_WINDOW, to_unit
from lungsight.train.cxr_data import read_cxr_table
from lungsight.train.data import Item, read_labels
from lungsight.train.splits import class_weights, patient_folds

ARCH = "view-cnn"


@dataclass
class ViewTrainConfig:
    """Settings of one view-classifier run (defaults: the bundled ``xr-view``)."""

    cohen: str
    ct: str
    out: str
    folds: int = 5
    epochs: int = 30
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    input_size: int = 128
    augment: str = "light"
    seed: int = 0
    threads: int = 1
    command: str = field(default_factory=lambda: " ".join(["lungsight", *sys.argv[1:]]))


def view_items(cohen: Path, ct: Path) -> list[Item]:
    """Labelled images: Cohen X-rays by their ``view`` (frontal/lateral; other views and non-X-ray rows skipped)
    and covid-ct slices as ``ct``. Patient ids are prefixed with the source (``cohen:2``, ``covid-ct:...``)."""
    table = read_cxr_table(Path(cohen))
    items: list[Item] = []
    for row in table.rows:
        kind = view_kind(row.get("view", ""))
        path = table.image_dir / row["file"]
        x_ray = row.get("modality", "X-ray").lower() in ("x-ray", "")
        if kind not in ("frontal", "lateral") or not x_ray or not row.get("patientid"):
            continue
        if not path.is_file():
            raise InputError(f"{table.csv_path}: {path} does not exist")
        items.append(Item(path, kind, f"cohen:{row['patientid']}"))
    items += [Item(it.path, "ct", f"covid-ct:{it.patient_id}") for it in read_labels(Path(ct))]
    present = {it.label for it in items}
    if present != set(VIEW_CLASSES):
        raise InputError(f"{cohen}, {ct}: need frontal, lateral and CT images; found only {sorted(present)}")
    return items


def load_view_image(path: Path, kind: str, size: int) -> torch.Tensor:
    """One image as the classifier sees it: read by :func:`lungsight.io.load_study` (X-rays with
    ``modality="XR"``), mapped to [0, 1] by :func:`~lungsight.preprocess.window.to_unit`, resized to ``size``."""
    study = load_study(path, modality="CT" if kind == "ct" else "XR")
    return fit_square(to_unit(study.pixels[0], study.intensity), size)[0]


def _fit(images: torch.Tensor, y: np.ndarray, weights: list[float], cfg: ViewTrainConfig, tag: str) -> nn.Module:
    spec = get_spec(ARCH)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = build_model(ARCH, len(VIEW_CLASSES), input_size=cfg.input_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    augment = augmentation(cfg.augment)
    targets = torch.as_tensor(y, dtype=torch.long)
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        total = 0.0
        order = rng.permutation(len(y))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            x = images[idx]
            if augment is not None:
                x = torch.stack([augment(img[None])[0] for img in x]).clamp_(0.0, 1.0)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(normalise(x, spec.in_chans, spec.mean, spec.std)), targets[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        sched.step()
        if epoch == 1 or epoch % 5 == 0 or epoch == cfg.epochs:
            seconds = time.perf_counter() - t0
            print(f"[{tag}] epoch {epoch}/{cfg.epochs}: loss {total / len(y):.4f} ({seconds:.1f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def _predict(model: nn.Module, images: torch.Tensor, batch: int = 128) -> np.ndarray:
    spec = get_spec(ARCH)
    out = [
        torch.softmax(model(normalise(images[i : i + batch], spec.in_chans, spec.mean, spec.std)), dim=1)
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).numpy()


def view_metrics(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """Accuracy, balanced accuracy, recall and precision per class, and the confusion matrix (rows: true)."""
    k = len(VIEW_CLASSES)
    cm = confusion_matrix(y, pred, labels=list(range(k)))
    recall = {c: float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None for i, c in enumerate(VIEW_CLASSES)}
    precision = {c: float(cm[i, i] / cm[:, i].sum()) if cm[:, i].sum() else None for i, c in enumerate(VIEW_CLASSES)}
    present = [r for r in recall.values() if r is not None]
    return {
        "n": len(y),
        "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
        "balanced_accuracy": float(np.mean(present)) if present else None,
        "recall": recall,
        "precision": precision,
        "confusion": cm.tolist(),
    }


def _mean_sd(values: list[float | None]) -> dict[str, float] | None:
    real = [v for v in values if v is not None]
    return {"mean": float(np.mean(real)), "sd": float(np.std(real, ddof=1)) if len(real) > 1 else 0.0} if real else None


def _model_config(cfg: ViewTrainConfig, cv: dict[str, Any] | None) -> dict[str, Any]:
    spec = get_spec(ARCH)
    return {
        "arch": ARCH,
        "task": "view",
        "classes": list(VIEW_CLASSES),
        "input_size": cfg.input_size,
        "in_chans": spec.in_chans,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "window": list(LUNG_WINDOW),
        "lungsight_version": __version__,
        "training": {k: v for k, v in asdict(cfg).items() if k != "out"},
        "cv": cv,
    }


def train_view(cfg: ViewTrainConfig) -> dict[str, Any]:
    """Cross-validate (``folds >= 2``) and fit the final model on all data; ``folds == 0``: the final fit only.

    Returns the CV summary (``None`` for ``folds == 0``) and the model path. Torch runs on ``cfg.threads`` threads
    meanwhile, and on as many as before afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, cfg.threads))
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(previous)


def _run(cfg: ViewTrainConfig) -> dict[str, Any]:
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: folder exists and is not empty; choose a new --out")
    if cfg.folds == 1 or cfg.folds < 0:
        raise InputError(f"--folds must be 0 (final fit only) or at least 2, not {cfg.folds}")
    items = view_items(Path(cfg.cohen), Path(cfg.ct))
    ensure_dir(out)
    atomic_write_json(out / "run.json", asdict(cfg))
    counts = {c: sum(it.label == c for it in items) for c in VIEW_CLASSES}
    n_patients = len({it.patient_id for it in items})
    print(f"{len(items)} images ({counts}), {n_patients} patients; reading at {cfg.input_size} px", flush=True)
    t0 = time.perf_counter()
    images = torch.stack([load_view_image(it.path, it.label, cfg.input_size) for it in items])
    print(f"read in {time.perf_counter() - t0:.0f} s", flush=True)
    y = np.array([VIEW_CLASSES.index(it.label) for it in items])
    classes = list(VIEW_CLASSES)

    summary: dict[str, Any] | None = None
    if cfg.folds:
        probs = np.zeros((len(items), len(classes)))
        fold_of = np.zeros(len(items), dtype=int)
        per_fold = []
        for k, (train_idx, test_idx) in enumerate(patient_folds(items, cfg.folds, cfg.seed), start=1):
            weights = class_weights(items, train_idx, classes)
            model = _fit(images[train_idx], y[train_idx], weights, cfg, f"fold {k}/{cfg.folds}")
            probs[test_idx] = _predict(model, images[test_idx])
            fold_of[test_idx] = k
            per_fold.append(view_metrics(y[test_idx], probs[test_idx].argmax(1)))
            shown = ", ".join(f"{c} {r:.3f}" for c, r in per_fold[-1]["recall"].items() if r is not None)
            print(f"[fold {k}/{cfg.folds}] accuracy {per_fold[-1]['accuracy']:.3f}; recall {shown}", flush=True)
        pred = probs.argmax(1)
        pooled = view_metrics(y, pred)
        summary = {
            "folds": cfg.folds,
            "pooled": pooled,
            "per_fold": per_fold,
            "accuracy": _mean_sd([f["accuracy"] for f in per_fold]),
            "balanced_accuracy": _mean_sd([f["balanced_accuracy"] for f in per_fold]),
            "recall": {c: _mean_sd([f["recall"][c] for f in per_fold]) for c in classes},
            "classes": classes,
            "counts": counts,
            "patients": n_patients,
        }
        rows = [
            {
                "file": str(it.path),
                "patient_id": it.patient_id,
                "kind": it.label,
                "fold": int(fold_of[i]),
                "predicted": classes[pred[i]],
                **{f"p_{c}": float(probs[i, j]) for j, c in enumerate(classes)},
            }
            for i, it in enumerate(items)
        ]
        atomic_write_csv(out / "cv_predictions.csv", rows)
        atomic_write_json(out / "cv_metrics.json", summary)
        from lungsight.evaluate.plots import plot_confusion

        plot_confusion(y, pred, classes, out / "confusion.png", normalize=True, title="view classifier, out-of-fold")
        print(
            f"CV: accuracy {pooled['accuracy']:.3f}, balanced accuracy {pooled['balanced_accuracy']:.3f}, "
            f"lateral recall {pooled['recall']['lateral']:.3f}; confusion (rows true {classes}) {pooled['confusion']}",
            flush=True,
        )

    model = _fit(images, y, class_weights(items, np.arange(len(items)), classes), cfg, "all data")
    cv_brief = None
    if summary is not None:
        pooled = summary["pooled"]
        cv_brief = {
            "folds": cfg.folds,
            "accuracy": pooled["accuracy"],
            "balanced_accuracy": pooled["balanced_accuracy"],
            "recall": pooled["recall"],
            "confusion": pooled["confusion"],
        }
    path = save_checkpoint(model, _model_config(cfg, cv_brief), out / "model.safetensors")
    print(f"model written to {path}", flush=True)
    return {"cv": summary, "model": str(path)}
