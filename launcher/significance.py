"""How sure a sweep's Table 1 can be: confidence intervals over seeds and paired comparisons between cells.

A cell's seeds are independent draws of one method's score, so its 95 % interval is Student's t interval of their mean.
Two cells trained on the same seeds share splits, batch order and heads seed for seed, so they are compared pairwise:
the paired t-test on the per-seed differences (two-sided), which removes the variance the seeds have in common. With
three seeds it has two degrees of freedom: only a large, consistent gap reaches p < 0.05, and the table says "n/a"
where fewer than two seeds pair up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

LEVEL = 0.95
SIGNIFICANT = 0.05  # the p-value under which a comparison is marked in the table


@dataclass(frozen=True)
class Comparison:
    """``cell`` minus ``baseline`` over the seeds both have."""

    baseline: str  # the baseline cell's name in the table
    seeds: tuple[int, ...]
    diff_mean: float  # mean per-seed difference, in the scores' unit
    ci_low: float
    ci_high: float
    p_value: float

    @property
    def significant(self) -> bool:
        return self.p_value < SIGNIFICANT


def confidence_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float] | None:
    """Student's t interval of the mean of ``values``; None for fewer than two values."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = _half_width(x, level)
    return float(x.mean() - half), float(x.mean() + half)


def paired_comparison(cell: Mapping[int, float], baseline: Mapping[int, float], baseline_name: str,
                      level: float = LEVEL) -> Comparison | None:
    """Compare two cells' scores by seed (``{seed: score}``); None when fewer than two seeds are in both."""
    seeds = tuple(sorted(set(cell) & set(baseline)))
    if len(seeds) < 2:
        return None
    diffs = np.array([cell[s] - baseline[s] for s in seeds], dtype=float)
    mean, sd = float(diffs.mean()), float(diffs.std(ddof=1))
    if sd == 0.0:
        # every seed moved by the same amount: the t statistic is infinite (or 0/0 when nothing moved)
        p = 1.0 if mean == 0.0 else 0.0
        return Comparison(baseline_name, seeds, mean, mean, mean, p)
    t = mean / (sd / math.sqrt(len(seeds)))
    p = float(2.0 * stats.t.sf(abs(t), df=len(seeds) - 1))
    half = _half_width(diffs, level)
    return Comparison(baseline_name, seeds, mean, mean - half, mean + half, p)


def _half_width(x: np.ndarray, level: float) -> float:
    return float(stats.t.ppf(0.5 + level / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


def comparison_text(c: Comparison | None) -> str:
    """The table's cell: "+1.23 (p=0.031)*", the star marking p < 0.05; "n/a" without two paired seeds."""
    if c is None:
        return "n/a"
    return f"{c.diff_mean:+.2f} (p={c.p_value:.3f})" + ("*" if c.significant else "")
