"""Bias audit (paper 004, Tables V and VI): how errors and metrics split by an attribute of the images such as sex,
projection (AP/PA), sensor (CR/DX) or source dataset.

For each value of the attribute the report gives the number of images and patients, the error rate (with a patient
bootstrap interval where there are enough images), accuracy, balanced accuracy, macro AUC and per-class recall; the
share of the test images and of the errors that fall in the group, per true class (Table VI's "% in test" against
"% in errors"); and one test of whether the error rate depends on the attribute at all. Missing values are grouped
as ``"unknown"``, reported, and left out of the test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import MonteCarloMethod, binomtest, fisher_exact

from lungsight.evaluate.metrics import _fmt
from lungsight.evaluate.multiclass import check_inputs, multiclass_bootstrap_ci, multiclass_metrics
from lungsight.evaluate.plots import plot_group_metrics
from lungsight.fileio import atomic_write_json, atomic_write_text

UNKNOWN = "unknown"
_MISSING = {"", "nan", "none", "null", "na", "n/a", "unknown"}
_CI_KEYS = ("accuracy", "balanced_accuracy", "macro_auc")
#: Monte Carlo tables drawn for the exact test when there are more than two groups.
MC_RESAMPLES = 9999


def group_values(values: Sequence[Any]) -> list[str]:
    """Attribute values as stripped strings; ``None``, NaN, empty and the usual "missing" spellings become
    ``"unknown"``."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(UNKNOWN)
            continue
        s = str(v).strip()
        out.append(UNKNOWN if s.lower() in _MISSING else s)
    return out


def _group_order(values: list[str]) -> list[str]:
    """Largest group first, ties by name; ``unknown`` last."""
    counts: dict[str, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    known = sorted((v for v in counts if v != UNKNOWN), key=lambda v: (-counts[v], v))
    return known + ([UNKNOWN] if UNKNOWN in counts else [])


def error_rate_test(values: Sequence[str], wrong: ArrayLike, *, seed: int = 0) -> dict[str, Any]:
    """Is the error rate the same in every group? A test on the groups × (errors, correct) table of counts.

    Two groups: Fisher's exact test (two-sided). More: the Fisher–Freeman–Halton exact test with a Monte Carlo
    p-value (``MC_RESAMPLES`` tables, seeded, so reproducible). Both are valid at any count, unlike the chi-square
    approximation. Images with an unknown value are left out. ``p_value`` is ``None`` when there is nothing to
    compare (fewer than two known groups, or no errors or no correct answers at all).
    """
    vals = list(values)
    w = np.asarray(wrong, dtype=bool)
    groups = [g for g in _group_order(vals) if g != UNKNOWN]
    arr = np.asarray(vals, dtype=object)
    table = np.array([[int(w[arr == g].sum()), int((~w[arr == g]).sum())] for g in groups], dtype=int).reshape(-1, 2)
    result: dict[str, Any] = {
        "groups": groups,
        "table": table.tolist(),
        "columns": ["errors", "correct"],
        "test": None,
        "p_value": None,
        "caveat": (
            "The test counts images as independent, but images of one patient are not, so with several images per "
            "patient the p-value is too small. With few images per group it has little power: a large p-value is no "
            "evidence that the groups are treated alike. Images with an unknown value are left out."
        ),
    }
    if len(groups) < 2:
        result["conclusion"] = "fewer than two known groups: nothing to compare"
        return result
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        result["conclusion"] = "no errors or no correct answers at all: error rates cannot differ"
        return result
    if len(groups) == 2:
        result["test"] = "Fisher's exact test, two-sided"
        p = fisher_exact(table).pvalue
    else:
        result["test"] = f"Fisher-Freeman-Halton exact test, Monte Carlo p-value ({MC_RESAMPLES} tables)"
        method = MonteCarloMethod(n_resamples=MC_RESAMPLES, rng=np.random.default_rng(seed))
        p = fisher_exact(table, method=method).pvalue
    result["p_value"] = float(p)
    if p < 0.05:
        result["conclusion"] = f"error rates differ between groups (p = {p:.3g} < 0.05)"
    else:
        result["conclusion"] = f"no evidence that error rates differ between groups (p = {p:.3g})"
    return result


def _error_rate_ci(errors: int, n: int, accuracy_ci: list[float] | None) -> tuple[list[float] | None, str]:
    """The error-rate interval: the patient bootstrap one (from the accuracy interval), except when the group has
    no errors or only errors, where every resample agrees and the bootstrap interval shrinks to a point; the exact
    binomial (Clopper-Pearson) interval then says how large the rate could still be (0 errors in 6: up to 0.46)."""
    if 0 < errors < n:
        return (None if accuracy_ci is None else [1.0 - accuracy_ci[1], 1.0 - accuracy_ci[0]]), "patient bootstrap"
    ci = binomtest(errors, n).proportion_ci(confidence_level=0.95, method="exact")
    return [float(ci.low), float(ci.high)], "Clopper-Pearson (no errors or all errors: bootstrap degenerate)"


def group_report(
    y_true: ArrayLike,
    probs: ArrayLike,
    classes: Sequence[str],
    groups_by_value: Sequence[Any],
    patients: Sequence[Any],
    min_n: int = 5,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    name: str = "attribute",
) -> dict[str, Any]:
    """Metrics and errors split by the values of one attribute (one value per image, e.g. each image's sex).

    ``groups`` lists one entry per value (largest first, ``unknown`` last) with ``n``, ``n_patients``,
    ``errors``, ``error_rate``, ``accuracy``, ``balanced_accuracy``, ``macro_auc`` (``None`` if undefined),
    ``recall`` and ``support`` per class, ``share_of_images`` and ``share_of_errors``, ``too_few`` (``n < min_n``:
    reported, but "too few to compare") and ``ci95`` (patient bootstrap intervals for error rate, accuracy,
    balanced accuracy and macro AUC; ``None`` for groups that are too few or hold a single patient; for a group
    with no errors or only errors the error-rate and accuracy intervals are the exact binomial one, see
    ``error_rate_method``).
    ``error_distribution`` gives per true class each group's share of that class's images and of its errors
    (paper 004, Table VI). ``test`` is :func:`error_rate_test`.
    """
    y, p = check_inputs(y_true, probs, classes)
    names = [str(c) for c in classes]
    n = y.size
    values = group_values(groups_by_value)
    pats = np.asarray([str(v) for v in patients], dtype=object)
    if len(values) != n or pats.size != n:
        raise ValueError(f"need one attribute value and one patient id per image ({n}), got {len(values)}, {pats.size}")
    if min_n < 1:
        raise ValueError(f"min_n must be at least 1, got {min_n}")
    pred = p.argmax(axis=1)
    wrong = pred != y
    arr = np.asarray(values, dtype=object)
    order = _group_order(values)
    total_errors = int(wrong.sum())

    groups = []
    for value in order:
        idx = arr == value
        m = multiclass_metrics(y[idx], p[idx], names)
        n_g, n_pat = int(idx.sum()), len(set(pats[idx].tolist()))
        too_few = n_g < min_n
        ci = None
        if not too_few and n_pat >= 2:
            b = multiclass_bootstrap_ci(y[idx], p[idx], pats[idx], names, _CI_KEYS, n_boot=n_boot, seed=seed)
            err_ci, err_method = _error_rate_ci(int(wrong[idx].sum()), n_g, b["accuracy"])
            ci = {k: b[k] for k in _CI_KEYS} | {"error_rate": err_ci, "error_rate_method": err_method}
            if err_ci is not None:
                ci["accuracy"] = [1.0 - err_ci[1], 1.0 - err_ci[0]]
        groups.append(
            {
                "value": value,
                "n": n_g,
                "n_patients": n_pat,
                "errors": int(wrong[idx].sum()),
                "error_rate": m["error_rate"],
                "accuracy": m["accuracy"],
                "balanced_accuracy": m["balanced_accuracy"],
                "macro_auc": m["macro_auc"],
                "recall": {c: m["per_class"][c]["recall"] for c in names},
                "support": {c: m["per_class"][c]["support"] for c in names},
                "share_of_images": n_g / n,
                "share_of_errors": int(wrong[idx].sum()) / total_errors if total_errors else None,
                "too_few": too_few,
                "note": f"too few to compare (n < {min_n})" if too_few else None,
                "ci95": ci,
            }
        )

    distribution = {}
    for k, c in enumerate(names):
        in_class = y == k
        errors_c = int((wrong & in_class).sum())
        distribution[c] = {
            "n": int(in_class.sum()),
            "errors": errors_c,
            "share_of_images": {
                v: (float((in_class & (arr == v)).sum() / in_class.sum()) if in_class.any() else None) for v in order
            },
            "share_of_errors": {
                v: (float((wrong & in_class & (arr == v)).sum() / errors_c) if errors_c else None) for v in order
            },
        }
    return {
        "attribute": name,
        "classes": names,
        "n": int(n),
        "min_n": int(min_n),
        "groups": groups,
        "error_distribution": distribution,
        "test": error_rate_test(values, wrong, seed=seed),
        "ci_method": f"percentile bootstrap, {n_boot} resamples of patients within the group",
    }


def _with_ci(value: float | None, ci: list[float] | None, digits: int = 3) -> str:
    text = _fmt(value, digits)
    return text if ci is None else f"{text} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _exact(ci: Mapping[str, Any]) -> bool:
    return str(ci.get("error_rate_method", "")).startswith("Clopper")


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.1f}"


def group_report_markdown(report: Mapping[str, Any]) -> str:
    """The report of :func:`group_report` as Markdown: one row per group, the error distribution per class, the
    test and its caveat."""
    name, classes = report["attribute"], report["classes"]
    lines = [
        f"# Errors and metrics by {name}",
        "",
        f"{report['n']} images. Decision: argmax. 95 % intervals in brackets ({report['ci_method']}).",
        "",
        "| "
        + " | ".join(
            [name, "images", "patients", "errors", "error rate", "accuracy", "balanced acc.", "macro AUC"]
            + [f"recall {c}" for c in classes]
            + ["note"]
        )
        + " |",
        "|---|" + "---:|" * (7 + len(classes)) + "---|",
    ]
    for g in report["groups"]:
        ci = g["ci95"] or {}
        cells = [
            g["value"],
            str(g["n"]),
            str(g["n_patients"]),
            str(g["errors"]),
            _with_ci(g["error_rate"], ci.get("error_rate")) + (" *" if _exact(ci) else ""),
            _with_ci(g["accuracy"], ci.get("accuracy")),
            _with_ci(g["balanced_accuracy"], ci.get("balanced_accuracy")),
            _with_ci(g["macro_auc"], ci.get("macro_auc")),
            *[f"{_fmt(g['recall'][c], 3)} (n={g['support'][c]})" for c in classes],
            g["note"] or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")

    if any(_exact(g["ci95"] or {}) for g in report["groups"]):
        lines += ["", "\\* no errors or only errors in the group: exact binomial (Clopper-Pearson) interval."]
    values = [g["value"] for g in report["groups"]]
    lines += [
        "",
        "## Error distribution per true class (% of the class's images vs % of its errors)",
        "",
        "| class | images | errors | " + " | ".join(f"{v}: % images / % errors" for v in values) + " |",
        "|---|---:|---:|" + "---:|" * len(values),
    ]
    for c, d in report["error_distribution"].items():
        cells = [f"{_pct(d['share_of_images'][v])} / {_pct(d['share_of_errors'][v])}" for v in values]
        lines.append(f"| {c} | {d['n']} | {d['errors']} | " + " | ".join(cells) + " |")

    t = report["test"]
    lines += ["", "## Do error rates differ?", ""]
    if t["test"] is not None:
        lines.append(f"{t['test']} on {', '.join(t['groups'])}: {t['conclusion']}.")
    else:
        lines.append(f"No test: {t['conclusion']}.")
    lines += ["", t["caveat"], ""]
    return "\n".join(lines)


def write_group_report(out_dir: Path, key: str, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write ``bias_<key>.json``, ``bias_<key>.md`` and ``bias_<key>.png`` (error rate per group with its interval,
    and per-class recall per group) into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    groups = report["groups"]
    png = plot_group_metrics(
        [g["value"] for g in groups],
        [g["n"] for g in groups],
        [g["error_rate"] for g in groups],
        [(g["ci95"] or {}).get("error_rate") for g in groups],
        {c: [g["recall"][c] for g in groups] for c in report["classes"]},
        out_dir / f"bias_{key}.png",
        too_few=[g["too_few"] for g in groups],
        title=f"Errors by {report['attribute']}",
    )
    return {
        "json": atomic_write_json(out_dir / f"bias_{key}.json", report),
        "md": atomic_write_text(out_dir / f"bias_{key}.md", group_report_markdown(report)),
        "png": png,
    }
