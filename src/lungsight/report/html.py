"""A self-contained, printable HTML report of one prediction (the ``result.json`` dict).

Every image is embedded as a base64 data URI, the slice-probability chart as inline SVG, and the CSS is inline:
the page needs no network, no JavaScript and no other file. All text from the result is HTML-escaped. Sections
whose keys are missing are left out.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lungsight.about import DISCLAIMER, __version__
from lungsight.fileio import atomic_write_text, ensure_dir
from lungsight.report.svg import slice_chart

REPORT_NAME = "report.html"

# Metadata keys that can identify a patient (matched case-insensitively as substrings, or as a "uid" suffix).
# The readers de-identify already; the report drops these again so that none can reach it.
_IDENTIFYING = (
    "name",
    "patientid",
    "patient_id",
    "birth",
    "address",
    "telephone",
    "phone",
    "accession",
    "institution",
    "physician",
    "operator",
    "date",
)

_OVERLAY_KEYS = frozenset({"index", "label", "p", "file"})

_CSS = """
:root { --ink: #1f2933; --muted: #52606d; --line: #d9e2ec; --pos: #b91c1c; --neg: #15803d; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1000px; margin: 0 auto; padding: 24px; }
h1 { font-size: 1.5em; margin: 0 0 12px; }
h3 { font-size: 1em; margin: 14px 0 4px; }
h2 { font-size: 1.15em; margin: 28px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
.disclaimer { border: 2px solid #b45309; background: #fff7ed; padding: 12px 16px; border-radius: 6px;
  font-size: 1.05em; font-weight: 600; color: #7c2d12; }
.decision { margin: 20px 0 8px; padding: 16px 20px; border: 1px solid var(--line); border-radius: 8px; }
.decision .label { font-size: 2.6em; font-weight: 700; text-transform: uppercase; letter-spacing: .02em;
  line-height: 1.1; }
.decision.pos .label { color: var(--pos); }
.decision.neg .label { color: var(--neg); }
.decision .detail { color: var(--muted); margin-top: 4px; }
.warnings { border-left: 4px solid #d97706; background: #fffbeb; padding: 8px 12px; margin: 12px 0; }
.warnings ul { margin: 4px 0; padding-left: 20px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { text-align: left; padding: 5px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #f5f7fa; font-weight: 600; }
td.num { font-variant-numeric: tabular-nums; }
tr.used td { font-weight: 600; background: #f0f4ff; }
.bar { display: inline-block; width: 160px; height: 10px; background: #e4e7eb; vertical-align: middle; }
.bar span { display: block; height: 100%; background: #3b82f6; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 6px 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; }
.legend { color: var(--muted); font-size: .9em; }
figure { margin: 8px 0; }
.chart svg { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: .9em; margin-top: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 12px; }
.missing { color: var(--muted); font-style: italic; }
code { font-size: .9em; }
footer { margin-top: 32px; padding-top: 8px; border-top: 1px solid var(--line); color: var(--muted);
  font-size: .85em; }
@media print {
  main { max-width: none; padding: 0; }
  body { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  figure, tr, .decision, .disclaimer { break-inside: avoid; }
  h2 { break-after: avoid; }
}
"""


def _e(value: Any) -> str:
    """Escape text for an element's content (quotes may stay as they are there)."""
    return html.escape(str(value), quote=False)


def _a(value: Any) -> str:
    """Escape text for a double- or single-quoted attribute value."""
    return html.escape(str(value), quote=True)


def _d(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _l(value: Any) -> list:
    return list(value) if isinstance(value, list | tuple) else []


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _fmt(value: Any) -> str:
    """Plain text of a value (not yet escaped): numbers to 4 significant digits, lists and dicts flattened."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)


def _data_uri(path: Path) -> str | None:
    """Base64 data URI of a PNG or JPEG file; ``None`` if it is unreadable or another format."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        mime = "image/png"
    elif data.startswith(b"\xff\xd8\xff"):
        mime = "image/jpeg"
    else:
        return None
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _figure(path: Path | None, caption: str) -> str:
    uri = _data_uri(path) if path is not None else None
    body = f'<img src="{uri}" alt="{_a(caption)}">' if uri else '<p class="missing">image not available</p>'
    return f"<figure>{body}<figcaption>{_e(caption)}</figcaption></figure>"


def _kv(items: Iterable[tuple[str, Any]]) -> str:
    rows = "".join(f"<dt>{_e(k)}</dt><dd>{_e(_fmt(v))}</dd>" for k, v in items if v is not None)
    return f'<dl class="kv">{rows}</dl>' if rows else ""


def _bullets(items: list, css: str | None = None) -> str:
    if not items:
        return ""
    lis = "".join(f"<li>{_e(_fmt(i))}</li>" for i in items)
    return f'<div class="{css}"><ul>{lis}</ul></div>' if css else f"<ul>{lis}</ul>"


def _is_identifying(key: str) -> bool:
    k = key.lower()
    return k.endswith("uid") or any(s in k for s in _IDENTIFYING)


def _decision(result: dict) -> str:
    dec = _d(result.get("decision"))
    if not dec:
        return ""
    positive = dec.get("positive")
    css = "pos" if positive is True else "neg" if positive is False else ""
    label = _fmt(dec.get("label"))
    parts = []
    if "rule" in dec:
        parts.append(f"rule <code>{_e(dec['rule'])}</code>")
    if "score" in dec:
        parts.append(f"patient score {_e(_fmt(dec['score']))}")
    if "n_positive" in dec and "n_slices" in dec:
        parts.append(f"{_e(_fmt(dec['n_positive']))} of {_e(_fmt(dec['n_slices']))} slices positive")
    if dec.get("params"):
        parts.append(f"parameters: {_e(_fmt(dec['params']))}")
    detail = f'<div class="detail">{" · ".join(parts)}</div>' if parts else ""
    return (
        f'<section class="decision {css}"><div class="detail">Patient decision</div>'
        f'<div class="label">{_e(label)}</div>{detail}</section>'
    )


def _rules(result: dict) -> str:
    rules = _d(result.get("rules"))
    if not rules:
        return ""
    used = _d(result.get("decision")).get("rule")
    rows = []
    for name, rule in rules.items():
        r = _d(rule)
        mark = " (used)" if name == used else ""
        row_class = ' class="used"' if mark else ""
        counts = f"{_fmt(r.get('n_positive'))} / {_fmt(r.get('n_slices'))}" if "n_positive" in r else "–"
        rows.append(
            f"<tr{row_class}><td><code>{_e(name)}</code>{_e(mark)}</td>"
            f"<td>{_e(_fmt(r.get('label')))}</td><td>{_e(_fmt(r.get('positive')))}</td>"
            f'<td class="num">{_e(_fmt(r.get("score")))}</td><td class="num">{_e(counts)}</td>'
            f"<td>{_e(_fmt(r.get('params') or None))}</td></tr>"
        )
    return (
        "<h2>All decision rules</h2><table><thead><tr><th>Rule</th><th>Decision</th><th>Positive</th>"
        "<th>Score</th><th>Positive / selected slices</th><th>Parameters</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _probabilities(result: dict) -> str:
    probs = _d(result.get("probabilities"))
    if not probs:
        return ""
    rows = []
    for cls, p in sorted(probs.items(), key=lambda kv: -(_num(kv[1]) or 0.0)):
        v = _num(p)
        width = 100 * min(max(v or 0.0, 0.0), 1.0)
        bar = f'<span class="bar"><span style="width:{width:.1f}%"></span></span>'
        rows.append(f'<tr><td>{_e(cls)}</td><td class="num">{_e(_fmt(p))}</td><td>{bar}</td></tr>')
    return (
        "<h2>Class probabilities (patient level)</h2><table><thead><tr><th>Class</th><th>Probability</th>"
        f"<th></th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _slices(result: dict) -> str:
    sl = _d(result.get("slices"))
    probs = [_d(s) for s in _l(result.get("slice_probabilities"))]
    probs = [s for s in probs if _num(s.get("p")) is not None]
    if not sl and not probs:
        return ""
    out = ["<h2>Slice selection</h2>"]
    if sl:
        selection = _d(sl.get("selection"))
        items = [
            ("Slices in series", sl.get("n_total")),
            ("Kept", len(_l(sl.get("selected"))) if "selected" in sl else None),
            ("Dropped", len(_l(sl.get("dropped"))) if "dropped" in sl else None),
        ]
        items += [(str(k).replace("_", " ").capitalize(), v) for k, v in selection.items()]
        out.append(_kv(items))
    if probs:
        chart = slice_chart(result, standalone=False)
        out.append(
            f'<figure class="chart">{chart}<figcaption>Probability of the positive class per slice, in series '
            "order (hover a point for its slice).</figcaption></figure>"
        )
    return "".join(out)


def _pct(value: Any) -> str:
    v = _num(value)
    return "–" if v is None else f"{100 * v:.0f} %"


def _evidence(result: dict) -> str:
    """X-ray results: how much of the Grad-CAM evidence lies inside the lungs, and how the view was known."""
    ev = _d(result.get("evidence"))
    if not ev:
        return ""
    share = _num(ev.get("lung_share"))
    flagged = ev.get("flagged") is True
    verdict = (
        "flagged: most of the evidence lies outside the lungs" if flagged else "most of the evidence lies in the lungs"
    )
    items = [
        ("Evidence inside the lungs", f"{100 * share:.0f} %" if share is not None else "not measured"),
        ("Lungs' share of the image (an even map would score this)", _pct(ev.get("lung_area"))),
        ("Assessment", verdict if ev.get("flagged") is not None else "not explained"),
        ("Flag below", f"{100 * (_num(ev.get('flag_below')) or 0):.0f} %"),
        ("Class explained", ev.get("explained_class")),
        ("Preprocessing scheme", ev.get("scheme")),
        ("Lung segmenter", ev.get("segmenter")),
        ("Lung mask plausible", ev.get("mask_plausible")),
    ]
    view = _d(result.get("view"))
    if view:
        items.append(("View", f"{_fmt(view.get('kind'))} (from the {_fmt(view.get('source'))})"))
    return (
        f'<h2>Evidence in the lungs</h2><section class="{"warnings" if flagged else ""}">{_kv(items)}'
        '<p class="legend">Share of the Grad-CAM energy of the predicted class that falls inside the lung mask '
        "(magenta outline in the overlay). Paper 004 found networks scoring well on X-rays by reading text stamps "
        "and the sternum; a low share is that warning, measured on this image.</p></section>"
    )


def _infection(result: dict, out_dir: Path) -> str:
    """CT with ``--infection-model``: the infected fraction of the lungs and the most infected slices."""
    inf = _d(result.get("infection"))
    if not inf:
        return ""
    items = [
        ("Infected fraction of the lungs", _pct(inf.get("fraction_of_lung"))),
        ("Infection model", inf.get("model")),
        ("Lung mask from", inf.get("lung_mask")),
    ]
    root = out_dir.resolve()
    figs = []
    for o in (_d(x) for x in _l(inf.get("overlays"))):
        path = (out_dir / str(o["file"])).resolve() if o.get("file") else None
        if path is not None and not path.is_relative_to(root):
            path = None
        figs.append(_figure(path, f"slice {_fmt(o.get('index'))}"))
    return (
        f"<h2>Infection (segmentation model)</h2>{_kv(items)}"
        '<p class="legend">Pixels the infection model marks inside the lung mask (magenta outline), as a share of '
        "the lung pixels, over the whole series.</p>"
        f'<div class="grid">{"".join(figs)}</div>'
    )


def _overlays(result: dict, out_dir: Path) -> str:
    items = [_d(o) for o in _l(result.get("overlays"))]
    if not items:
        return ""
    root = out_dir.resolve()
    figs = []
    for o in items:
        caption = str(o.get("label", f"slice {o.get('index', '?')}"))
        if _num(o.get("p")) is not None:
            caption += f" · p = {_fmt(o['p'])}"
        for key, value in o.items():  # further facts, e.g. the share of evidence inside the lungs
            if key not in _OVERLAY_KEYS:
                caption += f" · {str(key).replace('_', ' ')} = {_fmt(value)}"
        path = (out_dir / str(o["file"])).resolve() if o.get("file") else None
        if path is not None and not path.is_relative_to(root):  # embed only files from the report's folder
            path = None
        figs.append(_figure(path, caption))
    return (
        '<h2>Evidence: Grad-CAM overlays</h2><p class="legend">Each pair shows the slice and its Grad-CAM '
        "heat map (red = strongest evidence). A map that lights up outside the lungs (corners, text, "
        "sternum, table) points to a shortcut, not a finding.</p>"
        f'<div class="grid">{"".join(figs)}</div>'
    )


def _input(result: dict) -> str:
    inp = _d(result.get("input"))
    if not inp:
        return ""
    shape = _l(inp.get("shape"))
    spacing = _l(inp.get("spacing_mm"))
    out = [
        "<h2>Input</h2>",
        _kv(
            [
                ("Modality", inp.get("modality")),
                ("Intensity", inp.get("intensity")),
                ("Source format", inp.get("source_format")),
                ("Slices", inp.get("n_slices")),
                ("Shape", " × ".join(_fmt(s) for s in shape) if shape else None),
                ("Spacing (mm)", " × ".join(_fmt(s) for s in spacing) if spacing else None),
            ]
        ),
    ]
    meta = {k: v for k, v in _d(inp.get("metadata")).items() if not _is_identifying(str(k))}
    if meta:
        out.append("<h3>Metadata</h3>" + _kv((str(k), v) for k, v in meta.items()))
    if _l(inp.get("warnings")):
        out.append("<h3>Input warnings</h3>" + _bullets(_l(inp.get("warnings")), "warnings"))
    if _l(inp.get("other_series")):
        out.append("<h3>Other series in the input, not analysed</h3>" + _bullets(_l(inp.get("other_series"))))
    return "".join(out)


def _model(result: dict) -> str:
    model = _d(result.get("model"))
    if not model:
        return ""
    sha = model.get("sha256")
    return "<h2>Model</h2>" + _kv(
        [
            ("Name", model.get("name")),
            ("Architecture", model.get("arch")),
            ("Weights sha256", f"{sha[:12]}…" if isinstance(sha, str) and len(sha) > 12 else sha),
            ("Classes", model.get("classes")),
            ("Input size", model.get("input_size")),
        ]
    )


def _timings(result: dict) -> str:
    timings = _d(result.get("timings_s"))
    if not timings:
        return ""
    rows = "".join(f'<tr><td>{_e(k)}</td><td class="num">{_e(_fmt(v))}</td></tr>' for k, v in timings.items())
    head = "<thead><tr><th>Step</th><th>Seconds</th></tr></thead>"
    return f"<h2>Timings</h2><table>{head}<tbody>{rows}</tbody></table>"


def render_report(result: dict, out_dir: Path) -> str:
    """HTML text of the report; overlay files are resolved relative to ``out_dir``."""
    result = _d(result)
    out_dir = Path(out_dir)
    disclaimer = result.get("disclaimer") if isinstance(result.get("disclaimer"), str) else ""
    disclaimer = disclaimer.strip() or DISCLAIMER
    version = result.get("lungsight_version") or __version__
    label = _d(result.get("decision")).get("label")
    title = f"lungsight report – {label}" if label is not None else "lungsight report"
    body = [
        f'<h1>{_e(title)}</h1><div class="disclaimer" role="note">{_e(disclaimer)}</div>',
        _decision(result),
    ]
    if _l(result.get("warnings")):
        body.append(_bullets(_l(result.get("warnings")), "warnings"))
    body += [
        _rules(result),
        _probabilities(result),
        _evidence(result),
        _slices(result),
        _overlays(result, out_dir),
        _infection(result, out_dir),
        _input(result),
        _model(result),
        _timings(result),
        f"<footer>lungsight {_e(version)} · {_e(disclaimer)}</footer>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body><main>\n"
        + "\n".join(b for b in body if b)
        + "\n</main></body></html>\n"
    )


def write_report(result: dict, out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` (self-contained, atomic) for a ``result.json`` dict; returns its path."""
    out_dir = Path(out_dir)
    ensure_dir(out_dir)
    text = render_report(result, out_dir)
    return atomic_write_text(out_dir / REPORT_NAME, text)


def _number_text(value: Any) -> str:
    """A number given as a number or as CSV text, to 3 decimals; anything else as it is."""
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return str(value)


def render_batch_index(rows: Iterable[Mapping[str, Any]], n_studies: int) -> str:
    """HTML text of a batch run's ``index.html``: one row per study (its decision and a link to its report, or the
    reason it could not be read), with the research-use notice. ``rows`` are summary.csv rows."""
    rows = list(rows)
    ok = [r for r in rows if r.get("status") == "ok"]
    lines = []
    for r in rows:
        link = f'<a href="{_a(r["report"])}">{_e(r["study"])}</a>' if r.get("status") == "ok" else _e(r["study"])
        if r.get("status") == "ok":
            what = f"<b>{_e(r.get('label'))}</b> · {_e(r.get('rule'))} {_e(_number_text(r.get('score')))}"
            if r.get("lung_share") not in ("", None):
                what += f" · evidence in lungs {_e(_number_text(r.get('lung_share')))}"
            if str(r.get("flagged")) == "True":
                what += " · <b>flagged</b>"
            detail = _e(r.get("probabilities", ""))
        else:
            what, detail = '<span class="missing">not analysed</span>', _e(r.get("error", ""))
        lines.append(
            f"<tr><td>{link}</td><td>{_e(r.get('input'))}</td><td>{_e(r.get('modality', ''))}</td>"
            f"<td>{what}</td><td>{detail}</td></tr>"
        )
    counts = f"{len(rows)} of {n_studies} studies done: {len(ok)} analysed, {len(rows) - len(ok)} not analysed."
    head = "<thead><tr><th>Study</th><th>Input</th><th>Modality</th><th>Decision</th><th>Details</th></tr></thead>"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>lungsight batch</title><style>{_CSS}</style></head>\n<body><main>\n"
        f'<h1>lungsight batch</h1><div class="disclaimer" role="note">{_e(DISCLAIMER)}</div>'
        f"<p>{_e(counts)}</p><table>{head}<tbody>{''.join(lines)}</tbody></table>"
        f"<footer>lungsight {_e(__version__)} · {_e(DISCLAIMER)}</footer>\n</main></body></html>\n"
    )
