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
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from cmerl.diagnostics import distinct_n, repeated_ngram_share

VERDICTS = ("a", "b", "tie", "error")
_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 10_000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | tuple[None, None]:
    """Percentile bootstrap interval of the mean of ``values``; ``(None, None)`` for no values.

    Resamples ``len(values)`` items with replacement ``n_boot`` times with ``numpy.random.default_rng(seed)``
    and returns the ``(1-level)/2`` and ``(1+level)/2`` quantiles (numpy's default linear interpolation).
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be an integer >= 1 (got {n_boot!r})")
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


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve of ``scores`` for telling ``labels`` True (positives) from False.

    It is P(a random positive scores higher than a random negative) + 1/2 P(they score the same), i.e. the
    Mann-Whitney U statistic over n_pos x n_neg: above 0.5 means positives score higher, 0.5 no
    separation, 1.0 every positive above every negative. Ties count 1/2 (average ranks). ``None`` when
    there is no positive or no negative; a NaN score raises ValueError naming it.
    """
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(labels), dtype=bool)
    if s.shape != y.shape:
        raise ValueError(f"got {s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError(f"score {int(np.flatnonzero(np.isnan(s))[0])} is NaN")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    rank_sum = float(ranks(s)[y].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


@dataclass
class Auroc:
    """An AUROC with a percentile bootstrap interval. ``n_pos`` / ``n_neg``: positives and negatives;
    ``n_groups``: clusters resampled (problems, when several samples share one); ``value`` and the
    interval are ``None`` when one class is empty."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n_pos: int
    n_neg: int
    n_groups: int

    def to_dict(self) -> dict:
        return asdict(self)


def auroc_interval(scores: Sequence[float], labels: Sequence[bool], groups: Sequence | None = None, *,
                   n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Auroc:
    """:func:`auroc` with a bootstrap interval over ``groups`` (a cluster bootstrap: whole groups are
    resampled with replacement, since samples of one problem are not independent; default one group per
    item). Resamples that lack a positive or a negative are drawn again, up to ``10 * n_boot`` draws."""
    s = np.asarray(list(scores), dtype=np.float64)
    y = np.asarray(list(labels), dtype=bool)
    value = auroc(s, y)
    keys = list(range(s.size)) if groups is None else list(groups)
    if len(keys) != s.size:
        raise ValueError(f"got {s.size} scores but {len(keys)} group ids")
    index: dict = {}
    for i, g in enumerate(keys):
        index.setdefault(g, []).append(i)
    members = [np.asarray(v) for v in index.values()]
    if value is None:
        return Auroc(None, None, None, int(y.sum()), int((~y).sum()), len(members))
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1) (got {level})")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    draws = 0
    while len(values) < n_boot and draws < 10 * n_boot:
        draws += 1
        rows = np.concatenate([members[g] for g in rng.integers(0, len(members), size=len(members))])
        v = auroc(s[rows], y[rows])
        if v is not None:
            values.append(v)
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2]) if values else (None, None)
    return Auroc(value, None if lo is None else float(lo), None if hi is None else float(hi),
                 int(y.sum()), int((~y).sum()), len(members))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021):
    ``1 - C(n - c, k) / C(n, k)``; needs ``1 <= k <= n`` and ``0 <= c <= n``."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


_WORD = re.compile(r"\w+", re.UNICODE)


def word_tokens(text: str) -> list[str]:
    """Lower-cased word tokens (``\\w+`` runs) of a text: the unit of the text-level statistics here."""
    return _WORD.findall(text.lower())


def repetition_rate(text: str, n: int = 4) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram of the same text (0 = none, near 1 = a
    loop); 0.0 for texts shorter than ``n`` words (:func:`cmerl.diagnostics.repeated_ngram_share` on words)."""
    return repeated_ngram_share(word_tokens(text), n)


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


def self_bleu(texts: Sequence[str], *, max_texts: int | None = 100, seed: int = 0) -> float | None:
    """Self-BLEU (Zhu et al. 2018): the mean over texts of sacrebleu's sentence BLEU (0-100, default 13a
    tokenisation, exp smoothing) of each text against all the *other* texts as references. High = the
    outputs resemble each other (less diverse). Empty texts are left out; with more than ``max_texts``
    texts a seeded random sample of that many is used (it is quadratic). ``None`` with fewer than 2."""
    import sacrebleu  # deferred: sacrebleu (slow import, loaded only when used)

    pool = [t for t in texts if t.strip()]
    if max_texts is not None and len(pool) > max_texts:
        pool = random.Random(seed).sample(pool, max_texts)
    if len(pool) < 2:
        return None
    scores = [sacrebleu.sentence_bleu(t, pool[:i] + pool[i + 1:]).score for i, t in enumerate(pool)]
    return float(np.mean(scores))


def drift_stats(texts: Sequence[str], *, finish_reasons: Sequence[str | None] | None = None,
                self_bleu_texts: int | None = 100, seed: int = 0) -> dict:
    """Drift statistics of a set of outputs (one system's answers): length in characters and words (mean,
    median, std with ddof 0), corpus-level distinct-1/2 over word tokens (:func:`cmerl.diagnostics.distinct_n`),
    self-BLEU (:func:`self_bleu`, 0-100), mean repeated 4-gram share per text (:func:`repetition_rate`),
    the empty fraction (blank after stripping) and the truncated fraction (``finish_reason == "length"``;
    ``None`` when no finish reasons are given). Empty input gives ``n = 0`` and ``None`` everywhere."""
    keys = ("chars_mean", "chars_median", "chars_std", "words_mean", "words_median", "words_std", "distinct_1",
            "distinct_2", "self_bleu", "repeated_4gram_share", "empty_frac", "truncated_frac")
    if not texts:
        return {"n": 0, **{k: None for k in keys}}
    if finish_reasons is not None and len(finish_reasons) != len(texts):
        raise ValueError(f"got {len(finish_reasons)} finish reasons for {len(texts)} texts")
    chars = np.asarray([len(t) for t in texts], dtype=np.float64)
    toks = [word_tokens(t) for t in texts]
    words = np.asarray([len(w) for w in toks], dtype=np.float64)

    def _nan_none(x: float) -> float | None:
        return None if math.isnan(x) else float(x)

    known = [r for r in finish_reasons if r is not None] if finish_reasons is not None else []
    return {"n": len(texts), "chars_mean": float(chars.mean()), "chars_median": float(np.median(chars)),
            "chars_std": float(chars.std()), "words_mean": float(words.mean()),
            "words_median": float(np.median(words)), "words_std": float(words.std()),
            "distinct_1": _nan_none(distinct_n(toks, 1)), "distinct_2": _nan_none(distinct_n(toks, 2)),
            "self_bleu": self_bleu(texts, max_texts=self_bleu_texts, seed=seed),
            "repeated_4gram_share": float(np.mean([repetition_rate(t) for t in texts])),
            "empty_frac": sum(1 for t in texts if not t.strip()) / len(texts),
            "truncated_frac": sum(1 for r in known if r == "length") / len(known) if known else None}


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def format_pct(x: float | None, digits: int = 1) -> str:
    """A rate in [0, 1] as a percentage with ``digits`` decimals (``0.4167`` → ``41.7%``); None → ``n/a``."""
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def format_signed(x: float | None) -> str:
    """A correlation or difference with its sign and two decimals (``0.2`` → ``+0.20``); None → ``n/a``."""
    return "n/a" if x is None else f"{x:+.2f}"
