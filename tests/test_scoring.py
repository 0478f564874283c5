"""The verifier engine against a plain float64 reference; batching, truncation, empty responses, floors."""

from __future__ import annotations

import math
import random

import pytest
import torch
from _core_helpers import reference
from conftest import PEAK_SCALE

from cmerl.formatting import render_pair
from cmerl.scoring import DEFAULT_LOGPROB_FLOOR, ResponseScore, ScoreRequest, Verifier
from cmerl.scoring.requests import PreparedRequest, plan_batches
from cmerl.testing import tiny_for_tokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet forest, then explain the imagery line by line.",
    "2+2?",
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a primary colour."}],
    "Translate 'good morning' into German.",
    "Explain recursion to a child.",
]
RESPONSES = [
    "The capital of France is Paris.",
    ("Red leaves drift down,\nsilence gathers on the path,\nthe forest exhales.\n\nLine one shows motion; "
     "line two, stillness; line three, the forest as a living thing."),
    "4",
    "Blue.",
    "Guten Morgen!",
    ("Imagine a set of nesting dolls: to find the smallest, you open one doll, and inside is a smaller doll, "
     "and you keep opening until there is no doll left inside. Recursion is a task that contains a smaller "
     "copy of itself."),
]


def assert_matches_reference(verifier: Verifier, score: ResponseScore, ids: list[int], start: int,
                             tol: float = 1e-4) -> None:
    ref = reference(verifier.model, ids, start)
    lp = ref["logprobs"].clamp_min(verifier.logprob_floor)
    assert score.n_tokens == len(ids) - start == len(score.token_logprobs)
    torch.testing.assert_close(torch.tensor(score.token_logprobs, dtype=torch.float64), lp, atol=tol, rtol=0)
    assert score.mean_logprob == pytest.approx(float(lp.mean()), abs=tol)
    assert score.sum_logprob == pytest.approx(float(lp.sum()), abs=tol * len(lp))
    if score.token_entropies is not None:
        torch.testing.assert_close(torch.tensor(score.token_entropies, dtype=torch.float64), ref["entropy"],
                                   atol=tol, rtol=0)
        assert score.mean_entropy == pytest.approx(float(ref["entropy"].mean()), abs=tol)
    if score.token_self_certainty is not None:
        torch.testing.assert_close(torch.tensor(score.token_self_certainty, dtype=torch.float64),
                                   ref["self_certainty"], atol=tol, rtol=0)
        assert score.mean_self_certainty == pytest.approx(float(ref["self_certainty"].mean()), abs=tol)


# ---------------------------------------------------------------------------------------------- exactness
def test_engine_equals_float64_reference(tiny_verifier):
    v = tiny_verifier
    scores = v.score(PROMPTS, RESPONSES, entropy=True, self_certainty=True)
    assert len(scores) == len(PROMPTS)
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores):
        req = v.render(prompt, response)
        assert not score.truncated
        assert_matches_reference(v, score, req.input_ids, req.response_start)


def test_render_is_render_pair(tiny_llama_verifier):
    v = tiny_llama_verifier
    pair = render_pair(v.tokenizer, PROMPTS[0], RESPONSES[0], v.render_config)
    assert v.render(PROMPTS[0], RESPONSES[0]) == ScoreRequest(pair.input_ids, pair.response_start)


def test_independent_of_batch_composition_padding_order_and_budget(tiny_verifier):
    v = tiny_verifier
    base = Verifier(v.model, v.tokenizer, max_batch_tokens=10**6, max_padding=1.0)  # one padded batch
    one_by_one = [base.score([p], [r])[0] for p, r in zip(PROMPTS, RESPONSES)]
    together = base.score(PROMPTS, RESPONSES)
    tight = Verifier(v.model, v.tokenizer, max_batch_tokens=40, head_chunk=7).score(PROMPTS, RESPONSES)
    default = Verifier(v.model, v.tokenizer).score(PROMPTS, RESPONSES)  # CPU default: little padding
    order = list(range(len(PROMPTS)))
    random.Random(0).shuffle(order)
    shuffled = base.score([PROMPTS[i] for i in order], [RESPONSES[i] for i in order])
    unshuffled = [None] * len(order)
    for pos, i in enumerate(order):
        unshuffled[i] = shuffled[pos]
    for variant in (together, tight, default, unshuffled):
        for a, b in zip(one_by_one, variant):
            assert a.n_tokens == b.n_tokens
            torch.testing.assert_close(torch.tensor(a.token_logprobs), torch.tensor(b.token_logprobs),
                                       atol=2e-5, rtol=0)


LONG_PROMPT = ("Read the following notes and answer the question at the end. " * 8
               + "Question: what should the reader do first?")
GROUP_RESPONSES = ["Read the notes.", "First, read the notes carefully, then answer the question.", "Answer.",
                   "\nStart with the notes.", "They should begin by reading every note from the top, one by one."]


def test_shared_prompt_prefix_equals_reference(tiny_verifier):
    """A GRPO-shaped batch (one prompt, several responses) runs the prompt once and reuses its KV cache;
    scores equal the float64 reference and the unshared engine (the prompt is longer than the tiny Gemma's
    64-token sliding window, so the cache's window handling is exercised too)."""
    v = tiny_verifier
    prompts = [LONG_PROMPT] * len(GROUP_RESPONSES) + ["Something else entirely?"]
    responses = GROUP_RESPONSES + ["A lone answer."]
    requests = [v.render(p, r) for p, r in zip(prompts, responses)]
    assert requests[0].response_start > 64
    shared = Verifier(v.model, v.tokenizer, max_batch_tokens=600)  # several batches for the group
    plan = shared._plan([PreparedRequest(r.input_ids, r.response_start, False) for r in requests],
                        list(range(len(requests))))
    grouped = [rows for prefix_len, _, rows in plan if prefix_len]
    assert sum(len(rows) for rows in grouped) >= 4 and len(grouped) >= 2
    scores = shared.score(prompts, responses, entropy=True)
    plain = Verifier(v.model, v.tokenizer, share_prefix=False).score(prompts, responses, entropy=True)
    for req, a, b in zip(requests, scores, plain):
        assert_matches_reference(v, a, req.input_ids, req.response_start)
        assert a.token_logprobs == pytest.approx(b.token_logprobs, abs=2e-5)
    assert shared._prefix_sharing_ok()


def test_plan_batches_respects_the_token_budget(tiny_llama_verifier):
    lengths = [5, 40, 12, 12, 3, 100, 7, 40]
    batches = plan_batches(lengths, max_batch_tokens=48)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        width = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * width <= 48
    assert batches[0] == [5]  # longest first: the first batch shows the memory peak
    assert plan_batches(lengths, 10**6, max_batch_size=3)[0] == [5, 1, 7]
    # padding limit: a row joins only if it is at least (1 - max_padding) of the batch width
    assert plan_batches(lengths, 10**6, max_padding=0.1) == [[5], [1, 7], [2, 3], [6], [0], [4]]
    assert plan_batches(lengths, 10**6, max_padding=0.75) == [[5, 1, 7], [2, 3, 6, 0, 4]]
    with pytest.raises(ValueError, match="max_padding must be between 0 and 1"):
        Verifier(tiny_llama_verifier.model, tiny_llama_verifier.tokenizer, max_padding=1.5)


def test_softcapped_logits_match_the_model(gemma_tokenizer):
    model = tiny_for_tokenizer(gemma_tokenizer, arch="gemma3_text", seed=5)
    model.model.embed_tokens.weight.data *= 50  # large logits so that the cap matters
    v = Verifier(model, gemma_tokenizer)
    req = v.render(PROMPTS[0], RESPONSES[0])
    ids = torch.tensor([req.input_ids])
    with torch.no_grad():
        assert model(ids).logits.abs().max() > 4
    uncapped = v.score_requests([req])[0]
    model.config.final_logit_softcapping = 2.0  # Gemma 2 style capping, applied inside model(...).logits
    with torch.no_grad():
        assert model(ids).logits.abs().max() <= 2.0
    capped = v.score_requests([req], entropy=True)[0]
    assert_matches_reference(v, capped, req.input_ids, req.response_start)
    assert abs(capped.mean_logprob - uncapped.mean_logprob) > 0.1


def test_unknown_logit_postprocessing_falls_back_to_the_models_forward(smollm_tokenizer):
    from cmerl.testing import tiny_causal_lm

    model = tiny_causal_lm(len(smollm_tokenizer), arch="granite", seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.config.logits_scaling = 4.0  # Granite divides its logits by this inside forward()
    v = Verifier(model, smollm_tokenizer)
    with pytest.warns(UserWarning, match="full forward"):
        scores = v.score(PROMPTS[:3], RESPONSES[:3], entropy=True, self_certainty=True)
    assert len(scores) == 3
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores):
        req = v.render(prompt, response)
        assert_matches_reference(v, score, req.input_ids, req.response_start)
    assert Verifier(tiny_for_tokenizer(smollm_tokenizer, seed=3), smollm_tokenizer)._fast_head_ok()


def test_bf16_weights_keep_fp32_logprob_precision(smollm_tokenizer):
    """bf16 backbone, fp32 head: on a peaked model, per-token log-probs equal a float64 head + log-softmax
    over the same bf16 hidden states and weights to 1e-4, while an all-bf16 head is off by over 10x that."""
    model = tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=2, dtype=torch.bfloat16)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(PEAK_SCALE)  # peaked, like the tiny verifiers
    v = Verifier(model, smollm_tokenizer)
    bf16_head = Verifier(model, smollm_tokenizer, fp32_head=False)
    weight = model.get_output_embeddings().weight.detach()
    tol, bf16_err, bf16_head_err = 1e-4, 0.0, 0.0
    for prompt, response in zip(PROMPTS, RESPONSES):
        req = v.render(prompt, response)
        score = v.score_requests([req])[0]  # one request: the same bf16 backbone call as the reference
        ids = torch.tensor([req.input_ids])
        target = ids[0, req.response_start:, None]
        with torch.no_grad():
            h = model.get_decoder()(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            h = h[req.response_start - 1:-1]
            exact = torch.log_softmax(h.double() @ weight.double().T, dim=-1).gather(-1, target).squeeze(-1)
            plain_bf16 = torch.log_softmax(model.lm_head(h), dim=-1).gather(-1, target).squeeze(-1)
        assert exact.min() > v.logprob_floor  # no clamping: every position is compared
        assert score.n_tokens == len(exact) and math.isfinite(score.mean_logprob)
        torch.testing.assert_close(torch.tensor(score.token_logprobs, dtype=torch.float64), exact,
                                   atol=tol, rtol=0)
        bf16_err = max(bf16_err, float((plain_bf16.double() - exact).abs().max()))
        dropped = torch.tensor(bf16_head.score_requests([req])[0].token_logprobs, dtype=torch.float64)
        bf16_head_err = max(bf16_head_err, float((dropped - exact).abs().max()))
    assert bf16_err > 10 * tol  # what an all-bf16 output projection + log-softmax would lose
    assert bf16_head_err > 10 * tol  # and what the engine loses without its fp32 head


def test_bf16_output_projection_keeps_fp32_precision(smollm_tokenizer):
    model = tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=2, dtype=torch.bfloat16)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    v = Verifier(model, smollm_tokenizer)
    h = torch.randn(64, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        ours = v._logits(h)
        plain_bf16 = model.lm_head(h)
    exact = h.double() @ model.lm_head.weight.detach().double().T
    err = float((ours.double() - exact).abs().max())
    assert ours.dtype == torch.float32 and err < 1e-5 * (1 + float(exact.abs().max()))
    assert float((plain_bf16.double() - exact).abs().max()) > 100 * err  # what an all-bf16 head would lose


def test_top_k_logprobs(tiny_qwen_verifier):
    v = tiny_qwen_verifier
    req = v.render(PROMPTS[4], RESPONSES[4])
    score = v.score_requests([req], top_k=3)[0]
    ref = reference(v.model, req.input_ids, req.response_start)["logp"]
    top = score.extra["top_logprobs"]
    assert len(top) == score.n_tokens
    values, ids = ref.topk(3, dim=-1)
    for row, vals, idx in zip(top, values, ids):
        assert [t for t, _ in row] == idx.tolist()
        assert [lp for _, lp in row] == pytest.approx(vals.tolist(), abs=1e-4)


# ---------------------------------------------------------------------------------------------- truncation
def test_long_prompt_is_dropped_from_the_left_and_flagged(tiny_llama_verifier):
    base = tiny_llama_verifier
    v = Verifier(base.model, base.tokenizer, max_length=32)
    prompt = "Please summarise the following text. " * 6
    response = "It asks for a summary."
    req = v.render(prompt, response)
    assert len(req.input_ids) > 32 and req.n_response_tokens < 31
    short = v.score(["Hi"], [response])[0]
    score = v.score([prompt, "Hi"], [response, response])
    assert score[0].truncated and not score[1].truncated
    kept = req.input_ids[-32:]
    assert_matches_reference(v, score[0], kept, 32 - req.n_response_tokens)
    assert score[1].token_logprobs == pytest.approx(short.token_logprobs, abs=2e-5)


def test_response_longer_than_the_context_is_scored_on_its_first_tokens(tiny_llama_verifier):
    base = tiny_llama_verifier
    v = Verifier(base.model, base.tokenizer, max_length=16)
    req = v.render("Tell me a story.", RESPONSES[5])
    assert req.n_response_tokens > 16
    score = v.score(["Tell me a story."], [RESPONSES[5]], entropy=True)[0]
    assert score.truncated and score.n_tokens == 15
    kept = req.input_ids[req.response_start - 1:req.response_start + 15]  # one context token + 15 response
    assert_matches_reference(v, score, kept, 1)


def test_max_length_must_leave_room_for_one_token(tiny_llama_verifier):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        Verifier(tiny_llama_verifier.model, tiny_llama_verifier.tokenizer, max_length=1)


# ---------------------------------------------------------------------------------------------- empty & floors
def test_empty_response_gets_a_defined_score_never_nan(tiny_verifier):
    v = tiny_verifier
    scores = v.score(["Q?", "Q?", ""], ["", "An answer.", ""], entropy=True, self_certainty=True)
    empty, real, both_empty = scores
    for s in (empty, both_empty):
        assert s.n_tokens == 0 and s.token_logprobs == []
        assert s.mean_logprob == s.sum_logprob == DEFAULT_LOGPROB_FLOOR
        assert s.signal("neg_entropy") == DEFAULT_LOGPROB_FLOOR
        assert s.signal("self_certainty") == 0.0  # the lowest a real response can get (KL >= 0)
        assert not any(math.isnan(x) for x in (s.mean_logprob, s.sum_logprob, s.mean_entropy,
                                               s.mean_self_certainty))
    assert real.n_tokens > 0 and real.mean_logprob > DEFAULT_LOGPROB_FLOOR and real.mean_self_certainty > 0.0
    custom = Verifier(v.model, v.tokenizer, empty_score=-7.5).score(["Q?"], [""])[0]
    assert custom.mean_logprob == custom.sum_logprob == -7.5


def test_logprobs_are_clamped_at_the_floor(tiny_gemma_verifier):
    base = tiny_gemma_verifier
    req = base.render(PROMPTS[1], RESPONSES[1])
    ref = reference(base.model, req.input_ids, req.response_start)["logprobs"]
    floor = float(ref.median())
    v = Verifier(base.model, base.tokenizer, logprob_floor=floor)
    score = v.score([PROMPTS[1]], [RESPONSES[1]])[0]
    assert min(score.token_logprobs) == pytest.approx(floor)
    assert sum(x == pytest.approx(floor) for x in score.token_logprobs) >= len(ref) // 2
    assert_matches_reference(v, score, req.input_ids, req.response_start)  # reference clamped the same way
    assert score.mean_logprob > float(ref.mean())


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(tiny_llama_verifier):
    v = tiny_llama_verifier
    with pytest.raises(TypeError, match="item 1: response must be a string .*int"):
        v.score(["a", "b"], ["ok", 5])
    with pytest.raises(TypeError, match="item 0: response must be a string .*NoneType"):
        v.score(["a"], [None])
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        v.score(["a", "b"], ["x"])
    with pytest.raises(TypeError, match="must be lists"):
        v.score("a prompt", "a response")
    with pytest.raises(TypeError, match="item 0: prompt must be a string or a list"):
        v.score([{"text": "not a message list"}], ["x"])
    with pytest.raises(ValueError, match="request 0: response_start 9 outside 0..3"):
        v.score_requests([ScoreRequest([1, 2, 3], 9)])
    with pytest.raises(ValueError, match="request 0: the first response token needs at least one context"):
        v.score_requests([ScoreRequest([1, 2, 3], 0)])
    assert v.score([], []) == []


def test_signal_names(tiny_llama_verifier):
    s = tiny_llama_verifier.score(["Q"], ["A b c"])[0]
    assert s.signal("mean_logprob") == s.mean_logprob and s.signal("sum_logprob") == s.sum_logprob
    with pytest.raises(ValueError, match="entropy=True"):
        s.signal("neg_entropy")
    with pytest.raises(ValueError, match="unknown signal 'cme'"):
        s.signal("cme")
    assert "token_logprobs" not in s.to_dict(with_tokens=False)


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_fp32_equals_reference(smollm_verifier_fp32):
    v = smollm_verifier_fp32
    scores = v.score(PROMPTS[:4], RESPONSES[:4], entropy=True)
    for prompt, response, score in zip(PROMPTS, RESPONSES, scores):
        req = v.render(prompt, response)
        assert_matches_reference(v, score, req.input_ids, req.response_start)


SANITY = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by William Shakespeare."),
    ("What do bees make?", "Bees make honey from the nectar of flowers."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
]


@pytest.mark.slow
def test_fluent_answer_beats_shuffled_words_and_another_prompts_answer(smollm_verifier_fp32):
    v = smollm_verifier_fp32
    prompts = [p for p, _ in SANITY]
    answers = [a for _, a in SANITY]
    rng = random.Random(0)
    shuffled = []
    for a in answers:
        words = a.split()
        while words == a.split():
            rng.shuffle(words)
        shuffled.append(" ".join(words))
    mismatched = answers[1:] + answers[:1]
    good = v.score(prompts, answers)
    bad_order = v.score(prompts, shuffled)
    off_topic = v.score(prompts, mismatched)
    for g, s, o in zip(good, bad_order, off_topic):
        assert g.mean_logprob > s.mean_logprob
        assert g.mean_logprob > o.mean_logprob
