"""``dtype: int8``: dynamic int8 Linear layers for frozen models (``cmerl.quantization``), tested against the
fp32 reference path on tiny random models and on the packaged SmolLM2-135M-Instruct."""

from __future__ import annotations

import copy

import pytest
import torch

from cmerl import models
from cmerl.checks import load_preference_pairs
from cmerl.generation import GenerationConfig, PromptItem, generate_outputs
from cmerl.judging import Job, LocalJudge
from cmerl.models import load_model
from cmerl.precision import check_dtype_name, parse_dtype, resolve_dtype
from cmerl.quantization import FLOAT_LAYERS, int8_linear_count, quantize_int8
from cmerl.scoring import Verifier
from cmerl.testing import write_tiny_gguf
from cmerl.training import config_from_dict, validate

SMOLLM = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    src = models.packaged_part_paths(SMOLLM)[0]
    return write_tiny_gguf(src, tmp_path_factory.mktemp("gguf") / "tiny-smollm.gguf")


def _linears(model) -> int:
    """Linear layers int8 replaces: all but the output head and the MLP output projections."""
    return sum(isinstance(m, torch.nn.Linear) and not n.endswith(FLOAT_LAYERS) for n, m in model.named_modules()) - 1


def test_int8_resolves_for_frozen_models_on_cpu_only():
    choice = resolve_dtype("INT8")
    assert choice.dtype == torch.float32 and choice.quantization == "int8" and choice.name == "int8"
    assert str(choice).startswith("int8 (as requested: dynamic int8")
    with pytest.raises(ValueError, match="frozen models"):
        resolve_dtype("int8", trained=True)
    with pytest.raises(ValueError, match="int8 is a CPU path"):
        resolve_dtype("int8", device="meta")
    assert check_dtype_name(" Int8 ") == "int8"
    with pytest.raises(ValueError, match="frozen models"):
        check_dtype_name("int8", trained=True)
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        parse_dtype("int8")


def test_train_config_accepts_an_int8_verifier_and_refuses_an_int8_policy():
    cfg = config_from_dict({"verifier_dtype": "int8"}, source="test")
    validate(cfg)
    assert cfg.verifier_dtype == "int8"
    with pytest.raises(ValueError, match="policy_dtype.*frozen models"):
        validate(config_from_dict({"policy_dtype": "int8"}, source="test"))


def test_quantize_int8_swaps_every_linear_but_the_head_and_the_mlp_outputs(tiny_llama):
    model = copy.deepcopy(tiny_llama).float().eval()
    n = _linears(model)
    quantize_int8(model)
    assert int8_linear_count(model) == n > 0
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    head = model.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear) and head.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="float32 weights"):
        quantize_int8(copy.deepcopy(tiny_llama).to(torch.bfloat16))


def test_load_model_int8_quantizes_and_records_the_choice(tiny_gguf, tmp_cache):
    model, _ = load_model(str(tiny_gguf), dtype="int8", role="verifier")
    fp32, _ = load_model(str(tiny_gguf), dtype="float32")
    assert model.cmerl_dtype.name == "int8" and int8_linear_count(model) == _linears(fp32)
    assert int8_linear_count(fp32) == 0
    with pytest.raises(ValueError, match="frozen models"):
        load_model(str(tiny_gguf), dtype="int8", trained=True)


def test_int8_judge_log_probs_stay_close_to_fp32(tiny_llama, smollm_tokenizer):
    fp32 = LocalJudge(copy.deepcopy(tiny_llama).float(), smollm_tokenizer, name="tiny")
    int8 = LocalJudge(quantize_int8(copy.deepcopy(tiny_llama).float()), smollm_tokenizer, name="tiny-int8")
    jobs = [Job("Name a colour.", "Blue.", "I like trains a lot."), Job("2+2?", "4", "five"),
            Job("Say hi.", "Hello there, friend.", "No.")]
    for a, b in zip(fp32.judge(jobs), int8.judge(jobs)):
        assert a.logprob_A == pytest.approx(b.logprob_A, abs=0.05)
        assert a.logprob_B == pytest.approx(b.logprob_B, abs=0.05)


def test_generation_records_int8_as_the_weights_dtype(tiny_gguf, tmp_cache, tmp_path):
    model, tok = load_model(str(tiny_gguf), dtype="int8", role="generator")
    rows = generate_outputs(model, tok, [PromptItem(0, "Name a fruit.", "t")], tmp_path / "o.json",
                            generator="tiny-int8", config=GenerationConfig(max_new_tokens=4, dtype="int8"))
    assert rows[0]["weights_dtype"] == "int8"


@pytest.mark.slow
def test_int8_smollm2_rewards_track_fp32_on_real_pairs(smollm_verifier_fp32):
    """The packaged SmolLM2-135M-Instruct in int8 against fp32 on 16 bundled UltraFeedback pairs: per-response
    CME within 0.25 nats/token on average and 0.5 at most (measured 0.14 / 0.28 on 12 pairs, see
    cmerl.quantization), and the chosen-vs-rejected preference of at least 12 of the 16 pairs unchanged."""
    int8 = Verifier.from_pretrained(SMOLLM, dtype="int8")
    assert int8_linear_count(int8.model) > 0
    pairs = load_preference_pairs(n=16)
    prompts = [p.prompt for p in pairs] * 2
    responses = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ref = [s.mean_logprob for s in smollm_verifier_fp32.score(prompts, responses)]
    got = [s.mean_logprob for s in int8.score(prompts, responses)]
    diffs = [abs(a - b) for a, b in zip(ref, got)]
    assert sum(diffs) / len(diffs) < 0.25 and max(diffs) < 0.5, diffs
    same = sum((ref[i] > ref[i + 16]) == (got[i] > got[i + 16]) for i in range(16))
    assert same >= 12
