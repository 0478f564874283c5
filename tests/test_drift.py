"""Drift statistics of outputs files: self-BLEU against a hand-computed case, distinct-n, lengths."""

from __future__ import annotations

import math

import pytest

from cmerl.metrics import drift_stats, self_bleu


def test_self_bleu_by_hand():
    # t1 = "the cat sat on the mat today", t2 = "the cat sat on a mat today": 7 tokens each (BP = 1).
    # BLEU(t1 | t2): clipped 1-grams 6/7 (t2 has one "the"), 2-grams 4/6 (the cat, cat sat, sat on,
    # mat today), 3-grams 2/5 (the cat sat, cat sat on), 4-grams 1/4 (the cat sat on); BLEU(t2 | t1) has the
    # same counts. Geometric mean: (6/7 * 4/6 * 2/5 * 1/4) ** (1/4), times 100.
    t1, t2 = "the cat sat on the mat today", "the cat sat on a mat today"
    expected = 100 * (6 / 7 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert self_bleu([t1, t2]) == pytest.approx(expected, abs=1e-6)
    assert self_bleu([t1, t1, ""]) == pytest.approx(100.0)  # identical outputs; the empty one is left out
    assert self_bleu([t1]) is None and self_bleu([]) is None
    # t3 is 4 tokens, all in t1: precisions 4/4, 3/3, 2/2, 1/1 but BP = exp(1 - 7/4) against t1 (7 tokens).
    t3 = "the cat sat on"
    assert self_bleu([t3, t1], max_texts=None) == pytest.approx(
        (100 * math.exp(1 - 7 / 4) + 100 * (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25) / 2, abs=1e-6)


def test_drift_stats():
    texts = ["a b c d a b c d", "", "One two three."]
    st = drift_stats(texts, finish_reasons=["length", "stop", "stop"])
    assert st["n"] == 3 and st["chars_median"] == 14 and st["chars_mean"] == pytest.approx((15 + 0 + 14) / 3)
    assert st["words_mean"] == pytest.approx((8 + 0 + 3) / 3)
    assert st["distinct_1"] == pytest.approx(7 / 11)  # a b c d one two three of 11 words
    assert st["distinct_2"] == pytest.approx(6 / 9)  # ab bc cd da + one two, two three of 7 + 2 bigrams
    assert st["repeated_4gram_share"] == pytest.approx((1 / 5) / 3)
    assert st["empty_frac"] == pytest.approx(1 / 3) and st["truncated_frac"] == pytest.approx(1 / 3)
    assert drift_stats(texts)["truncated_frac"] is None
    assert drift_stats([])["n"] == 0
