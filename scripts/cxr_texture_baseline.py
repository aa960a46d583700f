"""The X-ray CNN's hand-crafted baseline under the same patient-grouped folds (``lungsight.evaluate.texture``).

    .venv/bin/python scripts/cxr_texture_baseline.py --data ../shared/data/cxr-cohen \
        --data ../shared/data/cxr-actualmed --scheme segmented --cache runs/cxr-cache --out runs/texture-segmented.json

The X-rays are prepared exactly as ``lungsight train --task cxr --scheme S`` prepares them (the same cache may be
shared with training runs); the figures are printed and written to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lungsight.evaluate.texture import features_of_cache, texture_baseline_cv
from lungsight.fileio import atomic_write_json
from lungsight.train.cxr import prepare_cache
from lungsight.train.cxr_data import CXR_CLASSES, read_cxr_datasets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, action="append", required=True, help="X-ray dataset folder (repeatable)")
    ap.add_argument("--scheme", choices=("raw", "cropped", "segmented"), default="segmented")
    ap.add_argument("--cache", type=Path, required=True, help="folder for the prepared X-rays")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="JSON file for the figures")
    args = ap.parse_args()
    records, left_out = read_cxr_datasets(args.data)
    files = prepare_cache(records, args.scheme, None, args.cache)
    result = texture_baseline_cv(
        features_of_cache(files), [r.label for r in records], records, CXR_CLASSES, folds=args.folds, seed=args.seed
    )
    result.pop("probabilities")
    result |= {"scheme": args.scheme, "data": [str(d) for d in args.data], "left_out": len(left_out)}
    print(
        f"{args.scheme}: macro AUC {result['macro_auc_mean']:.3f} ± {result['macro_auc_sd']:.3f} over "
        f"{args.folds} folds, pooled {result['pooled_macro_auc']:.3f}; per class "
        + ", ".join(f"{c} {a:.3f}" for c, a in result["pooled_auc_per_class"].items())
    )
    if args.out:
        atomic_write_json(args.out, result)
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
