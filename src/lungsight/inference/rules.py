"""Slice → patient decision rules.

A rule turns the per-slice positive-class probabilities of one patient's *selected* slices (in anatomical
order) into one patient decision and one continuous patient score (for ROC curves and AUC):

- ``threshold-0`` / ``threshold-10`` (paper 002): positive if the number of positive slices (p ≥ slice
  threshold) is strictly greater than t, with t = 0 or t = ``t_fraction`` × number of slices.
  Score: fraction of positive slices.
- ``consecutive`` (paper 003): positive if the longest run of consecutive positive slices is at least
  N_eff = min(``consecutive_n``, number of slices). Score: longest run / N_eff, clipped to [0, 1].
- ``mean``: positive if the mean probability is at least the slice threshold. Score: the mean probability.

See ``docs/evaluation.md`` for the definitions in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

RULES: tuple[str, ...] = ("threshold-0", "threshold-10", "consecutive", "mean")


@dataclass(frozen=True)
class RuleResult:
    """The patient decision of one rule.

    ``score`` is a continuous patient score in [0, 1] (higher = more likely positive); ``params`` holds the
    settings the rule used and its intermediate values (e.g. ``t``, ``n_eff``, ``longest_run``).
    """

    rule: str
    positive: bool
    score: float
    n_slices: int
    n_positive: int
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (plain Python types only)."""
        return {
            "rule": self.rule,
            "positive": bool(self.positive),
            "score": float(self.score),
            "n_slices": int(self.n_slices),
            "n_positive": int(self.n_positive),
            "params": dict(self.params),
        }


def _validate_probs(probs: ArrayLike) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if p.ndim != 1:
        raise ValueError(f"slice probabilities must be a 1-D array, got shape {p.shape}")
    if p.size == 0:
        raise ValueError("no slice probabilities given: the patient has no selected slices to decide on")
    if np.isnan(p).any():
        raise ValueError(f"slice probabilities contain NaN ({int(np.isnan(p).sum())} of {p.size} slices)")
    if p.min() < 0.0 or p.max() > 1.0:
        raise ValueError(f"slice probabilities must lie in [0, 1], got values from {p.min():.6g} to {p.max():.6g}")
    return p


def _longest_run(mask: np.ndarray) -> int:
    """Length of the longest run of True values in a 1-D boolean array."""
    if not mask.any():
        return 0
    padded = np.concatenate(([0], mask.astype(np.int8), [0]))
    edges = np.flatnonzero(np.diff(padded))
    starts, ends = edges[0::2], edges[1::2]
    return int((ends - starts).max())


def apply_rule(
    probs: ArrayLike,
    rule: str,
    *,
    slice_threshold: float = 0.5,
    t_fraction: float = 0.10,
    consecutive_n: int = 15,
) -> RuleResult:
    """Decide one patient from its selected slices' positive-class probabilities (anatomical order).

    Raises ``ValueError`` for an unknown rule, an empty input, NaN or probabilities outside [0, 1], or invalid
    settings.
    """
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    if not 0.0 <= slice_threshold <= 1.0:
        raise ValueError(f"slice_threshold must lie in [0, 1], got {slice_threshold}")
    p = _validate_probs(probs)
    n = int(p.size)
    positive_slices = p >= slice_threshold
    n_pos = int(positive_slices.sum())
    params: dict[str, Any] = {"slice_threshold": float(slice_threshold)}

    if rule in ("threshold-0", "threshold-10"):
        if rule == "threshold-0":
            t = 0.0
        else:
            if not 0.0 <= t_fraction <= 1.0:
                raise ValueError(f"t_fraction must lie in [0, 1], got {t_fraction}")
            # Rounded so that e.g. 0.1 × 30 compares as exactly 3, not 3.0000000000000004.
            t = round(t_fraction * n, 9)
            params["t_fraction"] = float(t_fraction)
        params["t"] = float(t)
        positive = n_pos > t
        score = n_pos / n
    elif rule == "consecutive":
        if int(consecutive_n) != consecutive_n or consecutive_n < 1:
            raise ValueError(f"consecutive_n must be a positive integer, got {consecutive_n}")
        n_eff = min(int(consecutive_n), n)
        longest = _longest_run(positive_slices)
        params.update({"consecutive_n": int(consecutive_n), "n_eff": n_eff, "longest_run": longest})
        positive = longest >= n_eff
        score = min(longest / n_eff, 1.0)
    else:  # mean
        mean = float(p.mean())
        params["mean_probability"] = mean
        positive = mean >= slice_threshold
        score = mean

    return RuleResult(
        rule=rule,
        positive=bool(positive),
        score=float(score),
        n_slices=n,
        n_positive=n_pos,
        params=params,
    )


def apply_all_rules(probs: ArrayLike, **kw: Any) -> dict[str, RuleResult]:
    """Apply every rule in :data:`RULES` to one patient; keyword settings are passed to :func:`apply_rule`."""
    return {rule: apply_rule(probs, rule, **kw) for rule in RULES}
