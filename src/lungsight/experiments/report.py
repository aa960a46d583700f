"""The bench report: every recipe's runs beside the papers' own figures, in ``report.html`` and ``report.md``.

Built only from what the runs wrote (``recipe.json``, ``cv_metrics.json``, ``cv_predictions.csv``,
``calibration.json``, the PNGs), so it is rebuilt without retraining. CT rows are recomputed per fold from the
out-of-fold predictions for each of the recipe's patient rules (mean ± sd over folds) with pooled 95 % patient
bootstrap intervals; X-ray rows come from the run's ``cv_metrics.json``. Extra folders (``--extra``, and
subfolders of the bench) holding ``speed.json`` (``lungsight speed``), ``summary.json`` (``lungsight segment
train``) or ``calibration.json`` (``lungsight calibrate``) add their sections. Each table row names its run
folder and the command that made it.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import Any

from lungsight.errors import InputError
from lungsight.evaluate.metrics import summarize_folds
from lungsight.evaluate.summary import slice_and_patient_metrics
from lungsight.fileio import atomic_write_text, ensure_dir

CT_COLUMNS = ("auc", "accuracy", "sensitivity", "specificity", "f1")
CXR_COLUMNS = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1")
DISCLAIMER = "Research bench of a triage aid, not a medical device. Numbers are cross-validated on small public data."


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read ({exc})") from None


def _fmt(v: Any, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _cell(mean_sd: dict[str, Any] | None, ci: Any) -> str:
    """``mean ± sd [lo, hi]`` (the interval from the pooled patient bootstrap)."""
    if not mean_sd or mean_sd.get("mean") is None:
        text = "—"
    else:
        text = _fmt(mean_sd["mean"]) + (f" ± {mean_sd['sd']:.3f}" if mean_sd.get("sd") is not None else "")
    if isinstance(ci, list | tuple) and len(ci) == 2 and None not in ci:
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def ct_rows(run: Path, recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Slice level and one row per patient rule of the recipe: per-fold mean ± sd and pooled 95 % CIs."""
    with open(run / "cv_predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = _read_json(run / "cv_metrics.json").get("classes")
    positive = classes[-1] if classes else "covid"
    kw = {"consecutive_n": recipe["consecutive_n"]}
    threshold = recipe["slice_threshold"]

    def metrics(sel: list[dict[str, Any]], rule: str, n_boot: int) -> dict[str, Any]:
        return slice_and_patient_metrics(
            [r["patient_id"] for r in sel],
            [int(r["label"] == positive) for r in sel],
            [float(r["p"]) for r in sel],
            rule=rule,
            slice_threshold=threshold,
            n_boot=n_boot,
            rule_kw=kw,
        )

    folds = sorted({int(r["fold"]) for r in rows})
    by_fold = [[r for r in rows if int(r["fold"]) == k] for k in folds]
    out = []
    for i, rule in enumerate(recipe["rules"]):
        per_fold = [metrics(sel, rule, 1) for sel in by_fold]  # intervals unused per fold: one resample
        pooled = metrics(rows, rule, 500)
        if i == 0:
            out.append(
                {
                    "level": "slice",
                    "mean_sd": summarize_folds([m["slice"] for m in per_fold]),
                    "ci95": pooled["ci95"]["slice"],
                    "n": len(rows),
                }
            )
        out.append(
            {
                "level": f"patient ({rule})",
                "mean_sd": summarize_folds([m["patient"] for m in per_fold]),
                "ci95": pooled["ci95"]["patient"],
                "n": pooled["n_patients"],
            }
        )
    return out


def cxr_rows(run: Path) -> list[dict[str, Any]]:
    """The image-level three-class figures of an X-ray run and its evidence-in-lung share."""
    m = _read_json(run / "cv_metrics.json")
    lung = m.get("evidence_in_lung") or {}
    return [
        {
            "level": "image (3-class)",
            "mean_sd": m.get("mean_sd", {}),
            "ci95": m.get("ci95", {}),
            "n": m.get("n", m.get("n_images")),
            "evidence_in_lung": lung,
        }
    ]


def _figures_vs_ours(recipe: dict[str, Any], entries: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each paper figure beside the matching mean ± sd of its ``entry`` (default: the first, the paper's model)."""
    primary = f"patient ({recipe.get('primary_rule')})"
    levels = {"slice": "slice", "patient": primary, "image": "image (3-class)"}
    rows = {e["name"]: e["rows"] or [] for e in entries}
    out = []
    for fig in recipe.get("paper_figures", []):
        level = levels.get(fig.get("level", ""))
        name = fig.get("entry") or recipe["entries"][0]["name"]
        row = next((r for r in rows.get(name, []) if r["level"] == level), None)
        ours = _cell(row["mean_sd"].get(fig["metric"]), row["ci95"].get(fig["metric"])) if row else None
        out.append(
            {
                "metric": str(fig["metric"]),
                "level": str(fig.get("level", "")),
                "paper": f"{fig['value']:g}" if isinstance(fig["value"], float) else str(fig["value"]),
                "note": str(fig.get("note", "")),
                "entry": name if level else "—",
                "ours": ours or ("see the speed / segmentation sections" if level is None else "—"),
            }
        )
    return out


def _recipe_section(folder: Path) -> dict[str, Any]:
    info = _read_json(folder / "recipe.json")
    recipe = info["recipe"]
    entries = []
    for name, run_info in info["runs"].items():
        run = Path(run_info["run"])
        if not run.is_absolute() and not run.exists():
            run = folder / name
        if not (run / "cv_metrics.json").is_file():
            entries.append({"name": name, "run": run, "info": run_info, "rows": None})
            continue
        rows = ct_rows(run, recipe) if recipe["task"] == "ct" else cxr_rows(run)
        calib = _read_json(run / "calibration.json") if (run / "calibration.json").is_file() else None
        entries.append({"name": name, "run": run, "info": run_info, "rows": rows, "calibration": calib})
    return {
        "folder": folder,
        "info": info,
        "recipe": recipe,
        "entries": entries,
        "figures": _figures_vs_ours(recipe, entries),
    }


def _extras(folders: list[Path]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {"speed": [], "segmentation": [], "calibration": []}
    for folder in folders:
        if (folder / "speed.json").is_file():
            found["speed"].append({"folder": folder, "data": _read_json(folder / "speed.json")})
        if (folder / "summary.json").is_file():
            summary = _read_json(folder / "summary.json")
            if "best_val_dice" in summary:
                run = _read_json(folder / "run.json") if (folder / "run.json").is_file() else {}
                found["segmentation"].append({"folder": folder, "data": summary, "command": run.get("command")})
        if (folder / "calibration.json").is_file() and not (folder.parent / "recipe.json").is_file():
            cmd = (
                _read_json(folder / "cv_metrics.json").get("command")
                if (folder / "cv_metrics.json").is_file()
                else None
            )
            found["calibration"].append({"folder": folder, "data": _read_json(folder / "calibration.json"), "cmd": cmd})
    return found


def _png(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'


def _table_md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _table_html(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


class _Doc:
    """Writes the same content as Markdown and as HTML."""

    def __init__(self) -> None:
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, level: int, text: str) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def code(self, text: str) -> None:
        self.md.append(f"```\n{text}\n```\n")
        self.html.append(f"<pre>{html.escape(text)}</pre>")

    def bullets(self, items: list[str]) -> None:
        self.md.append("\n".join(f"- {i}" for i in items) + "\n")
        self.html.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")

    def table(self, header: list[str], rows: list[list[str]]) -> None:
        self.md.append(_table_md(header, rows) + "\n")
        self.html.append(_table_html(header, rows))

    def images(self, paths: list[Path], relative_to: Path) -> None:
        paths = [p for p in paths if p.is_file()]
        if not paths:
            return
        self.md.append(" ".join(f"![{p.name}]({_rel(p, relative_to)})" for p in paths) + "\n")
        self.html.append('<div class="pics">' + "".join(_png(p) for p in paths) + "</div>")


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def _recipe_doc(doc: _Doc, sec: dict[str, Any], base: Path) -> None:
    recipe, info = sec["recipe"], sec["info"]
    doc.heading(2, f"Paper {recipe['paper']}: {recipe['title']}")
    folds = next((r["settings"]["folds"] for r in info["runs"].values()), recipe["folds"])
    doc.para(
        f"Recipe {recipe['name']} ({recipe['source']}), profile {info['profile']}, task {recipe['task']}, "
        f"data {recipe['dataset']}{' + ' + ', '.join(recipe['extra_datasets']) if recipe['extra_datasets'] else ''}, "
        f"{folds}-fold patient-grouped CV. Preprocessing: {recipe['preprocessing']}."
    )
    doc.para("Reproduce every row of this section with:")
    doc.code(info["command"])
    if recipe["data_differs"]:
        doc.para("Where our data or set-up differs from the paper's:")
        doc.bullets(recipe["data_differs"])
    if sec["figures"]:
        doc.para("The paper's headline figures beside ours (mean ± sd over folds [pooled 95 % CI]):")
        doc.table(
            ["metric", "level", "paper", "ours", "our entry", "paper's note"],
            [[f["metric"], f["level"], f["paper"], f["ours"], f["entry"], f["note"]] for f in sec["figures"]],
        )
    columns = CT_COLUMNS if recipe["task"] == "ct" else CXR_COLUMNS
    table = []
    for e in sec["entries"]:
        if not e["rows"]:
            table.append([e["name"], "not finished", *["—"] * len(columns), "—", _rel(e["run"], base)])
            continue
        for r in e["rows"]:
            cells = [_cell(r["mean_sd"].get(c), r["ci95"].get(c)) for c in columns]
            table.append([e["name"], r["level"], *cells, _fmt(r["n"]), _rel(e["run"], base)])
    doc.para("Mean ± sd over folds [pooled 95 % patient-bootstrap CI]; n = slices/images or patients.")
    doc.table(["entry", "level", *columns, "n", "run folder"], table)
    if recipe["task"] == "cxr":
        lung = [
            [e["name"], *(_fmt(r["evidence_in_lung"].get(k)) for k in ("mean", "chance_level", "flagged_fraction"))]
            for e in sec["entries"]
            if e["rows"]
            for r in e["rows"]
        ]
        doc.para("Evidence in the lungs (share of Grad-CAM energy inside the lung mask):")
        doc.table(["entry", "mean share", "chance level", "flagged fraction"], lung)
    calib = [e for e in sec["entries"] if e.get("calibration")]
    if calib:
        doc.para("Temperature scaling fitted on each fold's validation split, scored on its held-out test fold:")
        doc.table(
            ["entry", "ECE before", "ECE after", "temperatures"],
            [
                [
                    e["name"],
                    _fmt(e["calibration"]["pooled"]["before"].get("ece")),
                    _fmt(e["calibration"]["pooled"]["after"].get("ece")),
                    ", ".join(f"{t:.2f}" for t in e["calibration"]["temperatures"]),
                ]
                for e in calib
            ],
        )
    for e in sec["entries"]:
        if not e["rows"]:
            continue
        doc.heading(3, f"{recipe['name']} / {e['name']} ({e['info']['model']})")
        doc.code(e["info"]["train_command"])
        if e["info"].get("notes"):
            doc.para(e["info"]["notes"])
        names = ["roc.png", "confusion.png", "confusion_patient.png", "reliability.png"]
        doc.images([e["run"] / n for n in names], base)


def _extras_doc(doc: _Doc, extras: dict[str, list[dict[str, Any]]], base: Path) -> None:
    for s in extras["segmentation"]:
        d = s["data"]
        doc.heading(2, f"Segmentation U-Net ({d.get('encoder')}, {d.get('target')}): {_rel(s['folder'], base)}")
        doc.table(
            ["validation Dice", "all-lung baseline Dice", "best epoch", "train / val slices"],
            [
                [
                    _fmt(d.get("best_val_dice")),
                    _fmt(d.get("baseline_all_lung_dice")),
                    _fmt(d.get("best_epoch")),
                    f"{d.get('n_train')} / {d.get('n_val')}",
                ]
            ],
        )
        doc.code(s["command"] or "(command not recorded in run.json)")
    for c in extras["calibration"]:
        p = c["data"]["pooled"]
        doc.heading(2, f"Calibration: {_rel(c['folder'], base)}")
        doc.table(
            ["ECE before", "ECE after", "NLL before", "NLL after", "n"],
            [[*(_fmt(p[w].get(k)) for k in ("ece", "nll") for w in ("before", "after")), _fmt(p.get("n"))]],
        )
        doc.code(f"lungsight calibrate {c['folder']}" + (f"   # run made by: {c['cmd']}" if c["cmd"] else ""))
        doc.images([c["folder"] / "reliability.png"], base)
    for s in extras["speed"]:
        d = s["data"]
        doc.heading(2, f"Speed: {_rel(s['folder'], base)}")
        doc.para(f"{d.get('statistic', '')}; path timed: {d.get('timed_path', '')}")
        rows = [r for r in d.get("rows", []) if not r.get("skipped")]
        doc.table(
            ["model", "input px", "slices", "seconds per study", "slices/s"],
            [
                [
                    *(_fmt(r.get(k)) for k in ("model", "input_px", "slices", "seconds_per_study")),
                    _fmt(r.get("slices_per_s"), 1),
                ]
                for r in rows
            ],
        )
        if d.get("notes"):
            doc.bullets([str(n) for n in d["notes"]])
        doc.code(_speed_command(s["folder"], d))
        doc.images([s["folder"] / "speed.png"], base)


def _speed_command(folder: Path, data: dict[str, Any]) -> str:
    """The ``lungsight speed`` command that times the same models, series lengths and repeats."""
    rows = data.get("rows", [])
    models = list(dict.fromkeys(str(r.get("model")) for r in rows))
    slices = list(dict.fromkeys(str(r.get("slices")) for r in rows))
    threads = next((r.get("threads") for r in rows if r.get("threads")), None)
    words = ["lungsight", "speed", data.get("study", ""), "--out", str(folder), "--models", ",".join(models)]
    words += ["--slices", *slices, "--repeats", str(data.get("repeats", 3))]
    words += ["--threads", str(threads)] if threads else []
    return " ".join(w for w in words if w)


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
    "pre{background:#f4f4f4;padding:6px;white-space:pre-wrap;font-size:12px}.pics img{max-width:380px;margin:4px}"
)


def write_report(bench: str | Path, out: str | Path, extra: list[str | Path] | None = None) -> dict[str, Any]:
    """Write ``out`` (HTML) and the same report as Markdown beside it (``.md``); return what it found."""
    bench, out = Path(bench), Path(out)
    if not bench.is_dir():
        raise InputError(f"{bench}: bench folder not found")
    recipe_folders = sorted(p.parent for p in bench.glob("*/recipe.json"))
    extra_folders = [Path(e) for e in extra or []]
    for e in extra_folders:
        if not e.is_dir():
            raise InputError(f"{e}: --extra folder not found")
    candidates = extra_folders + [p for p in sorted(bench.iterdir()) if p.is_dir() and p not in recipe_folders]
    extras = _extras(candidates)
    if not recipe_folders and not any(extras.values()):
        raise InputError(f"{bench}: no recipe runs (*/recipe.json) or speed/segmentation/calibration folders found")
    sections = [_recipe_section(f) for f in recipe_folders]
    doc = _Doc()
    doc.heading(1, "lungsight research bench")
    doc.para(DISCLAIMER)
    doc.para(f"Built from {bench.resolve()}; rebuild with:")
    doc.code(f"lungsight experiment report {bench} --out {out}" + "".join(f" --extra {e}" for e in extra_folders))
    for sec in sections:
        _recipe_doc(doc, sec, out.parent)
    _extras_doc(doc, extras, out.parent)
    ensure_dir(out.parent)
    atomic_write_text(out.with_suffix(".md"), "\n".join(doc.md))
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>lungsight research bench</title>'
        f"<style>{_STYLE}</style></head><body>{''.join(doc.html)}</body></html>"
    )
    atomic_write_text(out, page)
    return {
        "html": str(out),
        "markdown": str(out.with_suffix(".md")),
        "recipes": [s["recipe"]["name"] for s in sections],
        "runs": sum(1 for s in sections for e in s["entries"] if e["rows"]),
        "extras": {k: [str(v["folder"]) for v in vs] for k, vs in extras.items()},
    }
