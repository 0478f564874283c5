"""Verifier tokens -> policy tokens: how a per-token verifier value becomes a value per policy token.

Both tokenisations describe one string, the completion text ``y`` (what TRL decodes from the policy's
completion ids and hands the verifier). Each token has a character span in ``y``: the verifier's from its
rendering (:attr:`cmerl.scoring.types.ResponseScore.token_offsets`), the policy's from
:func:`cmerl.formatting.token_char_spans`. Verifier token ``j`` (value ``v_j``) is spread over policy tokens
with weights ``w_ji`` (``sum_i w_ji = 1``); policy token ``i`` gets ``r_i = sum_j w_ji v_j``.

Rules, in order, for verifier token ``j``:

1. **Identity**: runs of equal token ids (same tokenizer) that start and end at the same characters on
   both sides map one to one: token ``j`` of the run goes whole to its policy twin. This is exact even
   where spans are ambiguous (byte-level pieces of one character); when the two tokenisations differ
   somewhere (a token merging across the prompt boundary), the runs around the difference still match.
2. **Overlap**: a token with a non-empty span ``[a, b)`` is apportioned over the policy tokens whose
   (disjoint) spans ``[c, d)`` it overlaps, by overlap length: ``w_ji = |[a,b) & [c,d)| / sum_i |...|``.
3. **Empty span** ``(p, p)`` (special tokens; the verifier's end-of-turn token of ``include_eos`` sits at
   ``p = len(y)``): to the last policy token with an empty span at ``p`` (the policy's EOS / end-of-turn),
   else the policy token containing ``p``, else the one ending at ``p``, else the nearest.
4. **Miss**: a non-empty span that overlaps no non-empty policy span (the texts disagree) goes whole to
   the nearest policy token, and is counted in :attr:`Alignment.misses`.

**Conservation**: every verifier token's weights sum to 1, so whenever the completion has at least one
policy token, ``sum_i r_i = sum_j v_j`` (up to float rounding): the per-policy-token rewards of a
completion sum to the verifier's sum log-prob of it. With no policy token at all, every verifier token is
a miss and its value is dropped.

**Special tokens' value**: a policy EOS / end-of-turn token gets the verifier's end-of-turn value when the
verifier scored one (``include_eos``, rule 3), else nothing. Policy tokens that no verifier token reaches
(an EOS without a verifier end-of-turn, empty byte pieces, tokens after a verifier-side truncation) are
reported as not ``covered``; their value is 0.

Pure Python, no torch.
"""

from __future__ import annotations

import bisect
import difflib
from collections.abc import Sequence
from dataclasses import dataclass

from cmerl.formatting import disjoint_spans

Span = tuple[int, int]


@dataclass(frozen=True)
class Alignment:
    """Weights from ``n_verifier`` verifier tokens to ``n_policy`` policy tokens.

    targets: per verifier token, ``[(policy index, weight), ...]`` with weights summing to 1 (empty only
        when there is no policy token).
    misses: verifier tokens placed by the nearest-token fallback (rule 4) or dropped (no policy token).
    identity: verifier tokens matched to a policy token of the same id one to one (rule 1).
    """

    n_policy: int
    n_verifier: int
    targets: list[list[tuple[int, float]]]
    misses: int = 0
    identity: int = 0

    def apply(self, values: Sequence[float]) -> list[float]:
        """Per-policy-token sums ``r_i = sum_j w_ji values[j]``; ``values``: (n_verifier,)."""
        if len(values) != self.n_verifier:
            raise ValueError(f"{len(values)} values for an alignment of {self.n_verifier} verifier tokens")
        out = [0.0] * self.n_policy
        for j, tgt in enumerate(self.targets):
            v = float(values[j])
            for i, w in tgt:
                out[i] += w * v
        return out

    def covered(self) -> list[bool]:
        """(n_policy,) whether any verifier token gives weight to each policy token."""
        out = [False] * self.n_policy
        for tgt in self.targets:
            for i, w in tgt:
                if w > 0:
                    out[i] = True
        return out

    @property
    def is_identity(self) -> bool:
        """Every verifier token matched a policy token by id (rule 1)."""
        return self.identity == self.n_verifier


def _check_spans(spans: Sequence[Span], what: str) -> list[Span]:
    out = []
    for k, sp in enumerate(spans):
        a, b = int(sp[0]), int(sp[1])
        if a < 0 or b < a:
            raise ValueError(f"{what} span {k} is {sp!r}; spans must be (start, end) with 0 <= start <= end")
        out.append((a, b))
    return out


def align_tokens(verifier_spans: Sequence[Span], policy_spans: Sequence[Span], *,
                 verifier_ids: Sequence[int] | None = None, policy_ids: Sequence[int] | None = None) -> Alignment:
    """The :class:`Alignment` of verifier tokens onto policy tokens (rules in the module docstring).

    verifier_spans: (n_verifier,) character spans in the completion text, in text order; may overlap.
    policy_spans: (n_policy,) spans of the policy tokens, disjoint and in text order
        (:func:`cmerl.formatting.token_char_spans` gives such spans).
    verifier_ids, policy_ids: token ids; pass both only when the two tokenizers share a vocabulary (then
        equal ids are equal tokens) to align matching runs by identity.
    """
    v = _check_spans(verifier_spans, "verifier")
    p = _check_spans(policy_spans, "policy")
    n_v, n_p = len(v), len(p)
    if n_p == 0:
        return Alignment(n_policy=0, n_verifier=n_v, targets=[[] for _ in v], misses=n_v)
    for k in range(1, n_p):
        if p[k][0] < p[k - 1][1]:
            raise ValueError(f"policy spans {k - 1} {p[k - 1]} and {k} {p[k]} overlap; pass disjoint spans "
                             "(cmerl.formatting.disjoint_spans)")
    twin: dict[int, int] = {}
    if verifier_ids is not None and policy_ids is not None:
        twin = _identity_runs(v, p, [int(t) for t in verifier_ids[:n_v]], [int(t) for t in policy_ids[:n_p]])
    nonempty = [i for i in range(n_p) if p[i][1] > p[i][0]]
    starts = [p[i][0] for i in nonempty]
    ends = [p[i][1] for i in nonempty]
    targets: list[list[tuple[int, float]]] = []
    misses = 0
    for j in range(n_v):
        if j in twin:
            targets.append([(twin[j], 1.0)])
            continue
        a, b = v[j]
        if b > a:
            tgt = _overlaps(a, b, nonempty, starts, ends, p)
            if not tgt:
                tgt = [(_nearest(a, b, p), 1.0)]
                misses += 1
        else:
            tgt = [(_empty_target(a, p, nonempty, starts, ends), 1.0)]
        targets.append(tgt)
    return Alignment(n_policy=n_p, n_verifier=n_v, targets=targets, misses=misses, identity=len(twin))


def _identity_runs(v: list[Span], p: list[Span], v_ids: list[int], p_ids: list[int]) -> dict[int, int]:
    """Verifier index -> policy index for the runs of equal ids (difflib's matching blocks) that start and
    end at the same characters on both sides (verifier spans compared after
    :func:`~cmerl.formatting.disjoint_spans`)."""
    dv = disjoint_spans(v)
    twin: dict[int, int] = {}
    matcher = difflib.SequenceMatcher(None, v_ids, p_ids, autojunk=False)
    for jv, jp, size in matcher.get_matching_blocks():
        if size and dv[jv][0] == p[jp][0] and dv[jv + size - 1][1] == p[jp + size - 1][1]:
            twin.update((jv + k, jp + k) for k in range(size))
    return twin


def _overlaps(a: int, b: int, nonempty: list[int], starts: list[int], ends: list[int],
              p: list[Span]) -> list[tuple[int, float]]:
    """Policy tokens overlapping ``[a, b)`` with weights proportional to overlap length (summing to 1)."""
    k = bisect.bisect_right(ends, a)  # first non-empty policy token ending after a
    parts = []
    while k < len(nonempty) and starts[k] < b:
        i = nonempty[k]
        overlap = min(b, p[i][1]) - max(a, p[i][0])
        if overlap > 0:
            parts.append((i, overlap))
        k += 1
    total = sum(o for _, o in parts)
    return [(i, o / total) for i, o in parts]


def _nearest(a: int, b: int, p: list[Span]) -> int:
    """Index of the policy token closest to ``[a, b)`` (gap in characters; ties: the earlier token)."""
    best, best_gap = 0, None
    for i, (c, d) in enumerate(p):
        gap = max(c - b, a - d, 0)
        if best_gap is None or gap < best_gap:
            best, best_gap = i, gap
    return best


def _empty_target(pos: int, p: list[Span], nonempty: list[int], starts: list[int], ends: list[int]) -> int:
    """Policy token an empty verifier span at ``pos`` goes to (rule 3)."""
    for i in range(len(p) - 1, -1, -1):  # the last one: a trailing EOS rather than an empty byte piece
        if p[i][0] == p[i][1] == pos:
            return i
    k = bisect.bisect_right(starts, pos) - 1  # last non-empty token starting at or before pos
    if k >= 0 and ends[k] > pos:
        return nonempty[k]
    k = bisect.bisect_left(ends, pos)
    if k < len(ends) and ends[k] == pos:
        return nonempty[k]
    return _nearest(pos, pos, p)
