"""Length-controlled win rate (the idea of AlpacaEval 2.0, Dubois et al. 2024, arXiv 2404.04475).

LLM judges prefer longer answers, so a system can raise its raw win rate by writing more. The
length-controlled win rate asks what the win rate would be if the two answers had the same length:

1. per judged pair i (errors dropped), the outcome ``y_i`` is 1 (a won), 0.5 (tie) or 0 (b won);
2. the feature is ``x_i = tanh(delta_i / sd)`` with ``delta_i = len_a - len_b`` in characters and ``sd`` the
   standard deviation of the deltas (AlpacaEval's ``length_controlled_v1`` uses the same squashed,
   standardised length difference);
3. a logistic model ``P(a wins) = sigmoid(b0 + b1 x)`` is fitted by maximum likelihood with scikit-learn
   (``LogisticRegression``, lbfgs, a very weak L2 penalty ``C = 1e4`` so that a file where one system wins
   every pair still gives a finite fit); a tie enters as half a win and half a loss (sample weights);
4. the length-controlled win rate is the model's prediction at zero length difference, ``sigmoid(b0)``.

Unlike AlpacaEval there is no per-instruction difficulty term (it needs the 805 AlpacaEval prompts and
a file from the hub), so this works on any prompt set. The interval is a percentile bootstrap over pairs
(refit on each resample, ``numpy.random.default_rng(seed)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

_SCORE = {"a": 1.0, "tie": 0.5, "b": 0.0}
MIN_PAIRS = 10
C_PENALTY = 1e4


@dataclass
class LengthControlled:
    """``win_rate``: the length-controlled win rate of A (``None`` when it cannot be fitted: fewer than
    ``MIN_PAIRS`` pairs, or every pair has the same length difference); ``raw``: the tie-adjusted win rate
    on the same pairs; ``length_coef``: b1 (log-odds per unit of the squashed length feature; positive
    means the judge favoured the longer answer); ``sd_chars``: the deltas' standard deviation."""

    win_rate: float | None
    ci_low: float | None
    ci_high: float | None
    raw: float | None
    length_coef: float | None
    intercept: float | None
    sd_chars: float | None
    n: int
    n_boot: int
    seed: int
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _fit(y: np.ndarray, delta: np.ndarray) -> tuple[float, float] | None:
    """``(b0, b1)`` of the logistic fit, or None when the deltas do not vary."""
    # deferred: sklearn (slow import, loaded only when used)
    from sklearn.linear_model import LogisticRegression

    sd = float(delta.std())
    if not sd > 0:
        return None
    x = np.tanh(delta / sd)
    n = y.size
    xs = np.concatenate([x, x]).reshape(-1, 1)
    labels = np.concatenate([np.ones(n), np.zeros(n)])
    weights = np.concatenate([y, 1.0 - y])
    keep = weights > 0
    if len(set(labels[keep].tolist())) < 2:
        b0 = math.inf if labels[keep][0] == 1 else -math.inf
        return b0, 0.0
    model = LogisticRegression(C=C_PENALTY, solver="lbfgs", max_iter=1000)
    model.fit(xs[keep], labels[keep], sample_weight=weights[keep])
    return float(model.intercept_[0]), float(model.coef_[0, 0])


def _sigmoid(z: float) -> float:
    if z == math.inf:
        return 1.0
    if z == -math.inf:
        return 0.0
    return 1.0 / (1.0 + math.exp(-z))


def length_controlled_win_rate(verdicts: Sequence[str], len_a: Sequence[float | None], len_b: Sequence[float | None],
                               *, n_boot: int = 500, seed: int = 0, level: float = 0.95) -> LengthControlled:
    """The length-controlled win rate of A over B (module docstring) with a bootstrap interval.

    ``verdicts[i]`` in {"a", "b", "tie", "error"}; pairs that are errors or lack a length are dropped.
    Raises ValueError when the three lists differ in length or a verdict is unknown.
    """
    if not (len(verdicts) == len(len_a) == len(len_b)):
        raise ValueError(f"got {len(verdicts)} verdicts, {len(len_a)} len_a and {len(len_b)} len_b")
    for i, v in enumerate(verdicts):
        if v not in _SCORE and v != "error":
            raise ValueError(f"verdict {i} is {v!r}; expected a, b, tie or error")
    keep = [i for i, v in enumerate(verdicts) if v != "error" and len_a[i] is not None and len_b[i] is not None]
    y = np.asarray([_SCORE[verdicts[i]] for i in keep], dtype=np.float64)
    delta = np.asarray([float(len_a[i]) - float(len_b[i]) for i in keep], dtype=np.float64)  # type: ignore[arg-type]
    raw = float(y.mean()) if y.size else None
    empty = LengthControlled(None, None, None, raw, None, None, float(delta.std()) if y.size else None, int(y.size),
                             n_boot, seed)
    if y.size < MIN_PAIRS:
        empty.note = f"needs at least {MIN_PAIRS} judged pairs with lengths (got {y.size})"
        return empty
    fit = _fit(y, delta)
    if fit is None:
        empty.note = "every pair has the same length difference; nothing to control for"
        return empty
    b0, b1 = fit
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, y.size, size=y.size)
        f = _fit(y[idx], delta[idx])
        if f is not None:
            boots.append(_sigmoid(f[0]))
    lo, hi = (np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]).tolist() if boots else (None, None))
    return LengthControlled(_sigmoid(b0), lo, hi, raw, b1, b0, float(delta.std()), int(y.size), n_boot, seed)
