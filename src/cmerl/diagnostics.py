"""Degeneration diagnostics for sampled completions, and the repetition guard.

CME rewards text the verifier finds predictable, so a policy can drift toward short, repetitive output.
These statistics make that drift visible in the training log, and :class:`RepetitionGuard` takes the
reward away from completions that are mostly loops.

All functions take token-id sequences (``list[int]``; any hashable items work, e.g. words).

* :func:`distinct_n`: corpus-level distinct-n (Li et al. 2016): unique n-grams / all n-grams over a batch.
  1.0 = no n-gram occurs twice anywhere in the batch; low values = the batch repeats itself.
* :func:`repeated_ngram_share`: within one sequence, the share of its n-gram occurrences that repeat an
  n-gram seen earlier in the same sequence. 0.0 for fresh text, close to 1.0 for a loop.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass


def ngrams(seq: Sequence[Hashable], n: int) -> list[tuple]:
    """All contiguous n-grams of ``seq`` (empty when ``len(seq) < n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1 (got {n})")
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(seqs: Sequence[Sequence[Hashable]], n: int = 2) -> float:
    """Unique n-grams / total n-grams over all sequences; NaN when no sequence has n items."""
    total = 0
    unique: set[tuple] = set()
    for seq in seqs:
        grams = ngrams(seq, n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else math.nan


def repeated_ngram_share(seq: Sequence[Hashable], n: int = 4) -> float:
    """Share of the n-gram occurrences in ``seq`` that repeat an earlier one; 0.0 when ``len(seq) < n``."""
    grams = ngrams(seq, n)
    if not grams:
        return 0.0
    return (len(grams) - len(set(grams))) / len(grams)


@dataclass(frozen=True)
class RepetitionGuard:
    """Marks completions dominated by repeated n-grams; their reward is replaced by ``floor``.

    A completion is degenerate when ``repeated_ngram_share(ids, ngram) > max_share``. ``floor`` is in the
    reward's own units; the default (-20) is the scoring engine's per-token log-prob floor, i.e. the
    lowest CME a completion can get.
    """

    ngram: int = 4
    max_share: float = 0.5
    floor: float = -20.0

    def __post_init__(self) -> None:
        if self.ngram < 1:
            raise ValueError(f"repetition guard ngram must be >= 1 (got {self.ngram})")
        if not 0.0 <= self.max_share <= 1.0:
            raise ValueError(f"repetition guard max_share must be in [0, 1] (got {self.max_share})")

    def degenerate(self, seq: Sequence[Hashable]) -> bool:
        return repeated_ngram_share(seq, self.ngram) > self.max_share

    def apply(self, rewards: Sequence[float | None], seqs: Sequence[Sequence[Hashable]]) -> tuple[list, int]:
        """``(guarded rewards, number floored)``; ``None`` rewards (not applicable) stay ``None``."""
        if len(rewards) != len(seqs):
            raise ValueError(f"got {len(rewards)} rewards for {len(seqs)} completions")
        out, n_floored = [], 0
        for r, seq in zip(rewards, seqs):
            if r is not None and self.degenerate(seq):
                out.append(self.floor)
                n_floored += 1
            else:
                out.append(r)
        return out, n_floored


@dataclass(frozen=True)
class BatchDiagnostics:
    """Statistics of one batch of completions (token ids, EOS included when the model stopped).

    completion_length_mean: mean tokens per completion.
    truncated_frac: share of completions that hit ``max_completion_length`` without an EOS token.
    distinct_2: corpus-level distinct-2 over the batch (NaN when every completion is shorter than 2).
    repeated_4gram_share: mean over completions of :func:`repeated_ngram_share` with n=4.
    """

    completion_length_mean: float
    truncated_frac: float
    distinct_2: float
    repeated_4gram_share: float

    def as_metrics(self, prefix: str = "diagnostics/") -> dict[str, float]:
        """Metric name -> value; NaN values are left out."""
        values = {
            "completion_length_mean": self.completion_length_mean,
            "truncated_frac": self.truncated_frac,
            "distinct_2": self.distinct_2,
            "repeated_4gram_share": self.repeated_4gram_share,
        }
        return {prefix + k: float(v) for k, v in values.items() if not math.isnan(v)}


def batch_diagnostics(seqs: Sequence[Sequence[int]], *, eos_ids: Sequence[int] = (),
                      max_completion_length: int | None = None) -> BatchDiagnostics:
    """:class:`BatchDiagnostics` of ``seqs``. A completion counts as truncated when it holds none of
    ``eos_ids`` and has ``max_completion_length`` tokens or more (never, when that is ``None``)."""
    n = len(seqs)
    if n == 0:
        return BatchDiagnostics(math.nan, math.nan, math.nan, math.nan)
    eos = set(eos_ids)
    truncated = sum(
        1 for s in seqs
        if max_completion_length is not None and len(s) >= max_completion_length and not eos.intersection(s))
    # Strip the stop token so "text<eos>" and "text" count the same n-grams.
    bodies = [list(s[:-1]) if s and s[-1] in eos else list(s) for s in seqs]
    return BatchDiagnostics(
        completion_length_mean=sum(len(s) for s in seqs) / n,
        truncated_frac=truncated / n,
        distinct_2=distinct_n(bodies, 2),
        repeated_4gram_share=sum(repeated_ngram_share(s, 4) for s in bodies) / n,
    )
