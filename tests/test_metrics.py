"""Win-rate arithmetic and the bootstrap against hand-computed cases."""

from __future__ import annotations

import math

import pytest

from cmerl.metrics import (
    bootstrap_ci,
    length_stats,
    pearson,
    preference_scores,
    ranks,
    rate,
    repetition_rate,
    spearman,
    win_rate,
)


def test_mixed_verdicts_hand_computed():
    # W=2, T=1, L=1, one error: (2 + 0.5) / 4 = 0.625; without ties 2 / 3.
    w = win_rate(["a", "tie", "b", "error", "a"], consistent=[True, False, True, None, False],
                 len_a=[10, 20, 30, 1000, 40], len_b=[1, 2, 3, 1000, 4])
    assert (w.n, w.wins, w.ties, w.losses, w.errors) == (4, 2, 1, 1, 1)
    assert w.win_rate == pytest.approx(0.625)
    assert w.win_rate_no_ties == pytest.approx(2 / 3)
    assert w.consistency == pytest.approx(2 / 4)  # the error row's consistency is not counted
    assert w.mean_len_a == pytest.approx(25.0)  # (10+20+30+40)/4: the error row's lengths are excluded
    assert w.mean_len_b == pytest.approx(2.5)
    assert w.ci_low <= w.win_rate <= w.ci_high


def test_all_ties():
    w = win_rate(["tie"] * 7)
    assert (w.wins, w.ties, w.losses, w.errors) == (0, 7, 0, 0)
    assert w.win_rate == 0.5
    assert w.win_rate_no_ties is None  # no decisive pair
    assert (w.ci_low, w.ci_high) == (0.5, 0.5)  # every resample has mean 0.5


def test_all_errors():
    w = win_rate(["error"] * 3, consistent=[None] * 3, len_a=[1, 2, 3], len_b=[1, 2, 3])
    assert (w.n, w.errors) == (0, 3)
    assert w.win_rate is None and w.win_rate_no_ties is None
    assert (w.ci_low, w.ci_high) == (None, None)
    assert w.consistency is None and w.mean_len_a is None


def test_single_pair():
    w = win_rate(["a"])
    assert (w.win_rate, w.win_rate_no_ties, w.ci_low, w.ci_high) == (1.0, 1.0, 1.0, 1.0)
    w = win_rate(["b"])
    assert (w.win_rate, w.win_rate_no_ties, w.ci_low, w.ci_high) == (0.0, 0.0, 0.0, 0.0)


def test_no_verdicts():
    w = win_rate([])
    assert w.n == 0 and w.win_rate is None and w.ci_low is None


def test_bootstrap_two_items_spans_the_whole_range():
    # Resampling [1, 0]: means 0 (p=1/4), 0.5 (1/2), 1 (1/4), so the 2.5% and 97.5% quantiles are 0 and 1.
    assert bootstrap_ci([1.0, 0.0], n_boot=10_000, seed=3) == (0.0, 1.0)


def test_bootstrap_hand_computed_quantiles():
    # [1, 1, 1, 0]: the number of zeros drawn k ~ Binomial(4, 1/4). P(k=4)=0.0039 < 0.025 < P(k>=3)=0.0508,
    # so the 2.5% quantile of the mean is 0.25 (k=3); P(k=0)=0.316 > 0.025, so the 97.5% quantile is 1.
    lo, hi = bootstrap_ci([1.0, 1.0, 1.0, 0.0], n_boot=20_000, seed=0)
    assert lo == pytest.approx(0.25) and hi == pytest.approx(1.0)


def test_bootstrap_is_seeded_and_narrows_with_n():
    values = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5] * 3
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    lo_small, hi_small = bootstrap_ci(values[:8], seed=0)
    lo_big, hi_big = bootstrap_ci(values * 10, seed=0)
    assert hi_big - lo_big < hi_small - lo_small
    mean = sum(values) / len(values)
    # Normal approximation of the same interval: mean +- 1.96 sd / sqrt(n), within bootstrap noise.
    sd = math.sqrt(sum((v - mean) ** 2 for v in values * 10) / len(values * 10))
    half = 1.96 * sd / math.sqrt(len(values * 10))
    assert lo_big == pytest.approx(mean - half, abs=0.02) and hi_big == pytest.approx(mean + half, abs=0.02)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="verdict 1 is 'A'"):
        win_rate(["a", "A"])
    with pytest.raises(ValueError, match="len_a has 1 items"):
        win_rate(["a", "b"], len_a=[3])
    with pytest.raises(ValueError, match="pair 0 has a NaN"):
        preference_scores([float("nan")], [1.0])


def test_preference_scores_and_rate():
    s = preference_scores([3.0, 1.0, 2.0, 5.0], [1.0, 2.0, 2.0, 4.0])
    assert s == [1.0, 0.0, 0.5, 1.0]
    r = rate(s)
    assert r.value == pytest.approx(0.625) and r.n == 4


def test_correlations_hand_computed():
    assert ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    # Spearman without ties: 1 - 6 sum(d^2) / (n (n^2 - 1)) = 1 - 6*2/60 = 0.8
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [5, 5, 5]) is None
    assert pearson([1], [2]) is None


def test_repetition_and_length_stats():
    # 4-grams of "a b c d a b c d": abcd, bcda, cdab, dabc, abcd -> 5 grams, 4 distinct -> 0.2
    assert repetition_rate("a b c d a b c d") == pytest.approx(0.2)
    assert repetition_rate("short text") == 0.0
    st = length_stats(["abc", "", "hello world"])
    assert st["n"] == 3 and st["mean_chars"] == pytest.approx(14 / 3) and st["median_chars"] == 3
    assert st["empty_frac"] == pytest.approx(1 / 3) and st["mean_words"] == pytest.approx(1.0)
    assert length_stats([])["mean_chars"] is None
