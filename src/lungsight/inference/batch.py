"""Many studies in one run: ``lungsight batch FOLDER --out OUT``, or :func:`predict_batch` from Python.

Every entry of the folder (a DICOM series folder or zip, a DICOM file, a NIfTI volume, an X-ray image, a folder of
slice images) is one study. Each is read, routed to its model like ``lungsight predict`` (CT -> ``ct-default``,
frontal X-ray -> ``cxr-default``; models are loaded once for the whole run) and written to its own folder::

    OUT/run.json                  the settings and the list of inputs (a resumed run must have the same)
    OUT/summary.csv, summary.json one row per study: status, decision, score, probabilities, error message
    OUT/index.html                the batch at a glance, linking every study's report
    OUT/studies/study_0001/       result.json, report.html, overlays/, ... of the first study, and so on

Output folders are numbered in the order of the inputs, never named after them. A study that cannot be read gets
its one-line error in the summary and the run goes on (a model that cannot be loaded, or an output that cannot be
written, stops it: every later study would fail the same way). The summary is rewritten after every study, so a
killed run shows what it has done, and ``resume=True`` (``--resume``) skips the studies that are finished.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lungsight.about import DISCLAIMER, __version__
from lungsight.errors import InputError, LungsightError, ModelError, OutputError
from lungsight.fileio import atomic_write_csv, atomic_write_json, atomic_write_text
from lungsight.io import IGNORED_NAMES, IGNORED_SUFFIXES, series_among
from lungsight.train.runs import prepare_run_folder

STUDIES_DIR = "studies"
#: Columns of summary.csv, in order.
COLUMNS = (
    "study",
    "input",
    "status",
    "modality",
    "model",
    "label",
    "rule",
    "score",
    "p_covid",
    "probabilities",
    "slices_kept",
    "n_slices",
    "lung_share",
    "flagged",
    "seconds",
    "report",
    "error",
)


def list_studies(folder: str | os.PathLike[str]) -> list[Path]:
    """The studies in ``folder``: each entry except hidden files, OS clutter and notes (.txt, .csv, .json ...),
    in natural order. An empty folder, one holding only such files, or one whose files are the slices of a CT
    series (one study, not many) is an error naming it. Single-file DICOM X-rays are separate studies."""
    from lungsight.io.images import natural_key

    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; give a folder whose entries are studies, or a list file")
    entries = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".")
        and p.name.lower() not in IGNORED_NAMES
        and (p.is_dir() or (p.is_file() and p.suffix.lower() not in IGNORED_SUFFIXES))
    ]
    if not entries:
        raise InputError(f"{folder}: no study in it (expected DICOM folders or zips, NIfTI files or images)")
    files = [p for p in entries if p.is_file()]
    if len(files) > 1:  # the slices of one CT series, given as if each were a study
        for series in series_among(files, folder, str(folder)):
            if series.modality == "CT" and series.n_images > 1:
                raise InputError(
                    f"{folder}: {series.n_images} of its files are slices of one CT series, not separate studies; "
                    f"predict it with 'lungsight predict {folder}', or give a folder whose entries are one study each"
                )
    return sorted(entries, key=lambda p: natural_key(p.name))


def read_study_list(list_file: str | os.PathLike[str]) -> list[Path]:
    """Studies named one per line in a text file (blank lines and ``#`` comments skipped); relative paths are
    taken relative to the list file's folder."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{list_file}: cannot read the list of studies ({type(exc).__name__})") from None
    paths = [Path(s.strip()) for s in lines if s.strip() and not s.strip().startswith("#")]
    if not paths:
        raise InputError(f"{list_file}: lists no study")
    return [p if p.is_absolute() else list_file.parent / p for p in paths]


@dataclass
class BatchSummary:
    """What a batch run did: one row per study (the columns of summary.csv) and where it wrote them."""

    out: Path
    rows: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["status"] != "ok"]


def _row_from_result(result: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    decision = result["decision"]
    probs = result.get("probabilities", {})
    slices = result.get("slices")
    evidence = result.get("evidence") or {}
    share = evidence.get("lung_share")
    return base | {
        "status": "ok",
        "modality": (result.get("input") or {}).get("modality", ""),
        "model": result["model"]["name"],
        "label": decision["label"],
        "rule": decision["rule"],
        "score": round(float(decision["score"]), 4),
        "p_covid": round(float(probs["covid"]), 4) if "covid" in probs else "",
        "probabilities": " ".join(f"{k}={v:.3f}" for k, v in probs.items()),
        "slices_kept": len(slices["selected"]) if slices else "",
        "n_slices": slices["n_total"] if slices else 1,
        "lung_share": "" if share is None else round(float(share), 3),
        "flagged": "" if evidence.get("flagged") is None else bool(evidence["flagged"]),
        "report": f"{STUDIES_DIR}/{base['study']}/report.html",
        "error": "",
    }


def predict_batch(
    studies: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    modality: str | None = None,
    rule: str | None = None,
    top_k: int = 4,
    select: bool = True,
    tiff_intercept: float = -1024.0,
    resume: bool = False,
    progress: Callable[[str], None] | None = print,
) -> BatchSummary:
    """Predict every study of ``studies`` into ``out`` (layout in the module docstring); returns the summary.

    Failures of single studies are recorded, not raised. ``progress`` receives one line per study (``None``: quiet).
    """
    from lungsight.inference.detector import Detector
    from lungsight.inference.route import load_for_prediction

    out = Path(out)
    inputs = [str(Path(s)) for s in studies]
    if not inputs:
        raise InputError("no study given")
    settings = {
        "command": "batch",
        "lungsight_version": __version__,
        "inputs": inputs,
        "model": model,
        "modality": modality,
        "rule": rule,
        "top_k": top_k,
        "select": select,
        "tiff_intercept": tiff_intercept,
    }
    keys = ("inputs", "model", "modality", "rule", "top_k", "select", "tiff_intercept")
    prepare_run_folder(out, settings, resume, keys, path_keys=("inputs",))
    previous = _previous_rows(out) if resume else {}
    detectors: dict[str, Detector] = {}
    rows: list[dict[str, Any]] = []
    written = 0
    t_run = time.perf_counter()
    n = len(inputs)
    for k, path in enumerate(inputs, start=1):
        name = f"study_{k:04d}"
        base = {c: "" for c in COLUMNS} | {"study": name, "input": path}
        done = previous.get(name)
        if done is not None and done.get("status") == "ok" and done.get("input") == path:
            rows.append(done)
            _say(progress, f"[{k}/{n}] {name}: done in an earlier run, skipped")
            continue
        t0 = time.perf_counter()
        try:
            study, chosen = load_for_prediction(path, modality=modality, model=model, tiff_intercept=tiff_intercept)
            key = str(chosen)
            if key not in detectors:
                detectors[key] = Detector.from_pretrained(chosen)
            pred = detectors[key].predict(study, rule=rule, top_k=top_k, select=select)
            del study
            pred.save(out / STUDIES_DIR / name)
            row = _row_from_result(pred.result, base)
            del pred
        except (ModelError, OutputError):
            raise  # the model or the output folder, not this study: every later study would fail the same way
        except LungsightError as exc:
            message = str(exc) if path in str(exc) else f"{path}: {exc}"
            row = base | {"status": "error", "error": message}
        except Exception as exc:  # one study's bug must not end a long batch; the message says how to report it
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            row = base | {"status": "error", "error": f"{path}: unexpected error ({type(exc).__name__}: {first})"}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        _write_summary(out, rows, inputs)
        written = len(rows)
        left = (time.perf_counter() - t_run) / k * (n - k)
        what = f"{row['label']} ({row['rule']} score {row['score']:.3f})" if row["status"] == "ok" else row["error"]
        _say(progress, f"[{k}/{n}] {name} {row['seconds']:.1f} s: {what}; about {left:.0f} s left")
    if written != len(rows):  # the last studies were skipped (resumed): nothing wrote their rows yet
        _write_summary(out, rows, inputs)
    return BatchSummary(out, rows)


def _say(progress: Callable[[str], None] | None, line: str) -> None:
    if progress is not None:
        progress(line)


def _previous_rows(out: Path) -> dict[str, dict[str, Any]]:
    """Rows of an earlier run's summary.csv whose study folder still holds its result, by study name."""
    path = out / "summary.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {r["study"]: r for r in rows if (out / STUDIES_DIR / r["study"] / "result.json").is_file()}


def _write_summary(out: Path, rows: list[dict[str, Any]], inputs: list[str]) -> None:
    ok = sum(r["status"] == "ok" for r in rows)
    atomic_write_csv(out / "summary.csv", [{c: r.get(c, "") for c in COLUMNS} for r in rows])
    atomic_write_json(
        out / "summary.json",
        {
            "lungsight_version": __version__,
            "disclaimer": DISCLAIMER,
            "n_studies": len(inputs),
            "n_done": len(rows),
            "n_ok": ok,
            "n_failed": len(rows) - ok,
            "studies": rows,
        },
    )
    from lungsight.report.html import render_batch_index

    atomic_write_text(out / "index.html", render_batch_index(rows, len(inputs)))
