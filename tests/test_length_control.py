"""The length-controlled win rate removes a known length effect from synthetic verdicts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmerl.length_control import MIN_PAIRS, length_controlled_win_rate


def _synthetic(b0: float, b1: float, n: int, seed: int):
    """Verdicts whose expected score (a = 1, tie = 0.5, b = 0) is p = sigmoid(b0 + b1 tanh(delta / sd)), with A
    mostly longer: 10% ties, and a wins the rest with probability (p - 0.05) / 0.9."""
    rng = np.random.default_rng(seed)
    len_b = rng.integers(200, 800, n).astype(float)
    len_a = len_b + rng.normal(400, 300, n)
    delta = len_a - len_b
    p = 1 / (1 + np.exp(-(b0 + b1 * np.tanh(delta / delta.std()))))
    q = np.clip((p - 0.05) / 0.9, 0, 1)
    u, t = rng.random(n), rng.random(n)
    verdicts = ["tie" if t[i] < 0.1 else ("a" if u[i] < q[i] else "b") for i in range(n)]
    return verdicts, list(len_a), list(len_b)


@pytest.mark.parametrize("b0", [0.0, 0.8])
def test_length_effect_is_removed(b0):
    truth = 1 / (1 + math.exp(-b0))  # the expected score at equal length
    fits = [length_controlled_win_rate(*_synthetic(b0, 2.0, 2000, seed=s), n_boot=0) for s in range(5)]
    # the longer system's raw win rate is inflated by the length effect; the length-controlled one is not
    assert min(f.raw for f in fits) > truth + 0.1
    assert abs(np.mean([f.win_rate for f in fits]) - truth) < 0.03
    assert np.mean([f.length_coef for f in fits]) == pytest.approx(2.0, abs=0.3)
    lc = length_controlled_win_rate(*_synthetic(b0, 2.0, 2000, seed=0), n_boot=200, seed=0)
    # the interval sits around the length-controlled estimate, far from the raw rate
    assert lc.ci_low <= lc.win_rate <= lc.ci_high and lc.ci_high - lc.ci_low < 0.15
    assert lc.ci_high < lc.raw - 0.1


def test_no_length_effect_keeps_the_raw_rate():
    verdicts, la, lb = _synthetic(0.4, 0.0, 2000, seed=3)
    lc = length_controlled_win_rate(verdicts, la, lb, n_boot=200)
    assert abs(lc.win_rate - lc.raw) < 0.04 and abs(lc.length_coef) < 0.3


def test_edge_cases():
    few = length_controlled_win_rate(["a"] * (MIN_PAIRS - 1), [10] * (MIN_PAIRS - 1), [5] * (MIN_PAIRS - 1))
    assert few.win_rate is None and "at least" in few.note
    same = length_controlled_win_rate(["a", "b"] * 10, [10] * 20, [5] * 20)
    assert same.win_rate is None and "same length difference" in same.note
    allwin = length_controlled_win_rate(["a"] * 20 + ["error"], list(range(21)), [5] * 21, n_boot=20)
    assert allwin.n == 20 and allwin.win_rate > 0.99 and allwin.raw == 1.0
    with pytest.raises(ValueError, match="verdict 0 is 'x'"):
        length_controlled_win_rate(["x"], [1], [1])
