"""The ``lungsight`` command line: a thin face over the package.

Every error caused by the input prints one line (``lungsight: error: ...``) and exits non-zero; ``--debug`` shows
the traceback of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from lungsight.about import DISCLAIMER, __version__
from lungsight.errors import LungsightError


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="DICOM folder/.zip/file, NIfTI, image, or folder of slice images")
    p.add_argument("--series", metavar="UID", help="series to load from a multi-series DICOM folder")
    p.add_argument(
        "--tiff-intercept",
        type=float,
        default=-1024.0,
        help="HU = value + intercept for 16-bit TIFF slices (default -1024)",
    )


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lungsight", description=f"lungsight {__version__}. {DISCLAIMER}")
    ap.add_argument("--version", action="version", version=f"lungsight {__version__}")
    ap.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="classify one study and explain the decision")
    _add_input_options(p)
    p.add_argument("--out", type=Path, required=True, help="folder for result.json, report.html, overlays/")
    p.add_argument("--model", default="ct-default", help="model name or .safetensors file (default ct-default)")
    p.add_argument(
        "--rule",
        choices=["threshold-0", "threshold-10", "consecutive", "mean"],
        help="slice -> patient rule (default: the model's, threshold-10)",
    )
    p.add_argument("--top-k", type=int, default=4, help="slices explained with Grad-CAM (default 4)")
    p.add_argument("--no-select", action="store_true", help="classify every slice (skip paper-002 selection)")

    p = sub.add_parser("train", help="patient-grouped cross-validation, or a final fit with --folds 0")
    p.add_argument("--data", type=Path, required=True, help="folder with labels.csv (file,label,patient_id)")
    p.add_argument("--model", required=True, help="registered architecture (see 'lungsight models list')")
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--folds", type=int, default=5, help="k of patient-grouped k-fold CV; 0 = fit on all data")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["adamw", "adam", "nadam", "sgd"])
    p.add_argument("--input-size", type=int)
    p.add_argument("--augment", choices=["paper002", "paper002+intensity", "light", "none"])
    p.add_argument(
        "--pretrained",
        choices=["none", "imagenet"],
        default="none",
        help="ImageNet initialisation (needs network, or use --weights)",
    )
    p.add_argument("--weights", type=Path, help="local backbone weights file (.safetensors or .pth state dict)")
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience in epochs (val AUC)")
    p.add_argument(
        "--slice-threshold",
        type=float,
        default=0.5,
        help="operating threshold stored in the model (a CV run suggests one: Youden's J out of fold)",
    )
    p.add_argument("--min-epochs", type=int, help="epochs before a model may be selected (default: a third)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="data-loading processes")
    p.add_argument("--max-patients", type=int, help="train on a random subset of patients (quick checks)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")

    p = sub.add_parser("evaluate", help="evaluate a model on a folder with labels.csv")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--model", default="ct-default")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rule", choices=["threshold-0", "threshold-10", "consecutive", "mean"])
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")

    p = sub.add_parser("inspect", help="read a study and print what was found (no model)")
    _add_input_options(p)

    p = sub.add_parser("models", help="list, inspect or import models")
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="registered architectures and named models")
    mi = msub.add_parser("import", help="add a lungsight .safetensors model file under a name (offline use)")
    mi.add_argument("name")
    mi.add_argument("file", type=Path)
    mi.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("bench", help="slices/second of the whole predict path and of the bare model forward")
    p.add_argument("input", type=Path, nargs="?", help="study to time (default: the bundled example)")
    p.add_argument("--model", default="ct-default")
    p.add_argument("--slices", type=int, default=100, help="series length to time (resampled from the input)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    return ap


def _load(args: argparse.Namespace):
    from lungsight.io import load_study

    return load_study(args.input, series_uid=args.series, tiff_intercept=args.tiff_intercept)


def _predict(args: argparse.Namespace) -> int:
    from lungsight.inference.detector import Detector

    t0 = time.perf_counter()
    study = _load(args)
    t_read = time.perf_counter() - t0
    det = Detector.from_pretrained(args.model)
    try:
        pred = det.predict(study, rule=args.rule, top_k=args.top_k, select=not args.no_select)
    except LungsightError as exc:
        raise type(exc)(f"{args.input}: {exc}") from exc
    timings = pred.result["timings_s"]
    timings["read"] = t_read
    timings["total"] += t_read
    report = pred.save(args.out)
    for w in pred.result["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    print(pred)
    print(f"report: {report}")
    print(DISCLAIMER)
    return 0


def _train(args: argparse.Namespace) -> int:
    from lungsight.train import TrainConfig, train

    pretrained = str(args.weights) if args.weights else (None if args.pretrained == "none" else "imagenet")
    cfg = TrainConfig(
        data=str(args.data),
        model=args.model,
        out=str(args.out),
        folds=args.folds,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        input_size=args.input_size,
        augment=args.augment,
        pretrained=pretrained,
        patience=args.patience,
        min_epochs=args.min_epochs,
        slice_threshold=args.slice_threshold,
        seed=args.seed,
        workers=args.workers,
        max_patients=args.max_patients,
    )
    train(cfg, resume=args.resume)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lungsight.evaluate.runner import evaluate_folder

    m = evaluate_folder(args.data, args.model, args.out, rule=args.rule, n_boot=args.bootstrap)
    for level in ("slice", "patient"):
        shown = ", ".join(
            f"{k} {v:.3f}"
            for k, v in m[level].items()
            if k in ("auc", "accuracy", "sensitivity", "specificity") and v is not None
        )
        ci = m["ci95"][level]["auc"]
        print(f"{level}: {shown}" + (f" (AUC 95% CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else ""))
    print(f"written to {args.out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    print(json.dumps(_load(args).summary(), indent=2))
    return 0


def _models(args: argparse.Namespace) -> int:
    from lungsight.models.pretrained import import_model, list_models
    from lungsight.models.registry import MODELS

    if args.models_command == "import":
        e = import_model(args.name, args.file, overwrite=args.overwrite)
        print(f"imported {e.name}: {e.path} (sha256 {e.sha256})")
        return 0
    print("architectures (train with --model NAME):")
    for s in MODELS.values():
        print(f"  {s.name:18s} paper {s.paper:5s} {s.input_size}px  {s.description}")
    print("named models (predict/evaluate with --model NAME):")
    for e in list_models():
        state = "ok" if e.path.is_file() else ("downloadable" if e.url else "missing")
        print(f"  {e.name:18s} {e.source:8s} {state:12s} {e.path}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from lungsight.bench import run_bench

    run_bench(args.input, args.model, n_slices=args.slices, repeats=args.repeats, threads=args.threads)
    return 0


COMMANDS = {
    "predict": _predict,
    "train": _train,
    "evaluate": _evaluate,
    "inspect": _inspect,
    "models": _models,
    "bench": _bench,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pydicom", "huggingface_hub"):  # their warnings repeat what our one-line error says
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except LungsightError as exc:
        print(f"lungsight: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("lungsight: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"lungsight: unexpected error ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "rerun with --debug for details and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
