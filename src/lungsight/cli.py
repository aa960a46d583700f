"""The ``lungsight`` command line: a thin face over the package.

Every error caused by the input prints one line (``lungsight: error: ...``) and exits non-zero; ``--debug`` shows
the traceback of unexpected errors.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from lungsight.about import DISCLAIMER, __version__
from lungsight.allocator import tune_malloc
from lungsight.errors import InputError, LungsightError
from lungsight.fileio import check_output_folder
from lungsight.inference.rules import RULES


def _count(text: str) -> int:
    """argparse type: a whole number of at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="DICOM folder/.zip/file, NIfTI, image, or folder of slice images")
    p.add_argument(
        "--series",
        metavar="UID",
        help="series to load from a multi-series DICOM folder: its SeriesInstanceUID or the id lungsight lists",
    )
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
    p.add_argument(
        "--model",
        help="model name or .safetensors file (default: ct-default for CT studies, cxr-default for X-rays)",
    )
    p.add_argument(
        "--modality",
        choices=["CT", "XR"],
        help="what plain images (PNG/JPEG/TIFF) are; DICOM says so itself (default: guessed for a single image)",
    )
    p.add_argument(
        "--rule",
        choices=RULES,
        help="slice -> patient rule (default: the model's, threshold-10)",
    )
    p.add_argument("--top-k", type=_count, default=4, help="slices explained with Grad-CAM (default 4)")
    p.add_argument("--no-select", action="store_true", help="classify every slice (skip paper-002 selection)")
    p.add_argument("--infection-model", type=Path, help="CT: infection U-Net file; adds the infected fraction of lung")

    p = sub.add_parser("batch", help="predict every study in a folder (or a list file): one summary, one index page")
    p.add_argument("input", type=Path, nargs="?", help="folder whose entries are studies (DICOM folders/zips, ...)")
    p.add_argument("--list", type=Path, dest="list_file", help="text file naming one study per line, instead")
    p.add_argument("--out", type=Path, required=True, help="folder for summary.csv/.json, index.html, studies/")
    p.add_argument("--model", help="model for every study (default: ct-default for CT, cxr-default for X-rays)")
    p.add_argument("--modality", choices=["CT", "XR"], help="what plain images are (default: guessed per study)")
    p.add_argument("--rule", choices=RULES)
    p.add_argument("--top-k", type=_count, default=4, help="slices explained with Grad-CAM per study (default 4)")
    p.add_argument("--no-select", action="store_true", help="classify every slice (skip paper-002 selection)")
    p.add_argument("--tiff-intercept", type=float, default=-1024.0, help="HU = value + intercept for 16-bit TIFF")
    p.add_argument("--resume", action="store_true", help="continue a killed batch: finished studies are skipped")
    p.add_argument("--threads", type=int, help="torch threads (default: every core)")

    p = sub.add_parser("deid", help="write a de-identified copy of a study: pixels + whitelisted metadata only")
    _add_input_options(p)
    p.add_argument("--out", type=Path, required=True, help="folder for study.nii.gz or PNGs, and metadata.json")
    p.add_argument("--modality", choices=["CT", "XR"], help="what plain images are (default CT)")

    p = sub.add_parser("train", help="patient-grouped cross-validation, or a final fit with --folds 0")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        action="append",
        help="CT: folder with labels.csv (file,label,patient_id); X-ray: a folder with metadata.csv or labels.csv, "
        "repeat --data for further sources",
    )
    p.add_argument("--model", required=True, help="registered architecture (see 'lungsight models list')")
    p.add_argument("--task", choices=["ct", "cxr"], default="ct", help="CT slices (default) or chest X-rays")
    p.add_argument(
        "--scheme",
        choices=["raw", "cropped", "segmented"],
        default="segmented",
        help="X-ray preprocessing after paper 004 (task cxr; default segmented)",
    )
    p.add_argument(
        "--segmenter", help="X-ray lung segmenter: 'xr-lungs' (bundled U-Net) or a U-Net file (default: classical)"
    )
    p.add_argument(
        "--cache",
        type=Path,
        help="folder of prepared X-rays, shareable between runs (default: cache/ in the run folder)",
    )
    p.add_argument(
        "--scheduler", choices=["cosine", "onecycle", "plateau"], help="learning-rate schedule (default: the model's)"
    )
    p.add_argument("--out", type=Path, required=True, help="run folder")
    p.add_argument("--folds", type=int, default=5, help="k of patient-grouped k-fold CV; 0 = fit on all data")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", choices=["adamw", "adam", "nadam", "sgd"])
    p.add_argument("--input-size", type=int)
    p.add_argument("--augment", choices=["paper002", "paper002+intensity", "paper004", "light", "none"])
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
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: all cores; on a machine shared with other jobs 1 is often much faster)",
    )
    p.add_argument("--max-patients", type=int, help="train on a random subset of patients (quick checks)")
    p.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="CT: share of patients kept out of every fold (listed in holdout.csv) for an honest ensemble test",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")

    p = sub.add_parser("train-view", help="train the frontal/lateral/CT view classifier (xr-view), with CV")
    p.add_argument("--cohen", type=Path, required=True, help="Cohen X-ray folder (metadata.csv with a view column)")
    p.add_argument("--ct", type=Path, required=True, help="CT slice folder with labels.csv (the 'ct' class)")
    p.add_argument("--out", type=Path, required=True, help="new run folder")
    p.add_argument("--folds", type=int, help="patient-grouped CV folds before the final fit (default 5); 0: fit only")
    p.add_argument("--epochs", type=int, help="default 30")
    p.add_argument("--batch-size", type=int, help="default 32")
    p.add_argument("--lr", type=float, help="default 2e-3")
    p.add_argument("--input-size", type=int, help="default 128")
    p.add_argument("--augment", choices=["light", "none"], help="default light")
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--threads", type=int, help="torch threads (default 1: the model is small)")

    p = sub.add_parser("evaluate", help="evaluate a model on labelled data (CT labels.csv, X-ray metadata)")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        action="append",
        help="CT: folder with labels.csv; X-ray: folder with metadata.csv or labels.csv (repeat for more sources)",
    )
    p.add_argument("--model", default="ct-default")
    p.add_argument(
        "--by",
        default="sex,view,source",
        help="X-ray models: attributes to split errors and metrics by (sex, view, source, sensor)",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rule", choices=RULES)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")

    p = sub.add_parser("calibrate", help="temperature scaling of a CV run: ECE, NLL, Brier before and after")
    p.add_argument("run", type=Path, help="CV run folder (fold_*/val_predictions.csv and predictions.csv)")
    p.add_argument("--bins", type=int, default=15, help="equal-width confidence bins of the ECE (default 15)")
    p.add_argument(
        "--rebuild-val",
        action="store_true",
        help="first write the validation predictions of an older CT run that lacks them (rebuilt splits, checked)",
    )

    p = sub.add_parser("ensemble", help="score the k fold models of a CV run together on unseen data")
    p.add_argument("run", type=Path, help="CV run folder (fold_*/best.safetensors, cv_predictions.csv)")
    p.add_argument("--data", type=Path, help="folder with labels.csv (default: the run's holdout.csv)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--unseen-only",
        action="store_true",
        help="drop images whose patient or file the run trained on (default: refuse such data)",
    )
    p.add_argument("--bins", type=int, default=15, help="equal-width confidence bins of the ECE (default 15)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")

    p = sub.add_parser("inspect", help="read a study and print what was found (no model)")
    _add_input_options(p)

    p = sub.add_parser("models", help="list or import models")
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
    p.add_argument(
        "--repeats",
        type=int,
        default=7,
        help="timed rounds after one warm-up (default 7: on a shared machine single rounds move by 10 points)",
    )
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file (every round's times in it)")
    p.add_argument(
        "--format",
        choices=("auto", "nifti", "dicom", "stored"),
        default="auto",
        help="write the resampled series as .nii.gz or as an uncompressed DICOM series and time reading it "
        "(default auto: DICOM for a DICOM input, else .nii.gz); stored: time the input itself, as it is stored "
        "(its own slices, compression and headers; --slices does not apply)",
    )

    p = sub.add_parser("speed", help="seconds per study against series length for several models (paper 002 Table 7)")
    p.add_argument("input", type=Path, nargs="?", help="CT study to resample (default: the bundled example)")
    p.add_argument("--out", type=Path, required=True, help="folder for speed.csv, speed.json and speed.png")
    p.add_argument(
        "--models",
        default="ct-default",
        help="comma-separated named models and registered architectures, NAME[:PX] (architectures run untrained)",
    )
    p.add_argument("--slices", type=int, nargs="+", default=[20, 50, 100, 200, 400], help="series lengths")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per cell (the median is reported)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores, as lungsight bench)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda is used only when available")
    p.add_argument("--max-seconds", type=float, help="skip cells estimated to take longer than this per study")

    p = sub.add_parser("segment", help="train a lung/infection U-Net (X-rays or CT volumes), or segment one X-ray")
    ssub = p.add_subparsers(dest="segment_command", required=True)
    st = ssub.add_parser("train", help="train a U-Net on images+masks (docs/lung-fields.md, docs/ct-segmentation.md)")
    st.add_argument("--data", type=Path, required=True, help="folder of X-rays with lung masks")
    st.add_argument("--layout", choices=["auto", "montgomery", "shenzhen", "jsrt", "pairs", "nifti"], default="auto")
    st.add_argument("--encoder", choices=["monai", "xception"], default="monai", help="U-Net encoder (default monai)")
    st.add_argument("--target", choices=["lung", "infection"], default="lung", help="what the masks are (nifti)")
    st.add_argument("--masks", help="nifti, one volume: mask volume, folder of them (union), or 'hu' (derived)")
    st.add_argument("--val-fraction", type=float, default=0.15, help="held out (nifti: a contiguous slab per volume)")
    st.add_argument(
        "--groups",
        help="X-rays: CSV with file and patientid/patient_id columns (e.g. Cohen's metadata.csv): hold out patients",
    )
    st.add_argument("--threads", type=int, help="torch threads (1 is fastest on busy cores)")
    st.add_argument("--early-stop", type=int, default=10, help="stop after N epochs without a better Dice")
    st.add_argument("--out", type=Path, required=True, help="run folder (model.safetensors is written there)")
    st.add_argument("--epochs", type=int, default=50)
    st.add_argument("--batch-size", type=int, default=8)
    st.add_argument("--lr", type=float, default=1e-4)
    st.add_argument("--input-size", type=int, default=256)
    st.add_argument("--no-augment", action="store_true", help="train without the light augmentation")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--max-images", type=int, help="use only the first N pairs (quick checks)")
    st.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    se = ssub.add_parser("evaluate", help="score a lung segmenter against manual X-ray masks: Dice, IoU, worst cases")
    se.add_argument("--data", type=Path, required=True, help="X-rays with manual lung masks (segment train's layouts)")
    se.add_argument("--layout", choices=["auto", "montgomery", "shenzhen", "jsrt", "pairs"], default="auto")
    se.add_argument(
        "--model", default="xr-lungs", help="'xr-lungs' (the bundled U-Net, default), 'classical' or a U-Net file"
    )
    se.add_argument("--held-out", type=Path, help="a 'segment train' run folder: score only the X-rays it held out")
    se.add_argument("--worst", type=int, default=12, help="images drawn in worst_cases.png (default 12)")
    se.add_argument("--out", type=Path, required=True, help="folder for agreement.csv, summary.json, worst_cases.png")
    sa = ssub.add_parser("apply", help="segment the lungs of one frontal X-ray: mask PNG, overlay PNG, JSON")
    sa.add_argument("input", type=Path, help="X-ray image or DICOM file")
    sa.add_argument("--out", type=Path, required=True, help="folder for lung_mask.png, lung_overlay.png, .json")
    sa.add_argument(
        "--model", default="xr-lungs", help="'xr-lungs' (the bundled U-Net, default), 'classical' or a U-Net file"
    )

    p = sub.add_parser("experiment", help="the papers' recipes: run them, then one report (docs/bench.md)")
    esub = p.add_subparsers(dest="experiment_command", required=True)
    er = esub.add_parser("run", help="train every entry of a recipe (cached and resumable per run folder)")
    er.add_argument("recipe", help="recipe YAML, or a bundled one: recipes/paper-000.yaml or paper-000")
    er.add_argument("--data", type=Path, required=True, help="root holding the recipe's datasets (covid-ct/ ...)")
    er.add_argument("--out", type=Path, required=True, help="bench folder; runs go to OUT/<recipe>/<entry>/")
    er.add_argument("--quick", action="store_true", help="2 folds, 2 epochs, small inputs, few patients")
    er.add_argument("--only", nargs="+", metavar="ENTRY", help="run only these entries of the recipe")
    er.add_argument("--threads", type=int, default=1, help="torch threads (default 1: spin-waiting on busy cores)")
    er.add_argument(
        "--no-weights",
        dest="keep_weights",
        action="store_false",
        help="delete each finished entry's fold models (the report needs only predictions; saves disk)",
    )
    ep = esub.add_parser("report", help="report.html and report.md from a bench folder, without retraining")
    ep.add_argument("bench", type=Path, help="bench folder written by 'experiment run'")
    ep.add_argument("--out", type=Path, help="HTML report (default BENCH/report.html; report.md beside it)")
    ep.add_argument(
        "--extra",
        type=Path,
        action="append",
        default=[],
        help="folder of 'lungsight speed', 'segment train' or a calibrated run to include (repeatable)",
    )
    esub.add_parser("list", help="the bundled recipes")

    p = sub.add_parser("serve", help="web page and JSON API (see docs/service.md)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--data-dir", type=Path, help="results and in-flight uploads (default $LUNGSIGHT_HOME/serve)")
    p.add_argument("--keep-minutes", type=float, default=60.0, help="results are deleted after this (default 60)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on the API (default $LUNGSIGHT_API_TOKEN)")
    p.add_argument("--ct-model", default="ct-default")
    p.add_argument("--xr-model", default="cxr-default")
    p.add_argument("--max-upload-mb", type=float, default=1024.0, help="largest upload (default 1024)")
    p.add_argument("--max-files", type=int, default=2000, help="most files in one upload")
    p.add_argument("--max-zip-members", type=int, default=10_000)
    p.add_argument("--max-unpacked-mb", type=float, default=4096.0, help="largest unpacked size of a zip")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="largest image or slice, in pixels")
    p.add_argument("--workers", type=int, default=1, help="inference threads (default 1)")
    p.add_argument("--queue", type=int, default=64, help="most studies waiting for inference (default 64)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores but one, at least 1)")
    return ap


def _load(args: argparse.Namespace):
    from lungsight.io import load_study

    return load_study(args.input, series_uid=args.series, tiff_intercept=args.tiff_intercept)


def _predict(args: argparse.Namespace) -> int:
    from lungsight.inference.detector import Detector
    from lungsight.inference.route import load_for_prediction

    check_output_folder(args.out)  # an existing file: said before reading the study, not after
    t0 = time.perf_counter()
    study, model = load_for_prediction(
        args.input,
        modality=args.modality,
        model=args.model,
        series_uid=args.series,
        tiff_intercept=args.tiff_intercept,
    )
    t_read = time.perf_counter() - t0
    det = Detector.from_pretrained(model)
    try:
        pred = det.predict(study, rule=args.rule, top_k=args.top_k, select=not args.no_select)
    except LungsightError as exc:
        raise type(exc)(f"{args.input}: {exc}") from exc
    if args.infection_model:
        from lungsight.inference.infection import add_infection

        add_infection(pred, study, args.infection_model, args.out)
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


def _batch(args: argparse.Namespace) -> int:
    import torch

    from lungsight.inference.batch import list_studies, predict_batch, read_study_list

    if (args.input is None) == (args.list_file is None):
        raise InputError("give a folder of studies or --list FILE (one of them)")
    check_output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    studies = read_study_list(args.list_file) if args.list_file else list_studies(args.input)
    print(f"{len(studies)} studies -> {args.out}", flush=True)
    summary = predict_batch(
        studies,
        args.out,
        model=args.model,
        modality=args.modality,
        rule=args.rule,
        top_k=args.top_k,
        select=not args.no_select,
        tiff_intercept=args.tiff_intercept,
        resume=args.resume,
        progress=lambda line: print(line, flush=True),
    )
    print(f"summary: {summary.out / 'summary.csv'}; overview: {summary.out / 'index.html'}")
    print(DISCLAIMER)
    if summary.failed:
        raise InputError(
            f"{len(summary.failed)} of {len(summary.rows)} studies could not be analysed; "
            f"their reasons are in {summary.out / 'summary.csv'}"
        )
    return 0


def _deid(args: argparse.Namespace) -> int:
    from lungsight.io import load_study
    from lungsight.io.export import NOT_REMOVED, export_deidentified

    study = load_study(args.input, series_uid=args.series, modality=args.modality, tiff_intercept=args.tiff_intercept)
    written = export_deidentified(study, args.out)
    kind = "an X-ray" if study.modality == "XR" else "a CT"
    print(f"de-identified copy of {kind} study ({study.n_slices} slice{'s' * (study.n_slices > 1)}) in {args.out}:")
    for path in written:
        print(f"  {path.relative_to(args.out).as_posix()}")
    print(f"note: {NOT_REMOVED}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from lungsight.train import TrainConfig, train

    pretrained = str(args.weights) if args.weights else (None if args.pretrained == "none" else "imagenet")
    if args.task == "ct" and len(args.data) > 1:
        raise InputError("--data is given once for CT training (one folder with labels.csv)")
    cfg = TrainConfig(
        data=str(args.data[0]),
        extra_data=[str(d) for d in args.data[1:]],
        task=args.task,
        scheme=args.scheme,
        segmenter=args.segmenter,
        scheduler=args.scheduler,
        threads=args.threads,
        cache=str(args.cache) if args.cache else None,
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
        holdout=args.holdout,
    )
    train(cfg, resume=args.resume)
    return 0


def _train_view(args: argparse.Namespace) -> int:
    from lungsight.train.view import ViewTrainConfig, train_view

    options = ("folds", "epochs", "batch_size", "lr", "input_size", "augment", "seed", "threads")
    given = {k: getattr(args, k) for k in options if getattr(args, k) is not None}
    train_view(ViewTrainConfig(cohen=str(args.cohen), ct=str(args.ct), out=str(args.out), **given))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from lungsight.evaluate.runner import evaluate_folder
    from lungsight.inference.route import model_modality

    if model_modality(args.model) == "XR":
        from lungsight.evaluate.xray import evaluate_xray

        by = [k.strip() for k in args.by.split(",") if k.strip()]
        m = evaluate_xray(args.data, args.model, args.out, by=by, n_boot=args.bootstrap)
        print(
            f"{m['n']} X-rays: accuracy {m['accuracy']:.3f}, balanced accuracy {m['balanced_accuracy']:.3f}, "
            f"macro AUC {m['macro_auc'] if m['macro_auc'] is None else round(m['macro_auc'], 3)}; "
            f"evidence in lungs {m['evidence_in_lung']['mean']}"
        )
        print(f"written to {args.out}")
        return 0
    if len(args.data) > 1:
        raise InputError("--data is given once for a CT model (one folder with labels.csv)")
    m = evaluate_folder(args.data[0], args.model, args.out, rule=args.rule, n_boot=args.bootstrap)
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


def _calibrate(args: argparse.Namespace) -> int:
    from lungsight.evaluate.calibration import calibrate_run, rebuild_val_predictions

    if args.rebuild_val:
        print(f"rebuilt validation predictions: {len(rebuild_val_predictions(args.run))} fold(s)")
    r = calibrate_run(args.run, bins=args.bins)
    b, a = r["pooled"]["before"], r["pooled"]["after"]
    print(f"temperatures: {', '.join(f'{t:.3f}' for t in r['temperatures'])}")
    print(
        f"pooled held-out folds (n={r['pooled']['n']}): ECE {b['ece']:.3f} -> {a['ece']:.3f}, "
        f"NLL {b['nll']:.3f} -> {a['nll']:.3f}, Brier {b['brier']:.3f} -> {a['brier']:.3f}"
    )
    lo, hi = r["pooled"]["ece_change_ci95"]
    print(f"ECE change, 95% interval over patients: {lo:+.3f} to {hi:+.3f}")
    print(f"written to {args.run} (calibration.json, calibration.md, reliability.png)")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    import torch

    from lungsight.evaluate.ensemble import evaluate_ensemble

    torch.set_num_threads(args.threads)
    r = evaluate_ensemble(args.run, args.out, data=args.data, unseen_only=args.unseen_only, bins=args.bins)
    e, s, u = r["ensemble"], r["single_mean"], r["uncertainty"]["sd_positive"]

    def f(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    print(
        f"{r['n']} unseen images ({r['patients']} patients; {r['dropped_seen']} seen dropped), {r['members']} members"
    )
    print(f"ensemble: AUC {f(e['auc'])}, accuracy {f(e['accuracy'])}, ECE {f(e['ece'])}")
    print(f"single models (mean): AUC {f(s['auc'])}, accuracy {f(s['accuracy'])}, ECE {f(s['ece'])}")
    g = r["gain_ci95"]
    shown = {k: "n/a" if g[k] is None else f"{g[k][0]:+.3f} to {g[k][1]:+.3f}" for k in ("auc", "accuracy")}
    print(f"ensemble gain, 95% CI over patients: AUC {shown['auc']}, accuracy {shown['accuracy']}")
    if "temperature_scaling" in r:
        ts = r["temperature_scaling"]
        print(
            f"validation-fitted temperatures on these patients: ECE single {ts['members_before']['ece']:.3f} -> "
            f"{ts['members_after']['ece']:.3f}, ensemble {ts['ensemble_before']['ece']:.3f} -> "
            f"{ts['ensemble_after']['ece']:.3f}"
        )
    print(
        f"sd across members: {f(u['mean_on_errors'])} on {u['n_errors']} errors, {f(u['mean_on_correct'])} on "
        f"{u['n_correct']} correct; as an error detector AUC {f(u['error_detection_auc'])}"
    )
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

    figures = run_bench(
        args.input, args.model, n_slices=args.slices, repeats=args.repeats, threads=args.threads, fmt=args.format
    )
    if args.json is not None:
        from lungsight.fileio import atomic_write_json

        atomic_write_json(args.json, figures)
        print(f"figures written to {args.json}")
    return 0


def _speed(args: argparse.Namespace) -> int:
    from lungsight.speed import run_speed

    run_speed(
        args.out,
        study_path=args.input,
        models=[m for m in args.models.split(",") if m.strip()],
        slices=args.slices,
        repeats=args.repeats,
        threads=args.threads,
        device=args.device,
        max_seconds=args.max_seconds,
    )
    return 0


def _segment_evaluate(args: argparse.Namespace) -> int:
    from lungsight.evaluate.masks import evaluate_segmenter, held_out_images, worst_cases_sheet
    from lungsight.fileio import atomic_write_csv, atomic_write_json, ensure_dir
    from lungsight.preprocess.lung_fields import load_segmenter
    from lungsight.train.segmentation import discover_pairs

    segmenter = load_segmenter(args.model)
    layout, pairs, skipped = discover_pairs(args.data, args.layout)
    if args.held_out is not None:
        names = held_out_images(args.held_out)
        pairs = [p for p in pairs if p.image.name in names]
        if not pairs:
            raise InputError(f"{args.held_out}: none of its held-out X-rays is in {args.data}")
    ensure_dir(args.out)
    print(f"{layout} layout: {len(pairs)} X-rays with manual masks ({skipped} without a mask left out)", flush=True)
    rows, summary, worst = evaluate_segmenter(segmenter, pairs, keep_worst=max(args.worst, 0))
    summary |= {"data_layout": layout, "held_out_of": str(args.held_out) if args.held_out else None}
    atomic_write_csv(args.out / "agreement.csv", rows)
    atomic_write_json(args.out / "summary.json", summary)
    if worst:
        worst_cases_sheet(worst, args.out / "worst_cases.png")
    d, t, a = summary["dice"], summary["baselines"]["template_dice"], summary["baselines"]["all_lung_dice"]
    print(
        f"{segmenter.name} on {summary['n_images']} X-rays: Dice mean {d['mean']:.3f}, median {d['median']:.3f}, "
        f"5th percentile {d['p5']:.3f}; IoU mean {summary['iou']['mean']:.3f}; baselines: template alone "
        f"{t['mean']:.3f}, all-lung mask {a['mean']:.3f}"
    )
    for method, part in summary["by_method"].items():
        print(f"  {method:9s} {part['n']:4d} X-rays, Dice mean {part['dice']['mean']:.3f}")
    print(f"written: {args.out / 'agreement.csv'}, summary.json{', worst_cases.png' if worst else ''}")
    return 0


def _segment(args: argparse.Namespace) -> int:
    if args.segment_command == "train":
        from lungsight.train.segmentation import SegTrainConfig, train_segmentation

        cfg = SegTrainConfig(
            data=str(args.data),
            out=str(args.out),
            layout=args.layout,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            input_size=args.input_size,
            augment=not args.no_augment,
            seed=args.seed,
            max_images=args.max_images,
            encoder=args.encoder,
            target=args.target,
            masks=args.masks,
            val_fraction=args.val_fraction,
            groups=None if args.groups is None else str(args.groups),
            threads=args.threads,
            early_stop=args.early_stop,
        )
        train_segmentation(cfg, resume=args.resume)
        return 0
    if args.segment_command == "evaluate":
        return _segment_evaluate(args)
    from lungsight.preprocess.lung_fields import load_segmenter, segment_file

    segmenter = load_segmenter(args.model)
    detail = segment_file(args.input, segmenter, args.out)
    by = "the template" if detail.method == "template" else segmenter.name
    print(
        f"{args.input.name}: lungs by {by}, {detail.mask.mean():.0%} of the image"
        + (f"; {detail.note}" if detail.note else "")
    )
    print(f"written to {args.out}")
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from lungsight.experiments import bundled_recipes, load_recipe, run_recipe, write_report

    if args.experiment_command == "list":
        for path in bundled_recipes():
            r = load_recipe(path)
            print(f"{r.name}: {r.title} [{r.task}, {', '.join(e.name for e in r.entries)}]")
        return 0
    if args.experiment_command == "run":
        result = run_recipe(
            args.recipe,
            args.data,
            args.out,
            quick=args.quick,
            threads=args.threads,
            only=args.only,
            keep_weights=args.keep_weights,
            command=" ".join(["lungsight", *sys.argv[1:]]) if sys.argv[1:2] == ["experiment"] else None,
        )
        name = result["recipe"]["name"]
        print(f"{name}: {len(result['runs'])} runs, listed in {args.out / name / 'recipe.json'}")
        return 0
    found = write_report(args.bench, args.out or args.bench / "report.html", extra=args.extra)
    print(f"report of {found['runs']} runs ({', '.join(found['recipes'])}): {found['html']} and {found['markdown']}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    import os

    from lungsight.serve import Settings, run
    from lungsight.serve.settings import MIB, TOKEN_ENV, default_data_dir

    try:
        settings = Settings(
            data_dir=args.data_dir or default_data_dir(),
            keep_minutes=args.keep_minutes,
            token=args.token or os.environ.get(TOKEN_ENV) or None,
            ct_model=args.ct_model,
            xr_model=args.xr_model,
            max_upload_bytes=int(args.max_upload_mb * MIB),
            max_files=args.max_files,
            max_zip_members=args.max_zip_members,
            max_unpacked_bytes=int(args.max_unpacked_mb * MIB),
            max_pixels=args.max_pixels,
            workers=args.workers,
            queue_limit=args.queue,
            torch_threads=args.threads,
        )
    except ValueError as exc:
        raise LungsightError(f"serve: {exc}") from None
    print(f"lungsight {__version__}: http://{args.host}:{args.port} (results in {settings.data_dir}). {DISCLAIMER}")
    run(settings, host=args.host, port=args.port)
    return 0


COMMANDS = {
    "predict": _predict,
    "batch": _batch,
    "deid": _deid,
    "train": _train,
    "train-view": _train_view,
    "evaluate": _evaluate,
    "calibrate": _calibrate,
    "ensemble": _ensemble,
    "inspect": _inspect,
    "models": _models,
    "bench": _bench,
    "speed": _speed,
    "segment": _segment,
    "experiment": _experiment,
    "serve": _serve,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's time limit), raised in the main thread so that it unwinds like Ctrl-C."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    # Unwinding runs every cleanup on the way out: a zip's extracted slices (patient data) are deleted from the
    # temporary folder, and no half-written output is left (writes are atomic).
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signal handlers can only be set there
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    tune_malloc()  # batch activations reuse freed memory instead of faulting in fresh pages (allocator.py)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pydicom", "huggingface_hub"):  # their warnings repeat what our one-line error says
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return COMMANDS[args.command](args)
    except LungsightError as exc:
        print(f"lungsight: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Terminated:
        print("lungsight: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
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
