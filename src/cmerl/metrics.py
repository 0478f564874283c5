"""Win rates, bootstrap intervals, preference accuracy, correlations, length and repetition statistics.

Pure functions over plain lists; numpy only. Conventions:

* A pairwise verdict is ``"a"`` (the first system won), ``"b"``, ``"tie"`` or ``"error"``. Errors are
  excluded from every rate and counted separately; a tie scores 0.5 (MT-Bench / AlpacaEval convention).
* Intervals are percentile bootstrap intervals over items (resampled with replacement, ``n_boot`` times,
  seeded), so the same inputs and seed always give the same interval. With one item the interval is that
  item's score; with no items every rate is ``None``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

VERDICTS = ("a", "b", "tie", "error")
_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Percentile bootstrap interval of the mean of ``values``; ``(None, None)`` for no values.

    Resamples ``len(values)`` items with replacement ``n_boot`` times with ``numpy.random.default_rng(seed)``
    and returns the ``(1-level)/2`` and ``(1+level)/2`` quantiles (numpy's default linear interpolation).
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return None, None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot, dtype=np.float64)
    chunk = max(1, 2_000_000 // x.size)  # bound memory: chunk rows x n items
    for s in range(0, n_boot, chunk):
        k = min(chunk, n_boot - s)
        means[s:s + k] = x[rng.integers(0, x.size, size=(k, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


@dataclass
class WinRate:
    """Summary of pairwise verdicts of system A against system B.

    n: judged pairs (errors excluded); win_rate: (wins + ties/2) / n; win_rate_no_ties: wins / (wins +
    losses), ``None`` when every pair is a tie; ci_low/ci_high: bootstrap interval of ``win_rate``;
    consistency: fraction of judged pairs whose two orders agreed (``None`` when no pair says);
    mean_len_a/b: mean response length in characters over judged pairs (``None`` when not given).
    """

    n: int
    wins: int
    ties: int
    losses: int
    errors: int
    win_rate: float | None
    win_rate_no_ties: float | None
    ci_low: float | None
    ci_high: float | None
    consistency: float | None
    mean_len_a: float | None
    mean_len_b: float | None
    level: float = 0.95
    n_boot: int = 10_000
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def win_rate(verdicts: Sequence[str], *, consistent: Sequence[bool | None] | None = None,
             len_a: Sequence[float | None] | None = None, len_b: Sequence[float | None] | None = None,
             n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> WinRate:
    """Tie-adjusted win rate of A over B with a bootstrap interval.

    ``verdicts[i]`` is one of :data:`VERDICTS`; the optional parallel lists give each pair's position
    consistency and response lengths. Raises naming the first unknown verdict.
    """
    for i, v in enumerate(verdicts):
        if v not in VERDICTS:
            raise ValueError(f"verdict {i} is {v!r}; expected one of {', '.join(VERDICTS)}")
    for name, seq in (("consistent", consistent), ("len_a", len_a), ("len_b", len_b)):
        if seq is not None and len(seq) != len(verdicts):
            raise ValueError(f"{name} has {len(seq)} items but there are {len(verdicts)} verdicts")
    keep = [i for i, v in enumerate(verdicts) if v != "error"]
    scores = [_SCORE[verdicts[i]] for i in keep]
    wins = sum(1 for i in keep if verdicts[i] == "a")
    losses = sum(1 for i in keep if verdicts[i] == "b")
    ties = len(keep) - wins - losses
    n = len(keep)
    lo, hi = bootstrap_ci(scores, n_boot=n_boot, seed=seed, level=level)
    cons = [consistent[i] for i in keep if consistent[i] is not None] if consistent is not None else []
    return WinRate(
        n=n, wins=wins, ties=ties, losses=losses, errors=len(verdicts) - n,
        win_rate=(wins + ties / 2) / n if n else None,
        win_rate_no_ties=wins / (wins + losses) if wins + losses else None,
        ci_low=lo, ci_high=hi,
        consistency=sum(bool(c) for c in cons) / len(cons) if cons else None,
        mean_len_a=_mean([len_a[i] for i in keep]) if len_a is not None else None,
        mean_len_b=_mean([len_b[i] for i in keep]) if len_b is not None else None,
        level=level, n_boot=n_boot, seed=seed)


@dataclass
class Rate:
    """A rate with its bootstrap interval: ``value`` is the mean of per-item scores in [0, 1]."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


def rate(scores: Sequence[float], *, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> Rate:
    """Mean of per-item scores (1 = success, 0.5 = half, 0 = failure) with a bootstrap interval."""
    lo, hi = bootstrap_ci(scores, n_boot=n_boot, seed=seed, level=level)
    return Rate(_mean(scores), lo, hi, len(scores))


def preference_scores(chosen: Sequence[float], rejected: Sequence[float]) -> list[float]:
    """Per pair: 1 when the chosen score is higher, 0.5 when equal, 0 when lower; NaN pairs raise."""
    if len(chosen) != len(rejected):
        raise ValueError(f"got {len(chosen)} chosen scores but {len(rejected)} rejected scores")
    out = []
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        if math.isnan(c) or math.isnan(r):
            raise ValueError(f"pair {i} has a NaN score (chosen={c}, rejected={r})")
        out.append(1.0 if c > r else 0.5 if c == r else 0.0)
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson correlation; ``None`` with fewer than 2 items or a constant input."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"x has {a.size} items but y has {b.size}")
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    r = np.empty(a.size, dtype=np.float64)
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and a[order[j + 1]] == a[order[i]]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation (Pearson of average ranks); ``None`` as for :func:`pearson`."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} items but y has {len(y)}")
    return pearson(ranks(x), ranks(y))


_WORD = re.compile(r"\w+", re.UNICODE)


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text (0 = none, near 1 = a
    loop); 0.0 for texts shorter than ``n`` words."""
    words = _WORD.findall(text.lower())
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def length_stats(texts: Sequence[str]) -> dict:
    """Characters (mean, median), words (mean), empty fraction and mean 4-gram repetition of texts."""
    if not texts:
        return {"n": 0, "mean_chars": None, "median_chars": None, "mean_words": None,
                "empty_frac": None, "repetition_4gram": None}
    chars = [len(t) for t in texts]
    return {"n": len(texts), "mean_chars": float(np.mean(chars)), "median_chars": float(np.median(chars)),
            "mean_words": float(np.mean([len(t.split()) for t in texts])),
            "empty_frac": sum(1 for t in texts if not t.strip()) / len(texts),
            "repetition_4gram": float(np.mean([repetition_rate(t) for t in texts]))}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def format_pct(x: float | None, digits: int = 1) -> str:
    """A rate in [0, 1] as a percentage with ``digits`` decimals (``0.4167`` → ``41.7%``); None → ``n/a``."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def format_signed(x: float | None) -> str:
    """A correlation or difference with its sign and two decimals (``0.2`` → ``+0.20``); None → ``n/a``."""
    return "n/a" if x is None else f"{x:+.2f}"
