"""Confidence intervals and paired comparisons, against hand-computed t statistics and scipy's own tests."""

import math

import numpy as np
import pytest
from scipy import stats

from launcher.significance import Comparison, comparison_text, confidence_interval, paired_comparison


def test_interval_is_students_t_of_the_mean():
    values = [80.0, 82.0, 84.0]  # mean 82, sd 2, n 3: half width t(0.975, 2) * 2 / sqrt(3)
    low, high = confidence_interval(values)
    half = 4.302652729749464 * 2 / math.sqrt(3)
    assert (low, high) == pytest.approx((82 - half, 82 + half), rel=1e-12)


def test_interval_needs_two_values():
    assert confidence_interval([81.0]) is None
    assert confidence_interval([]) is None


def test_paired_comparison_matches_scipys_paired_t_test():
    cell = {1: 84.1, 2: 85.0, 3: 83.2, 4: 86.0}
    baseline = {1: 83.0, 2: 84.6, 3: 82.9, 4: 84.1}
    c = paired_comparison(cell, baseline, "KD")
    expected = stats.ttest_rel([cell[s] for s in (1, 2, 3, 4)], [baseline[s] for s in (1, 2, 3, 4)])
    assert c is not None and c.baseline == "KD" and c.seeds == (1, 2, 3, 4)
    assert c.p_value == pytest.approx(expected.pvalue, rel=1e-10)
    diffs = np.array([1.1, 0.4, 0.3, 1.9])
    assert c.diff_mean == pytest.approx(diffs.mean())
    assert (c.ci_low, c.ci_high) == pytest.approx(confidence_interval(diffs))
    assert c.ci_low < c.diff_mean < c.ci_high


def test_only_seeds_in_both_cells_pair_up():
    c = paired_comparison({1: 80.0, 2: 81.0, 3: 90.0}, {2: 79.0, 3: 88.5, 7: 50.0}, "KD")
    assert c is not None and c.seeds == (2, 3)
    assert c.diff_mean == pytest.approx(1.75)
    assert paired_comparison({1: 80.0, 2: 81.0}, {2: 79.0, 3: 70.0}, "KD") is None


def test_the_test_tells_a_consistent_gap_from_noise():
    consistent = paired_comparison({1: 85.0, 2: 86.1, 3: 84.9}, {1: 82.0, 2: 83.0, 3: 82.1}, "KD")
    noisy = paired_comparison({1: 85.0, 2: 81.0, 3: 84.0}, {1: 82.0, 2: 84.0, 3: 83.0}, "KD")
    assert consistent is not None and consistent.significant and consistent.p_value < 0.01
    assert noisy is not None and not noisy.significant and noisy.p_value > 0.5


def test_equal_differences_give_an_exact_verdict():
    same = paired_comparison({1: 80.0, 2: 81.0}, {1: 80.0, 2: 81.0}, "KD")
    shifted = paired_comparison({1: 81.0, 2: 82.0}, {1: 80.0, 2: 81.0}, "KD")
    assert same is not None and (same.diff_mean, same.p_value) == (0.0, 1.0)
    assert shifted is not None and (shifted.diff_mean, shifted.p_value, shifted.ci_low) == (1.0, 0.0, 1.0)


def test_comparison_text_marks_significance():
    assert comparison_text(None) == "n/a"
    assert comparison_text(Comparison("KD", (1, 2, 3), 1.234, 0.5, 2.0, 0.0312)) == "+1.23 (p=0.031)*"
    assert comparison_text(Comparison("KD", (1, 2, 3), -0.5, -2.0, 1.0, 0.41)) == "-0.50 (p=0.410)"
