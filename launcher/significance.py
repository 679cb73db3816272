"""How sure a sweep's Table 1 can be: confidence intervals over seeds and paired comparisons between cells.

A cell's seeds are independent draws of one method's score, so its 95 % interval is Student's t interval of their mean.
Two cells trained on the same seeds share splits, batch order and heads seed for seed, so they are compared pairwise:
the paired t-test on the per-seed differences (two-sided), which removes the variance the seeds have in common. With
three seeds it has two degrees of freedom: only a large, consistent gap reaches p < 0.05, and the table says "n/a"
where fewer than two seeds pair up.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from launcher.identity import OFF

BASELINE = "kd"  # the algorithm every distillation cell of Table 1 is compared with
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


def compare_cells(cells: Sequence[Any], rows: list[dict[str, Any]]) -> None:
    """Fill each distillation row of Table 1 (``launcher.report``: its cells and their rows, aligned) with its paired
    comparisons: with its KD baseline (KD with the same teachers, student, warm-up and noise; else clean KD without
    warm-up) and, for several teachers, with the best single-teacher row of its teachers."""
    index = {_key(c): r for c, r in zip(cells, rows)}
    any_extras: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for c, r in zip(cells, rows):
        any_extras[_key(c, extras=None)].append(r)
    for c, row in zip(cells, rows):
        if not c.distills:
            continue
        kd = _kd_baseline(c, index, any_extras)
        if kd is not None:
            _set(row, "vs_kd", kd)
        if len(c.teachers) > 1:
            singles = [index.get(_key(c, algorithm=c.algorithm, teachers=(t,))) for t in c.teachers]
            finished = [s for s in singles if s is not None and s["score_mean"] is not None]
            if finished:
                _set(row, "vs_one_teacher", max(finished, key=lambda s: s["score_mean"]))


def _kd_baseline(c: Any, index: dict[tuple, dict[str, Any]],
                 any_extras: dict[tuple, list[dict[str, Any]]]) -> dict[str, Any] | None:
    same = index.get(_key(c, algorithm=BASELINE))
    if c.algorithm != BASELINE and same is not None:
        return same
    clean = _key(c, algorithm=BASELINE, warmup=0.0, noise=OFF)
    if clean == _key(c):
        return None
    if clean in index:
        return index[clean]
    # a setting KD has no cell of (MetaDistil's hidden-state term, say): the one clean KD cell of these teachers,
    # student and task, whatever its grid.extra values
    others = any_extras.get(_key(c, algorithm=BASELINE, warmup=0.0, noise=OFF, extras=None), [])
    return others[0] if len(others) == 1 else None


def _key(c: Any, **change: Any) -> tuple:
    """A cell's identity without its block, as seen by the comparisons: teachers as a tuple of labels."""
    fields = {"algorithm": c.algorithm, "teachers": tuple(c.teachers), "student": c.student, "warmup": c.warmup,
              "noise": c.noise, "extras": c.extras, "task": c.task}
    return tuple({**fields, **change}.values())


def _set(row: dict[str, Any], name: str, baseline: dict[str, Any]) -> None:
    row["baselines"][name] = baseline["method"]
    row[name] = paired_comparison(row["by_seed"], baseline["by_seed"], baseline["method"])
