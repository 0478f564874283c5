"""Dense (token-level) rewards: the verifier's per-token values moved onto the policy's completion tokens.

For completion ``i`` with policy tokens ``t = 0..n_i-1`` and one verifier, the verifier's per-token value
``v_j`` (``log p_V(y_j | x, y_<j)``, or ``-H_j``, the negated entropy of its next-token distribution, for
the ``neg_entropy`` signal) is aligned onto the policy tokens (:mod:`cmerl.alignment`)::

    r_it = sum_j w_jt v_j                 sum_t r_it = sum_j v_j  (conservation)
    rho_it = r_it / N_i                    sum_t rho_it = R_i, the scalar reward

``N_i`` is the number of tokens the verifier scored for the mean signals (``mean_logprob``,
``neg_entropy``) and 1 for ``sum_logprob``, so the *shares* ``rho_it`` add up to exactly the scalar CME
reward ``R_i`` that the same verifier pass gives. With several verifiers, ``r`` and ``rho`` are averaged
over them (each aligned with its own tokenizer). An empty response (the verifier scored no token) puts its
empty score on the first policy token (the EOS), so it keeps its penalty under every estimator.

Computed from the very :class:`~cmerl.scoring.types.ResponseScore` objects of the scalar reward: no second
verifier pass. Completions are identified by position in the call and checked by their token ids, never
looked up by decoded text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cmerl.alignment import align_tokens
from cmerl.formatting import completion_text, token_char_spans
from cmerl.scoring.types import ResponseScore

#: Signals with a per-token form (``self_certainty`` is a policy-side baseline).
DENSE_SIGNALS = ("mean_logprob", "sum_logprob", "neg_entropy")


@dataclass
class TokenRewards:
    """Per-policy-token rewards of one reward call (B completions).

    completion_ids: (B,) the policy token ids each row belongs to, as TRL passed them (EOS included).
    values: (B,) lists of ``r_it`` (one per policy token; 0 where no verifier token reached).
    shares: (B,) lists of ``rho_it``; each row sums to the scalar reward of that completion.
    covered: (B,) lists of bools: some verifier token gave weight to this policy token.
    misses: verifier tokens that overlapped no policy token (placed on the nearest one), over the batch.
    identity_tokens / verifier_tokens: verifier tokens aligned by id identity / in all.
    """

    completion_ids: list[list[int]]
    values: list[list[float]]
    shares: list[list[float]]
    covered: list[list[bool]]
    misses: int = 0
    identity_tokens: int = 0
    verifier_tokens: int = 0


_VOCAB_CACHE: dict[tuple[int, int], bool] = {}


def same_vocabulary(a: Any, b: Any) -> bool:
    """Whether two tokenizers map every token string to the same id (so equal ids mean equal tokens)."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    key = (id(a), id(b))
    if key not in _VOCAB_CACHE:
        try:
            _VOCAB_CACHE[key] = len(a) == len(b) and a.get_vocab() == b.get_vocab()
        except (AttributeError, TypeError):
            _VOCAB_CACHE[key] = False
    return _VOCAB_CACHE[key]


def token_values(score: ResponseScore, signal: str) -> list[float]:
    """``v_j`` of one score: its token log-probs, or its negated token entropies for ``neg_entropy``."""
    if signal in ("mean_logprob", "sum_logprob"):
        return list(score.token_logprobs)
    if signal == "neg_entropy":
        if score.token_entropies is None:
            raise ValueError("neg_entropy dense rewards need scores computed with entropy=True")
        return [-h for h in score.token_entropies]
    raise ValueError(f"signal {signal!r} has no per-token form; use one of {', '.join(DENSE_SIGNALS)}")


def policy_token_rewards(per_scorer: Sequence[Sequence[ResponseScore]], completions: Sequence,
                         completion_ids: Sequence[Sequence[int]], policy_tokenizer: Any, *,
                         signal: str = "mean_logprob", scorer_tokenizers: Sequence[Any] | None = None,
                         scorer_names: Sequence[str] | None = None) -> TokenRewards:
    """:class:`TokenRewards` of a batch from its verifier scores (see the module docstring for formulas).

    per_scorer: ``per_scorer[k][i]``, scorer k on completion i; each score needs ``token_offsets``.
    completions: TRL's completions (strings or assistant message lists): the text both sides share.
    completion_ids: TRL's completion ids (B,) of the policy, unpadded.
    scorer_tokenizers: each scorer's tokenizer (None where unknown): identity alignment is used only when
        it has the policy tokenizer's vocabulary.
    """
    n = len(completions)
    if len(completion_ids) != n or any(len(sc) != n for sc in per_scorer):
        raise ValueError(f"dense rewards need one score and one id list per completion ({n} completions, "
                         f"{len(completion_ids)} id lists, {[len(sc) for sc in per_scorer]} scores)")
    if not per_scorer:
        raise ValueError("dense rewards need at least one scorer")
    k_count = len(per_scorer)
    tokenizers = list(scorer_tokenizers) if scorer_tokenizers is not None else [None] * k_count
    names = list(scorer_names) if scorer_names is not None else [f"verifier {k}" for k in range(k_count)]
    same = [same_vocabulary(t, policy_tokenizer) for t in tokenizers]
    out = TokenRewards(completion_ids=[], values=[], shares=[], covered=[])
    for i in range(n):
        ids = [int(t) for t in completion_ids[i]]
        text = completion_text(completions[i])
        spans = token_char_spans(policy_tokenizer, ids, text)
        values = [0.0] * len(ids)
        shares = [0.0] * len(ids)
        covered = [False] * len(ids)
        for k in range(k_count):
            score = per_scorer[k][i]
            if score.n_tokens and score.token_offsets is None:
                raise ValueError(f"{names[k]} returned no token offsets for completion {i}; dense rewards need "
                                 "them (a local verifier, a remote one with a tokenizer, or a cmerl server >= 0.2)")
            v = token_values(score, signal)
            norm = float(max(score.n_tokens, 1)) if signal != "sum_logprob" else 1.0
            if score.n_tokens == 0:  # empty response: its empty score sits on the first policy token
                if ids:
                    values[0] += score.sum_logprob / k_count
                    shares[0] += score.signal(signal) / k_count
                    covered[0] = True
                continue
            al = align_tokens(score.token_offsets or [], spans, verifier_ids=score.token_ids if same[k] else None,
                              policy_ids=ids if same[k] else None)
            r = al.apply(v)
            for t, (val, cov) in enumerate(zip(r, al.covered())):
                values[t] += val / k_count
                shares[t] += val / norm / k_count
                covered[t] = covered[t] or cov
            out.misses += al.misses
            out.identity_tokens += al.identity
            out.verifier_tokens += al.n_verifier
        out.completion_ids.append(ids)
        out.values.append(values)
        out.shares.append(shares)
        out.covered.append(covered)
    return out
