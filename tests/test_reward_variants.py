"""Reward variants (PMI CME, length-residualised CME) against plain references, in rewards and reward-check."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from _training_helpers import tiny_random_folder
from typer.testing import CliRunner

from cmerl.checks import PreferencePair, check_signal_names, ensemble_check, reward_check
from cmerl.cli import app
from cmerl.reward_variants import (
    NULL_PROMPT,
    LengthResidualCME,
    PMICrossModelEntropy,
    length_residuals,
    null_prompt_like,
    pmi_values,
)
from cmerl.training import config_from_dict, validate

PROMPTS = ["Name a primary colour.", "Name a primary colour.", "Name a primary colour.", "What is 2+2?",
           "What is 2+2?", "What is 2+2?"]
COMPLETIONS = ["Blue.", "Red, as in a fire engine.", "I like trains and long walks on the beach.", "4",
               "Four, of course: two plus two.", ""]


def _mean_diff(verifier, prompt, completion, null, lam):
    """The PMI by hand: two separate score calls, per-token difference, mean."""
    [c] = verifier.score([prompt], [completion])
    [u] = verifier.score([null], [completion])
    if c.n_tokens == 0:
        return c.mean_logprob
    assert c.n_tokens == u.n_tokens
    return float(np.mean(np.array(c.token_logprobs) - lam * np.array(u.token_logprobs)))


@pytest.mark.parametrize("lam", [1.0, 0.5, 0.0])
def test_pmi_reward_equals_two_separate_passes(tiny_llama_verifier, lam):
    reward = PMICrossModelEntropy(tiny_llama_verifier, lam=lam)
    logged = {}
    got = reward(prompts=PROMPTS, completions=COMPLETIONS, log_metric=lambda k, v: logged.setdefault(k, v))
    want = [_mean_diff(tiny_llama_verifier, p, c, NULL_PROMPT, lam) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert got == pytest.approx(want, abs=1e-4)
    if lam == 0.0:  # no reference term: plain CME
        plain = [s.mean_logprob for s in tiny_llama_verifier.score(PROMPTS, COMPLETIONS)]
        assert got == pytest.approx(plain, abs=1e-4)
    assert {"cme_pmi/conditional_mean", "cme_pmi/null_mean", "cme_pmi/truncated_frac"} <= set(logged)
    assert got[-1] == tiny_llama_verifier.empty_score  # the empty answer keeps the floor, never 0


def test_pmi_keeps_system_turns_of_chat_prompts_and_validates_lambda(tiny_llama_verifier):
    chat = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Name a colour."}]
    assert null_prompt_like(chat, "x0") == [{"role": "system", "content": "Be terse."},
                                            {"role": "user", "content": "x0"}]
    assert null_prompt_like("anything", "x0") == "x0"
    [got] = PMICrossModelEntropy(tiny_llama_verifier)(prompts=[chat], completions=["Blue."])
    assert got == pytest.approx(_mean_diff(tiny_llama_verifier, chat, "Blue.", null_prompt_like(chat), 1.0),
                                abs=1e-4)
    with pytest.raises(ValueError, match=r"lambda must be in \[0, 1\] \(got 1.5\)"):
        PMICrossModelEntropy(tiny_llama_verifier, lam=1.5)
    with pytest.raises(ValueError, match="one unconditional score per response"):
        pmi_values(tiny_llama_verifier.score(["a"], ["b"]), [])


def test_length_residuals_by_hand():
    # Group "a": lengths e^0, e^1, e^2 -> x = 0, 1, 2; y = 1, 3, 2: slope 0.5, mean 2 -> residuals -0.5, 1, -0.5.
    # Lengths 1e6 * (1, e, e^2): x = log(1e6) + (0, 1, 2), the same line shifted.
    values = [1.0, 3.0, 2.0, 5.0, 7.0]
    lengths = [1_000_000, round(math.e * 1e6), round(math.e ** 2 * 1e6), 4, 4]
    res = length_residuals(values, lengths, ["a", "a", "a", "b", "b"])
    assert res[:3] == pytest.approx([-0.5, 1.0, -0.5], abs=1e-6)
    assert res[3:] == pytest.approx([-1.0, 1.0])  # two items: centred only
    assert length_residuals([2.0], [0]) == [0.0]  # empty response counts as length 1; one item: centred


def test_length_residuals_remove_a_length_effect():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 400, size=200)
    noise = rng.normal(size=200)
    values = -2.0 * np.log(lengths) + noise
    res = np.array(length_residuals(values.tolist(), lengths.tolist()))
    assert abs(np.corrcoef(values, np.log(lengths))[0, 1]) > 0.8
    assert abs(np.corrcoef(res, np.log(lengths))[0, 1]) < 1e-9
    assert res == pytest.approx(noise - noise.mean() - np.polyfit(np.log(lengths), noise, 1)[0]
                                * (np.log(lengths) - np.log(lengths).mean()), abs=1e-9)


def test_length_residual_reward_groups_by_prompt(tiny_llama_verifier):
    got = LengthResidualCME(tiny_llama_verifier)(prompts=PROMPTS, completions=COMPLETIONS)
    scores = tiny_llama_verifier.score(PROMPTS, COMPLETIONS)
    want = length_residuals([s.mean_logprob for s in scores], [s.n_tokens for s in scores], PROMPTS)
    assert got == pytest.approx(want, abs=1e-5)
    assert sum(got[:3]) == pytest.approx(0.0, abs=1e-5) and sum(got[3:]) == pytest.approx(0.0, abs=1e-5)


PAIRS = [PreferencePair("Name a primary colour.", "Blue is a primary colour.", "Trains are fast."),
         PreferencePair("What is 2+2?", "2 + 2 = 4.", "The weather is nice today."),
         PreferencePair("Say hello.", "Hello!", "Goodbye forever, and thanks for all the fish.")]


def test_reward_check_measures_the_variants_and_an_ensemble(tiny_llama_verifier, tiny_qwen_verifier):
    names = ["mean_logprob", "cme_pmi:1", "cme_pmi:0.5", "cme_length_resid"]
    a = reward_check(tiny_llama_verifier, PAIRS, signals=names)
    n = len(PAIRS)
    pmi = [_mean_diff(tiny_llama_verifier, p.prompt, r, NULL_PROMPT, 1.0)
           for r, p in [(p.chosen, p) for p in PAIRS] + [(p.rejected, p) for p in PAIRS]]
    assert a.values["cme_pmi:1"] == pytest.approx(pmi, abs=1e-4)
    wins = sum(c > r for c, r in zip(pmi[:n], pmi[n:])) / n
    assert a.signals["cme_pmi:1"].accuracy.value == pytest.approx(wins)
    assert set(a.signals) == set(names) and len(a.values["cme_length_resid"]) == 2 * n
    b = reward_check(tiny_qwen_verifier, PAIRS, signals=["mean_logprob"])
    ens = ensemble_check([a, b])
    mean = [(x + y) / 2 for x, y in zip(a.values["mean_logprob"], b.values["mean_logprob"])]
    assert ens.accuracy.value == pytest.approx(sum(c > r for c, r in zip(mean[:n], mean[n:])) / n)
    with pytest.raises(ValueError, match="at least two"):
        ensemble_check([a])


def test_signal_names_are_checked():
    assert check_signal_names(["mean_logprob", " cme_pmi:0.5 "]) == ["mean_logprob", "cme_pmi:0.5"]
    for bad in ("cme_pmi:2", "cme_pmi:x", "pmi", "cme"):
        with pytest.raises(ValueError, match="unknown signal"):
            check_signal_names([bad])


def test_configs_register_the_variants():
    cfg = config_from_dict({"rewards": ["cme_pmi"], "pmi_lambda": 0.5}, source="t")
    validate(cfg)
    validate(config_from_dict({"rewards": ["cme_length_resid"]}, source="t"))
    with pytest.raises(ValueError, match="pmi_lambda.*must be in"):
        validate(config_from_dict({"rewards": ["cme_pmi"], "pmi_lambda": 2.0}, source="t"))


def test_cli_reward_check_with_two_verifiers_writes_the_ensemble(tmp_path):
    v1 = tiny_random_folder(tmp_path / "v1", "smollm2-135m-instruct", arch="llama", seed=1)
    v2 = tiny_random_folder(tmp_path / "v2", "qwen2.5-coder-0.5b-instruct", arch="qwen2", seed=2)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n"
                            for p in PAIRS))
    out = tmp_path / "rc.json"
    result = CliRunner().invoke(app, ["reward-check", "-v", str(v1), "-v", str(v2), "--data", str(data),
                                      "--signals", "cme_pmi:1,cme_length_resid", "--dtype", "float32",
                                      "-o", str(out)])
    assert result.exit_code == 0, result.output
    payload = json.loads(out.read_text())
    assert len(payload["results"]) == 2 and "accuracy" in payload["ensemble"]
    assert set(payload["results"][0]["signals"]) == {"mean_logprob", "cme_pmi:1", "cme_length_resid"}
    assert "ensemble of" in result.output
    bad = CliRunner().invoke(app, ["reward-check", "-v", str(v1), "--signals", "cme_pmi:3"])
    assert bad.exit_code != 0 and "unknown signal 'cme_pmi:3'" in bad.output
