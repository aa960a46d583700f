"""The CNNs' hand-crafted yardstick under the same patient-grouped folds (``lungsight.evaluate.texture``).

    # X-rays, three classes: prepared exactly as ``lungsight train --task cxr --scheme S`` prepares them
    .venv/bin/python scripts/texture_baseline.py --task cxr --data ../shared/data/cxr-cohen \
        --data ../shared/data/cxr-actualmed --scheme segmented --cache runs/cxr-cache --out runs/texture-cxr.json
    # CT slices, covid vs non-covid: read and windowed as ``lungsight train`` reads them, whole slice, 256 px
    .venv/bin/python scripts/texture_baseline.py --task ct --data ../shared/data/covid-ct --out runs/texture-ct.json

    # the same logistic regression on frozen ImageNet features (a linear probe of efficientnet-lite0's pooled
    # 1280 features; its offline weights) instead of the 47 texture numbers
    .venv/bin/python scripts/texture_baseline.py --task cxr --features imagenet --data ../shared/data/cxr-cohen \
        --data ../shared/data/cxr-actualmed --scheme segmented --cache runs/cxr-cache --out runs/probe-cxr.json

The figures are printed and written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lungsight.evaluate.texture import features_of_cache, texture_baseline_cv, texture_features
from lungsight.fileio import atomic_write_json

CT_SIZE = 256
PROBE_SIZE = 224  # the ImageNet weights' own input size


def imagenet_features(images: list[np.ndarray], size: int = PROBE_SIZE) -> np.ndarray:
    """Pooled penultimate features of the ImageNet efficientnet-lite0, one row per grey image in [0, 1]."""
    import torch

    from lungsight.evaluate.embedding import penultimate_features
    from lungsight.models.registry import build_model, get_spec
    from lungsight.preprocess.transforms import model_batch

    spec = get_spec("efficientnet-lite0")
    model = build_model("efficientnet-lite0", pretrained="imagenet", input_size=size)
    batches = (
        torch.cat([model_batch(u[None], size, 3, spec.mean, spec.std) for u in images[i : i + 16]])
        for i in range(0, len(images), 16)
    )  # one at a time through the resize (the images differ in size), 16 at a time through the network
    return penultimate_features(model, batches)


def _cxr(args: argparse.Namespace) -> dict:
    from lungsight.train.cxr import load_prepared, prepare_cache
    from lungsight.train.cxr_data import CXR_CLASSES, read_cxr_datasets

    if args.cache is None:
        raise SystemExit("--cache is required for --task cxr (the prepared X-rays go there)")
    records, left_out = read_cxr_datasets(args.data)
    files = prepare_cache(records, args.scheme, None, args.cache)
    if args.features == "imagenet":
        features = imagenet_features([load_prepared(f)[0] for f in files])
    else:
        features = features_of_cache(files)
    result = texture_baseline_cv(
        features, [r.label for r in records], records, CXR_CLASSES, folds=args.folds, seed=args.seed
    )
    return result | {"scheme": args.scheme, "left_out": len(left_out)}


def _ct(args: argparse.Namespace) -> dict:
    from lungsight.preprocess.transforms import fit_square
    from lungsight.train.data import class_names, load_unit, read_labels

    if len(args.data) != 1:
        raise SystemExit("--task ct takes one --data folder (labels.csv)")
    items = read_labels(args.data[0])
    if args.features == "imagenet":
        features = imagenet_features([load_unit(it.path) for it in items])
    else:
        rows = []
        for it in items:
            square = fit_square(load_unit(it.path), CT_SIZE)[0].numpy()  # as the CT models' inputs are resized
            rows.append(texture_features(square, np.ones(square.shape, bool)))
        features = np.stack(rows)
    classes = class_names(items)
    return texture_baseline_cv(features, [it.label for it in items], items, classes, folds=args.folds, seed=args.seed)


def _f(value: float | None) -> str:
    """A figure to 3 decimals; ``n/a`` where undefined (a class absent, or one fold only)."""
    return "n/a" if value is None or value != value else f"{value:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", choices=("ct", "cxr"), required=True)
    ap.add_argument("--data", type=Path, action="append", required=True, help="dataset folder (repeatable for cxr)")
    ap.add_argument("--scheme", choices=("raw", "cropped", "segmented"), default="segmented", help="X-rays only")
    ap.add_argument("--cache", type=Path, help="folder for the prepared X-rays (X-rays only)")
    ap.add_argument(
        "--features",
        choices=("texture", "imagenet"),
        default="texture",
        help="texture: the 47 lung-field numbers; imagenet: frozen ImageNet efficientnet-lite0 features (224 px)",
    )
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON file for the figures")
    args = ap.parse_args()
    result = _cxr(args) if args.task == "cxr" else _ct(args)
    result.pop("probabilities")
    result |= {"task": args.task, "features": args.features, "data": [str(d) for d in args.data]}
    print(
        f"{args.task}{' ' + args.scheme if args.task == 'cxr' else ''}: macro AUC {_f(result['macro_auc_mean'])} ± "
        f"{_f(result['macro_auc_sd'])} over {args.folds} folds, pooled {_f(result['pooled_macro_auc'])}; per class "
        + ", ".join(f"{c} {_f(a)}" for c, a in result["pooled_auc_per_class"].items())
    )
    if args.out:
        atomic_write_json(args.out, result)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
