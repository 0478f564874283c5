"""Token character offsets and the verifier -> policy token alignment (cmerl.alignment, cmerl.token_rewards).

Every ordered pair of the three packaged tokenizer families (SmolLM2/llama, Qwen2.5, Gemma 3) on unicode,
whitespace runs, CJK and emoji; identity for one tokenizer; conservation of the verifier's sum log-prob.
"""

from __future__ import annotations

import random

import hypothesis
import pytest
from hypothesis import strategies as st

from cmerl.alignment import align_tokens
from cmerl.formatting import RenderConfig, disjoint_spans, render_pair, token_char_spans
from cmerl.scoring.types import ResponseScore
from cmerl.token_rewards import policy_token_rewards

FAMILY_FIXTURES = ("smollm_tokenizer", "qwen_tokenizer", "gemma_tokenizer")
TEXTS = [
    "Hello, world! This is fine.",
    "  leading, internal   runs of spaces\n\n\n\ttabs\t\tand trailing  ",
    "naïve café — “quotes” … €5 ½ Ωmega",
    "東京は日本の首都です。北京和上海都很大！",
    "emoji 🙂👍🏽 mixed with 中文 and ascii",
    "code:\n    def f(x):\n        return x ** 2  # ✓\n",
    "\n\n",
]


def tokenizers(request) -> dict[str, object]:
    return {name: request.getfixturevalue(name) for name in FAMILY_FIXTURES}


def policy_completion(tok, text: str) -> tuple[list[int], str]:
    """Policy ids of ``text`` ending in EOS, and the completion text TRL would hand a reward (their decoding)."""
    ids = list(tok(text, add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
    return ids, tok.decode(ids, skip_special_tokens=True)


def assert_partition(spans: list[tuple[int, int]], text: str) -> None:
    assert spans == disjoint_spans(spans)
    assert "".join(text[a:b] for a, b in spans) == text


# ------------------------------------------------------------------------------------- offsets
@pytest.mark.parametrize("family", FAMILY_FIXTURES)
@pytest.mark.parametrize("include_eos", [False, True])
def test_response_offsets_cover_the_response(request, family, include_eos):
    tok = request.getfixturevalue(family)
    for text in TEXTS:
        pair = render_pair(tok, "Say something.", text, RenderConfig(include_eos=include_eos))
        offsets = pair.response_offsets
        assert len(offsets) == pair.n_response_tokens
        assert all(0 <= a <= b <= len(text) for a, b in offsets)
        covered = set()
        for a, b in offsets:
            covered.update(range(a, b))
        assert covered == set(range(len(text))), (family, text)
        if include_eos:
            assert offsets[-1] == (len(text), len(text))
        for tid, (a, b) in zip(pair.input_ids[pair.response_start:], offsets):
            piece = tok.decode([tid])
            if b - a and piece.isascii() and piece.strip():  # a whole ascii token is exactly its span
                assert text[a:b].strip() == piece.strip(), (family, text, piece)


def test_scores_carry_offsets_and_ids_and_keep_a_prefix_when_cut(tiny_llama_verifier):
    v = tiny_llama_verifier
    text = "A fairly long answer, with commas, numbers 12345 and 東京."
    full = v.score(["Q?"], [text])[0]
    pair = render_pair(v.tokenizer, "Q?", text, v.render_config)
    assert full.token_offsets == pair.response_offsets
    assert full.token_ids == pair.input_ids[pair.response_start:]
    assert len(full.token_offsets) == full.n_tokens
    short = type(v)(v.model, v.tokenizer, max_length=6)
    cut = short.score(["Q?"], [text])[0]
    assert cut.truncated and cut.n_tokens == 5
    assert cut.token_offsets == full.token_offsets[:5] and cut.token_ids == full.token_ids[:5]
    empty = v.score(["Q?"], [""])[0]
    assert empty.token_offsets == [] and empty.token_ids == []


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_policy_spans_partition_the_completion_canonical_and_not(request, family):
    tok = request.getfixturevalue(family)
    for text in TEXTS:
        ids, completion = policy_completion(tok, text)
        spans = token_char_spans(tok, ids, completion)
        assert len(spans) == len(ids)
        assert_partition(spans, completion)
        assert spans[-1] == (len(completion), len(completion))  # EOS
        # A sampled, non-canonical tokenisation (one token per character): the decoding path.
        odd = [t for ch in completion for t in tok(ch, add_special_tokens=False)["input_ids"]]
        odd_text = tok.decode(odd, skip_special_tokens=True)
        odd_spans = token_char_spans(tok, odd, odd_text)
        assert len(odd_spans) == len(odd)
        assert_partition(odd_spans, odd_text)


@pytest.mark.parametrize("family", FAMILY_FIXTURES)
def test_locally_non_canonical_tokenisations_match_full_decoding(request, family):
    """A sampled tokenisation that differs from the canonical one in a few places: the patched offsets
    (canonical runs + decoded stretches) equal the spans of the O(n^2) prefix decoding."""
    from cmerl.formatting import _patched_spans, _prefix_decoded_spans

    tok = request.getfixturevalue(family)
    # ascii: for the byte pieces of a multi-byte character the two rules pick different pieces (docstring)
    text = "The quick brown fox jumps over the lazy dog, twice:  and again,\n\tslowly (really)."
    canon = list(tok(text, add_special_tokens=False)["input_ids"])
    checked = 0
    for split_at in (0, 3, len(canon) // 2, len(canon) - 1):
        piece = tok.decode(canon[split_at:split_at + 1])
        chars = [t for ch in piece for t in tok(ch, add_special_tokens=False)["input_ids"]]
        ids = canon[:split_at] + chars + canon[split_at + 1:]
        completion = tok.decode(ids, skip_special_tokens=True)
        if ids == list(tok(completion, add_special_tokens=False)["input_ids"]):
            continue  # splitting gave the canonical tokens back
        enc = tok(completion, add_special_tokens=False, return_offsets_mapping=True)
        patched = _patched_spans(tok, ids, list(enc["input_ids"]),
                                 [tuple(o) for o in enc["offset_mapping"]], completion)
        assert patched is not None, (family, split_at)
        assert patched == _prefix_decoded_spans(tok, ids, completion), (family, split_at)
        assert token_char_spans(tok, ids + [tok.eos_token_id], completion)[:-1] == patched
        checked += 1
    assert checked >= 2


# ------------------------------------------------------------------------------------ alignment
def test_alignment_rules_by_hand():
    # text "abcdef": verifier "abc" "def" + end-of-turn; policy "ab" "cd" "ef" + EOS
    al = align_tokens([(0, 3), (3, 6), (6, 6)], [(0, 2), (2, 4), (4, 6), (6, 6)])
    assert al.targets == [[(0, 2 / 3), (1, 1 / 3)], [(1, 1 / 3), (2, 2 / 3)], [(3, 1.0)]]
    assert al.apply([-3.0, -6.0, -1.0]) == pytest.approx([-2.0, -3.0, -4.0, -1.0])
    assert al.misses == 0 and al.covered() == [True, True, True, True]
    # no policy EOS: the end-of-turn goes to the token ending at the end; no verifier end-of-turn: EOS uncovered
    assert align_tokens([(0, 6), (6, 6)], [(0, 3), (3, 6)]).targets[1] == [(1, 1.0)]
    assert align_tokens([(0, 6)], [(0, 3), (3, 6), (6, 6)]).covered() == [True, True, False]
    # texts that disagree: a verifier span beyond the policy text is a miss, placed on the nearest token
    miss = align_tokens([(0, 2), (8, 9)], [(0, 2), (2, 4)])
    assert miss.misses == 1 and miss.targets[1] == [(1, 1.0)]
    # identity on the common id prefix, offsets after it; no policy token: everything is a miss
    ident = align_tokens([(0, 2), (1, 2), (2, 4)], [(0, 2), (2, 2), (2, 4)], verifier_ids=[5, 6, 7],
                         policy_ids=[5, 6, 7])
    assert ident.is_identity and ident.targets == [[(0, 1.0)], [(1, 1.0)], [(2, 1.0)]]
    assert align_tokens([(0, 1)], []).misses == 1
    with pytest.raises(ValueError, match="overlap"):
        align_tokens([(0, 1)], [(0, 2), (1, 3)])
    with pytest.raises(ValueError, match="span 0"):
        align_tokens([(2, 1)], [(0, 2)])


@pytest.mark.parametrize("include_eos", [False, True])
def test_every_ordered_pair_of_families_conserves_and_never_misses(request, include_eos):
    toks = tokenizers(request)
    rng = random.Random(0)
    identities = 0
    for v_name, v_tok in toks.items():
        for p_name, p_tok in toks.items():
            for text in TEXTS:
                ids, completion = policy_completion(p_tok, text)
                p_spans = token_char_spans(p_tok, ids, completion)
                pair = render_pair(v_tok, "Say something.", completion, RenderConfig(include_eos=include_eos))
                v_ids = pair.input_ids[pair.response_start:]
                same = v_name == p_name
                al = align_tokens(pair.response_offsets, p_spans, verifier_ids=v_ids if same else None,
                                  policy_ids=ids if same else None)
                where = (v_name, p_name, text)
                assert al.misses == 0, where
                values = [rng.uniform(-20.0, 0.0) for _ in v_ids]
                assert sum(al.apply(values)) == pytest.approx(sum(values), abs=1e-9), where
                for tgt in al.targets:
                    assert sum(w for _, w in tgt) == pytest.approx(1.0)
                if include_eos:  # the verifier's end-of-turn value lands on the policy's EOS
                    assert al.targets[-1] == [(len(ids) - 1, 1.0)], where
                n_content = len(ids) - 1
                if same and v_ids[:n_content] == ids[:n_content]:
                    assert al.identity >= n_content, where
                    identities += 1
                elif same:  # the first token merged across the prompt boundary: the runs after it match
                    assert al.identity >= n_content - 3, where
                covered = al.covered()
                assert all(covered[i] for i, (a, b) in enumerate(p_spans) if b > a), where
    assert identities >= 2 * len(TEXTS)  # same-family pairs mostly tokenize the response identically


def test_policy_token_rewards_sum_to_the_scalar_reward(smollm_tokenizer, qwen_tokenizer):
    """Shares add up to the verifier's mean log-prob (the scalar CME); values to its sum; several verifiers
    average; an empty response keeps its empty score on the EOS."""
    completions = ["Fine, thanks — 東京 too.", ""]
    comp_ids = [list(smollm_tokenizer(c, add_special_tokens=False)["input_ids"]) + [smollm_tokenizer.eos_token_id]
                for c in completions]
    per_scorer = []
    for k, tok in enumerate((qwen_tokenizer, smollm_tokenizer)):
        scores = []
        for c in completions:
            pair = render_pair(tok, "How are you?", c)
            n = pair.n_response_tokens
            lp = [-(k + 1) * (0.5 + j) for j in range(n)]
            mean = sum(lp) / n if n else -20.0
            scores.append(ResponseScore(token_logprobs=lp, n_tokens=n, mean_logprob=mean,
                                        sum_logprob=sum(lp) if n else -20.0,
                                        token_ids=pair.input_ids[pair.response_start:],
                                        token_offsets=pair.response_offsets))
        per_scorer.append(scores)
    tr = policy_token_rewards(per_scorer, completions, comp_ids, smollm_tokenizer,
                              scorer_tokenizers=[qwen_tokenizer, smollm_tokenizer])
    for i in range(2):
        want_mean = sum(sc[i].mean_logprob for sc in per_scorer) / 2
        want_sum = sum(sc[i].sum_logprob for sc in per_scorer) / 2
        assert sum(tr.shares[i]) == pytest.approx(want_mean, abs=1e-9)
        assert sum(tr.values[i]) == pytest.approx(want_sum, abs=1e-9)
    assert tr.shares[1] == [-20.0] and tr.covered[1] == [True]
    assert tr.misses == 0 and tr.identity_tokens == per_scorer[1][0].n_tokens  # the smollm verifier: identity
    missing = [[ResponseScore(token_logprobs=[-1.0], n_tokens=1, mean_logprob=-1.0, sum_logprob=-1.0)]]
    with pytest.raises(ValueError, match="no token offsets"):
        policy_token_rewards(missing, ["x"], [[5]], smollm_tokenizer)


@st.composite
def segmentations(draw):
    """A text length, a disjoint policy tokenisation (some empty tokens) and an overlapping verifier one."""
    n = draw(st.integers(min_value=1, max_value=40))
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=n), max_size=20)))
    bounds = [0, *cuts, n]
    policy = [(bounds[k], bounds[k + 1]) for k in range(len(bounds) - 1)]
    verifier = []
    for _ in range(draw(st.integers(min_value=0, max_value=25))):
        a = draw(st.integers(min_value=0, max_value=n))
        b = draw(st.integers(min_value=a, max_value=min(n, a + 6)))
        verifier.append((a, b))
    values = draw(st.lists(st.floats(min_value=-20, max_value=0), min_size=len(verifier), max_size=len(verifier)))
    return policy, verifier, values


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(segmentations())
def test_conservation_property(case):
    policy, verifier, values = case
    al = align_tokens(verifier, policy)
    assert al.misses == 0  # the policy spans cover the whole text, so every verifier span overlaps one
    assert sum(al.apply(values)) == pytest.approx(sum(values), abs=1e-9)
    for (a, b), tgt in zip(verifier, al.targets):
        assert sum(w for _, w in tgt) == pytest.approx(1.0)
        if b > a:
            assert all(min(b, policy[i][1]) > max(a, policy[i][0]) for i, _ in tgt)
