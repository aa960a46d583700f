"""The per-prediction slice-probability chart, written as SVG text.

Every CT prediction draws this chart, so it is built here as a few hundred bytes of SVG (about a millisecond)
rather than rendered by matplotlib (about 80 ms a figure on a 2-core machine, a fixed cost that weighed on short
series). The report inlines it, so each point shows its slice and probability on hover; ``slice_probabilities.svg``
is the same chart as a file. The evaluation pictures (ROC, confusion, t-SNE) stay in
:mod:`lungsight.evaluate.plots`.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

WIDTH, HEIGHT = 760, 230
LEFT, RIGHT, TOP, BOTTOM = 46, 12, 26, 58  # plot margins in SVG units
BLUE, RED, GREY, BAND = "#1f77b4", "#d62728", "#8c8c8c", "#e0e0e0"


def _x(s: object) -> str:
    return html.escape(str(s), quote=True)


def _nice_step(n: int, ticks: int = 8) -> int:
    """A 1-2-5 step that puts at most about ``ticks`` ticks on an axis of ``n`` slices."""
    raw = max(1.0, n / ticks)
    base = 10 ** math.floor(math.log10(raw))
    return int(next(m * base for m in (1, 2, 5, 10) if m * base >= raw))


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of True values."""
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def slice_probability_svg(
    probs: ArrayLike,
    selected: ArrayLike,
    threshold: float,
    *,
    labels: Sequence[str] | None = None,
    title: str = "Per-slice probability",
    standalone: bool = True,
) -> str:
    """SVG text of each slice's positive-class probability along the series, with the slice threshold.

    ``probs`` holds one probability per slice in series order (NaN: not computed), ``selected`` whether slice
    selection kept it. Kept slices are joined by a blue line, with red points at or above ``threshold``;
    dropped slices are grey bands (grey points where a probability was computed). ``labels`` (one per slice)
    name the slices in the hover text; by default their indices. ``standalone=False`` leaves out the XML
    namespace, for an ``<svg>`` inlined in HTML.
    """
    p = np.asarray(probs, dtype=float)
    sel = np.asarray(selected, dtype=bool)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f"probs must be a non-empty 1-D array, got shape {p.shape}")
    if sel.shape != p.shape:
        raise ValueError(f"selected must have shape {p.shape} like probs, got {sel.shape}")
    if labels is not None and len(labels) != p.size:
        raise ValueError(f"{len(labels)} labels for {p.size} slices")
    n = p.size
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    step = pw / n

    def x(i: float) -> float:
        return LEFT + (i + 0.5) * step

    def y(v: float) -> float:
        return TOP + (1.0 - min(max(v, 0.0), 1.0)) * ph

    xmlns = ' xmlns="http://www.w3.org/2000/svg"' if standalone else ""
    out = [
        f'<svg{xmlns} viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{_x(title)}" font-family="sans-serif" font-size="11">',
        f"<title>{_x(title)}</title>",
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>',
        f'<text x="{WIDTH / 2:.0f}" y="16" text-anchor="middle" font-size="13">{_x(title)}</text>',
    ]
    for a, b in _runs(~sel):
        out.append(
            f'<rect x="{LEFT + a * step:.1f}" y="{TOP}" width="{(b - a) * step:.1f}" height="{ph}" fill="{BAND}"/>'
        )
    for v in (0.0, 0.25, 0.5, 0.75, 1.0):  # y grid and ticks
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 5}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    tick = _nice_step(n)
    for i in range(0, n, tick):  # x ticks at slice indices
        out.append(f'<line x1="{x(i):.1f}" x2="{x(i):.1f}" y1="{TOP + ph}" y2="{TOP + ph + 4}" stroke="#333"/>')
        out.append(f'<text x="{x(i):.1f}" y="{TOP + ph + 15}" text-anchor="middle">{i}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333" stroke-width="0.8"/>')
    out.append(
        f'<text x="{LEFT + pw / 2:.0f}" y="{TOP + ph + 30}" text-anchor="middle">slice (series order)</text>'
        f'<text transform="translate(12 {TOP + ph / 2:.0f}) rotate(-90)" text-anchor="middle">probability</text>'
    )
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y(threshold):.1f}" y2="{y(threshold):.1f}" stroke="{RED}" '
        'stroke-dasharray="5 3"/>'
    )
    finite = np.isfinite(p)
    for a, b in _runs(sel & finite):  # one line per run of kept slices
        if b - a > 1:
            pts = " ".join(f"{x(i):.1f},{y(p[i]):.1f}" for i in range(a, b))
            out.append(f'<polyline points="{pts}" fill="none" stroke="{BLUE}" stroke-width="1.2"/>')
    radius = 3.0 if n <= 150 else 2.0
    names = labels if labels is not None else [str(i) for i in range(n)]
    for i in np.flatnonzero(finite).tolist():
        colour = GREY if not sel[i] else RED if p[i] >= threshold else BLUE
        state = "dropped" if not sel[i] else "positive" if p[i] >= threshold else "selected"
        out.append(
            f'<circle cx="{x(i):.1f}" cy="{y(p[i]):.1f}" r="{radius}" fill="{colour}">'
            f"<title>slice {i} ({_x(names[i])}): p = {p[i]:.3f}, {state}</title></circle>"
        )
    legend = [
        (f'<circle r="3.5" fill="{BLUE}"/>', "selected slice"),
        (f'<circle r="3.5" fill="{RED}"/>', "selected, positive"),
        (f'<line x1="-8" x2="8" stroke="{RED}" stroke-dasharray="5 3"/>', f"slice threshold {threshold:g}"),
        (f'<rect x="-6" y="-5" width="12" height="10" fill="{BAND}"/>', "dropped by slice selection"),
    ]
    lx, ly = LEFT + 8, HEIGHT - 10
    for mark, text in legend:
        out.append(f'<g transform="translate({lx} {ly - 4})">{mark}</g><text x="{lx + 12}" y="{ly}">{_x(text)}</text>')
        lx += 24 + 6.2 * len(text)
    out.append("</svg>")
    return "\n".join(out)


def slice_chart(result: dict, *, standalone: bool = True) -> str | None:
    """The chart of a CT ``result.json`` dict (its ``slice_probabilities`` and the decision's slice threshold);
    ``None`` when the result has no per-slice probabilities (an X-ray)."""
    entries = [s for s in result.get("slice_probabilities") or [] if isinstance(s, dict)]
    if not entries:
        return None
    decision = result.get("decision") if isinstance(result.get("decision"), dict) else {}
    params = decision.get("params") if isinstance(decision.get("params"), dict) else {}
    threshold = params.get("slice_threshold", 0.5)
    threshold = float(threshold) if isinstance(threshold, int | float) and not isinstance(threshold, bool) else 0.5
    probs = [s["p"] if isinstance(s.get("p"), int | float) else math.nan for s in entries]
    return slice_probability_svg(
        probs,
        [bool(s.get("selected", True)) for s in entries],
        threshold,
        labels=[str(s.get("label", s.get("index", k))) for k, s in enumerate(entries)],
        standalone=standalone,
    )
