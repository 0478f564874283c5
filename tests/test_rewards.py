"""CrossModelEntropy and the baselines under TRL's reward-function contract; the independence guard."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from _core_helpers import reference
from transformers import TrainerState

from cmerl.rewards import (
    CrossModelEntropy,
    NegativeEntropy,
    SelfCertainty,
    SelfLikelihood,
    SelfVerificationError,
)
from cmerl.scoring import DEFAULT_LOGPROB_FLOOR, Verifier
from cmerl.testing import tiny_for_tokenizer

PROMPTS = ["What is 2+2?", "Name a colour.", "Say hello in French.", "What is 2+2?"]
COMPLETIONS = ["2 + 2 = 4.", "Blue is a colour.", "Bonjour !", ""]
CONV_PROMPTS = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in PROMPTS]
CONV_COMPLETIONS = [[{"role": "assistant", "content": c}] for c in COMPLETIONS]


def trl_call(reward, prompts, completions, tokenizer=None, **extra):
    """Call a reward exactly as TRL 1.16's GRPOTrainer does: keywords only, plus its extra arguments."""
    metrics: dict[str, float] = {}
    ids = [tokenizer(c if isinstance(c, str) else c[0]["content"])["input_ids"] for c in completions] \
        if tokenizer is not None else [[1]] * len(completions)
    out = reward(prompts=prompts, completions=completions, completion_ids=ids,
                 answer=["4", "blue", "bonjour", "4"], trainer_state=TrainerState(),
                 log_extra=lambda column, values: None, log_metric=metrics.__setitem__, **extra)
    return out, metrics


def test_cme_follows_trls_contract(tiny_llama_verifier, smollm_tokenizer):
    cme = CrossModelEntropy(tiny_llama_verifier)
    assert cme.__name__ == "cme"
    rewards, metrics = trl_call(cme, PROMPTS, COMPLETIONS, smollm_tokenizer)
    assert isinstance(rewards, list) and len(rewards) == len(PROMPTS)
    assert all(type(r) is float and math.isfinite(r) for r in rewards)
    expected = tiny_llama_verifier.score(PROMPTS, COMPLETIONS)
    assert rewards == [s.mean_logprob for s in expected]
    assert rewards[3] == DEFAULT_LOGPROB_FLOOR  # the empty completion
    assert metrics["cme/response_tokens_mean"] == sum(s.n_tokens for s in expected) / len(expected)
    assert metrics["cme/truncated_frac"] == 0.0
    assert metrics["cme/seconds"] > 0


def test_cme_accepts_conversational_datasets(tiny_qwen_verifier):
    cme = CrossModelEntropy(tiny_qwen_verifier)
    rewards, _ = trl_call(cme, CONV_PROMPTS, CONV_COMPLETIONS)
    expected = tiny_qwen_verifier.score(CONV_PROMPTS, COMPLETIONS)
    assert rewards == [s.mean_logprob for s in expected]
    # The system turn in the prompt is used: scores differ from the bare prompts.
    bare = tiny_qwen_verifier.score(PROMPTS, COMPLETIONS)
    assert rewards[0] != bare[0].mean_logprob


def test_cme_values_equal_the_float64_reference(tiny_gemma_verifier):
    rewards = CrossModelEntropy(tiny_gemma_verifier)(prompts=PROMPTS[:3], completions=COMPLETIONS[:3])
    assert len(rewards) == 3
    for p, c, r in zip(PROMPTS, COMPLETIONS, rewards):
        req = tiny_gemma_verifier.render(p, c)
        ref = reference(tiny_gemma_verifier.model, req.input_ids, req.response_start)["logprobs"]
        assert r == pytest.approx(float(ref.clamp_min(DEFAULT_LOGPROB_FLOOR).mean()), abs=1e-4)


def test_signals(tiny_llama_verifier):
    v = tiny_llama_verifier
    scores = v.score(PROMPTS, COMPLETIONS, entropy=True)
    assert CrossModelEntropy(v, signal="sum_logprob")(prompts=PROMPTS, completions=COMPLETIONS) == \
        [s.sum_logprob for s in scores]
    neg_ent = CrossModelEntropy(v, signal="neg_entropy")(prompts=PROMPTS, completions=COMPLETIONS)
    assert neg_ent == [-s.mean_entropy for s in scores]
    assert neg_ent[3] == DEFAULT_LOGPROB_FLOOR
    with pytest.raises(ValueError, match="unknown signal 'perplexity'"):
        CrossModelEntropy(v, signal="perplexity")
    with pytest.raises(ValueError, match="SelfCertainty"):
        CrossModelEntropy(v, signal="self_certainty")
    with pytest.raises(ValueError, match="at least one verifier"):
        CrossModelEntropy([])


def test_ensemble_averages_verifiers_with_different_tokenizers(tiny_llama_verifier, tiny_qwen_verifier,
                                                              tiny_gemma_verifier):
    verifiers = [tiny_llama_verifier, tiny_qwen_verifier, tiny_gemma_verifier]
    rewards = CrossModelEntropy(verifiers)(prompts=PROMPTS, completions=COMPLETIONS)
    singles = [CrossModelEntropy(v)(prompts=PROMPTS, completions=COMPLETIONS) for v in verifiers]
    for i, r in enumerate(rewards):
        assert r == pytest.approx(sum(s[i] for s in singles) / 3, abs=1e-12)


def test_bad_completions_are_reported(tiny_llama_verifier):
    cme = CrossModelEntropy(tiny_llama_verifier)
    with pytest.raises(TypeError, match="item 1: response must be a string"):
        cme(prompts=["a", "b"], completions=["fine", 12])
    with pytest.raises(ValueError, match="got 2 prompts but 1 responses"):
        cme(prompts=["a", "b"], completions=["x"])
    assert cme(prompts=[], completions=[]) == []


# ---------------------------------------------------------------------------------------------- guard
def test_independence_guard_same_object_and_same_name(tiny_llama, smollm_tokenizer):
    same = Verifier(tiny_llama, smollm_tokenizer)
    with pytest.raises(SelfVerificationError, match="allow_self_verification=True"):
        CrossModelEntropy(same, policy=tiny_llama)
    assert CrossModelEntropy(same, policy=tiny_llama, allow_self_verification=True)(
        prompts=PROMPTS, completions=COMPLETIONS) == [s.mean_logprob for s in same.score(PROMPTS, COMPLETIONS)]
    by_name = Verifier(tiny_for_tokenizer(smollm_tokenizer, seed=7), smollm_tokenizer, name="smollm2-135m-instruct")
    with pytest.raises(SelfVerificationError):
        CrossModelEntropy(by_name, policy="SmolLM2-135M-Instruct")
    with pytest.raises(SelfVerificationError):  # one ensemble member is the policy
        CrossModelEntropy([Verifier(tiny_for_tokenizer(smollm_tokenizer, seed=8), smollm_tokenizer), same],
                          policy=tiny_llama)


def test_independence_guard_accepts_a_different_model(tiny_llama, tiny_llama_verifier, tiny_qwen_verifier):
    CrossModelEntropy(tiny_llama_verifier, policy=tiny_llama)  # same arch and tokenizer, other weights
    CrossModelEntropy([tiny_llama_verifier, tiny_qwen_verifier], policy="qwen2.5-coder-1.5b-instruct")


def test_independence_guard_sees_through_separate_loads_of_one_folder(tmp_path, smollm_tokenizer):
    from transformers import AutoModelForCausalLM

    tiny_for_tokenizer(smollm_tokenizer, seed=4).save_pretrained(tmp_path)
    smollm_tokenizer.save_pretrained(tmp_path)
    verifier = Verifier.from_pretrained(str(tmp_path), dtype="float32")
    policy = AutoModelForCausalLM.from_pretrained(str(tmp_path))  # loaded by the user, not by cmerl
    with pytest.raises(SelfVerificationError):
        CrossModelEntropy(verifier, policy=policy)
    with pytest.raises(SelfVerificationError):
        CrossModelEntropy(verifier, policy=str(tmp_path))


# ---------------------------------------------------------------------------------------------- pickling
def test_reward_from_pretrained_pickles_as_a_recipe(tmp_path, smollm_tokenizer):
    tiny_for_tokenizer(smollm_tokenizer, seed=6).save_pretrained(tmp_path)
    smollm_tokenizer.save_pretrained(tmp_path)
    cme = CrossModelEntropy(Verifier.from_pretrained(str(tmp_path), dtype="float32", logprob_floor=-9.0))
    blob = pickle.dumps(cme)
    assert len(blob) < 10_000  # the load recipe, not the weights
    clone = pickle.loads(blob)
    assert clone.__name__ == "cme" and clone.scorers[0].logprob_floor == -9.0
    assert clone(prompts=PROMPTS, completions=COMPLETIONS) == cme(prompts=PROMPTS, completions=COMPLETIONS)


def test_reward_over_an_in_memory_verifier_pickles_by_value(tiny_qwen_verifier):
    cme = CrossModelEntropy(tiny_qwen_verifier, signal="sum_logprob", name="cme_sum")
    clone = pickle.loads(pickle.dumps(cme))
    assert clone.__name__ == "cme_sum"
    assert clone(prompts=PROMPTS, completions=COMPLETIONS) == cme(prompts=PROMPTS, completions=COMPLETIONS)


# ---------------------------------------------------------------------------------------------- baselines
def _reference_means(model, verifier, key):
    out = []
    for p, c in zip(CONV_PROMPTS, COMPLETIONS):
        req = verifier.render(p, c)
        if req.n_response_tokens == 0:
            out.append(None)
            continue
        out.append(float(reference(model, req.input_ids, req.response_start)[key].mean()))
    return out


@pytest.mark.parametrize("cls, key, sign, name", [
    (SelfCertainty, "self_certainty", 1, "self_certainty"),
    (NegativeEntropy, "entropy", -1, "neg_entropy"),
    (SelfLikelihood, "logprobs", 1, "self_likelihood"),
])
def test_baselines_equal_their_float64_definitions(tiny_qwen_verifier, cls, key, sign, name):
    policy_scorer = tiny_qwen_verifier  # stands for "the policy scoring itself" (peaked distributions)
    reward = cls(policy_scorer)
    assert reward.__name__ == name
    rewards, metrics = trl_call(reward, CONV_PROMPTS, CONV_COMPLETIONS)
    expected = _reference_means(policy_scorer.model, policy_scorer, key)
    for r, e in zip(rewards, expected):
        assert math.isfinite(r)
        if e is not None:
            assert r == pytest.approx(sign * e, abs=1e-4)
    assert f"{name}/response_tokens_mean" in metrics


def test_self_certainty_is_kl_from_uniform(tiny_llama, smollm_tokenizer):
    """Direct check of the formula on one position: KL(U||p) = sum_v (1/V) log((1/V) / p_v) >= 0."""
    scorer = Verifier(tiny_llama, smollm_tokenizer)
    score = scorer.score(["Q"], ["An answer"], self_certainty=True)[0]
    req = scorer.render("Q", "An answer")
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([req.input_ids])).logits[0, req.response_start - 1].double()
    p = torch.softmax(logits, -1)
    u = torch.full_like(p, 1 / p.numel())
    kl = float((u * (u.log() - p.log())).sum())
    assert kl > 0 and score.token_self_certainty[0] == pytest.approx(kl, abs=1e-5)
