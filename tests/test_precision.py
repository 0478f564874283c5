"""dtype "auto": the CPU bf16 check, the resolution rule, its use by loaders, configs and the CLI."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from typer.testing import CliRunner

from cmerl import models, precision
from cmerl.cli import app
from cmerl.judging import Job, LocalJudge
from cmerl.models import load_model
from cmerl.precision import (
    CpuBf16Support,
    check_dtype_name,
    cpu_bf16_support,
    gemm_gflops,
    resolve_dtype,
)
from cmerl.testing import write_tiny_gguf
from cmerl.training import TrainConfig, config_from_dict, describe_run, validate


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A small llama GGUF with SmolLM2's tokenizer and random weights (converts in seconds)."""
    src = models.packaged_part_paths("smollm2-135m-instruct")[0]
    return write_tiny_gguf(src, tmp_path_factory.mktemp("gguf") / "tiny-smollm.gguf")


@pytest.fixture
def fresh_probe(monkeypatch):
    """Forget the per-process answer before and after the test (the env var is read on the first call)."""
    cpu_bf16_support.cache_clear()
    monkeypatch.delenv(precision.ENV_CPU_BF16, raising=False)
    yield monkeypatch
    cpu_bf16_support.cache_clear()


def test_this_cpus_answer_is_what_a_timed_probe_says_is_faster(fresh_probe):
    support = cpu_bf16_support()
    assert support.source in ("probe", "api")
    bf16, fp32 = gemm_gflops(torch.bfloat16), gemm_gflops(torch.float32)
    if max(bf16, fp32) < 1.3 * min(bf16, fp32):
        pytest.skip(f"bf16 {bf16:.1f} and fp32 {fp32:.1f} GFLOP/s too close to call on this CPU right now")
    assert support.native == (bf16 > fp32), (support, bf16, fp32)
    assert resolve_dtype("auto").dtype == (torch.bfloat16 if bf16 > fp32 else torch.float32)
    assert support.bf16_slowdown == pytest.approx(support.fp32_gflops / support.bf16_gflops)
    assert cpu_bf16_support() is support  # measured once per process


def test_injected_capability_decides_auto_on_cpu():
    assert str(resolve_dtype("auto", native_bf16=True)) == "bfloat16 (CPU with native bf16)"
    assert str(resolve_dtype("auto", native_bf16=False)) == "float32 (CPU without native bf16)"
    # Trained weights stay float32 on CPU whatever the CPU can do.
    assert resolve_dtype("auto", trained=True, native_bf16=True).dtype == torch.float32
    assert resolve_dtype("AUTO", native_bf16=False).name == "float32"


def test_explicit_dtypes_are_honoured_and_slow_bf16_warns():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("float32", native_bf16=True).dtype == torch.float32
        assert resolve_dtype("bf16", native_bf16=True).dtype == torch.bfloat16
        assert str(resolve_dtype(torch.float16, native_bf16=False)) == "float16 (as requested)"
    with pytest.warns(RuntimeWarning, match="without native bf16.*dtype auto would pick float32"):
        assert resolve_dtype("bfloat16", native_bf16=False).dtype == torch.bfloat16


def test_the_warning_carries_the_measured_slowdown(fresh_probe):
    cpu_bf16_support.cache_clear()
    emulated = CpuBf16Support(False, False, 10.0, 60.0, "api")
    fresh_probe.setattr(precision, "cpu_bf16_support", lambda: emulated)
    with pytest.warns(RuntimeWarning, match=r"measured 6\.0x slower than float32 here"):
        resolve_dtype("bfloat16")
    assert resolve_dtype("auto").dtype == torch.float32


@pytest.mark.parametrize("value, native", [("1", True), ("native", True), ("0", False), ("none", False)])
def test_env_var_forces_the_answer_without_probing(fresh_probe, value, native):
    fresh_probe.setenv(precision.ENV_CPU_BF16, value)
    fresh_probe.setattr(precision, "gemm_gflops", lambda *a, **k: pytest.fail("probed although forced"))
    support = cpu_bf16_support()
    assert support == CpuBf16Support(native, None, None, None, "env")
    assert resolve_dtype("auto").dtype == (torch.bfloat16 if native else torch.float32)
    assert "forced by CMERL_CPU_BF16" in precision.describe_cpu_bf16()


def test_bad_env_value_and_bad_names_give_clear_errors(fresh_probe):
    fresh_probe.setenv(precision.ENV_CPU_BF16, "maybe")
    with pytest.raises(ValueError, match="CMERL_CPU_BF16='maybe'"):
        cpu_bf16_support()
    with pytest.raises(ValueError, match="unknown dtype 'float8'; use one of auto, float32"):
        check_dtype_name("float8")
    assert check_dtype_name(" Auto ") == "auto" and check_dtype_name("bf16") == "bfloat16"


def test_cuda_rule_without_a_gpu_is_not_reached_on_cpu_devices():
    # No GPU here: the CUDA branch is exercised only where one exists; other devices fall back to fp32.
    assert resolve_dtype("auto", device="meta").dtype == torch.float32
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert resolve_dtype("auto", device="cuda").dtype == want


def test_load_model_resolves_auto_logs_the_choice_and_reuses_one_fp32_cache_entry(tiny_gguf, tmp_cache,
                                                                                    caplog, fresh_probe):
    fresh_probe.setenv(precision.ENV_CPU_BF16, "0")
    with caplog.at_level(logging.INFO, logger="cmerl"):
        model, _ = load_model(str(tiny_gguf), role="verifier")
    assert next(model.parameters()).dtype == torch.float32
    assert str(model.cmerl_dtype) == "float32 (CPU without native bf16)"
    assert f"verifier {tiny_gguf}: float32 (CPU without native bf16)" in caplog.messages
    cpu_bf16_support.cache_clear()
    fresh_probe.setenv(precision.ENV_CPU_BF16, "1")
    bf16, _ = load_model(str(tiny_gguf))
    assert next(bf16.parameters()).dtype == torch.bfloat16
    trained, _ = load_model(str(tiny_gguf), trained=True)
    assert next(trained.parameters()).dtype == torch.float32
    entries = [p for p in (tmp_cache / "models").iterdir()]
    assert len(entries) == 1  # one fp32 conversion serves every dtype
    with torch.no_grad():
        for a, b in zip(model.parameters(), bf16.parameters()):
            assert torch.equal(a.bfloat16(), b)


def test_configs_accept_auto_and_explicit_dtypes_and_print_the_choice():
    cfg = config_from_dict({"policy_dtype": "auto", "verifier_dtype": "bf16"}, source="test")
    validate(cfg)
    assert (cfg.policy_dtype, cfg.verifier_dtype) == ("auto", "bfloat16")
    plan = describe_run(cfg)
    assert "(auto: float32 (trained weights on CPU))" in plan
    assert "bfloat16: bfloat16 (as requested)" in plan
    assert TrainConfig().verifier_dtype == "auto" and TrainConfig().policy_dtype == "auto"
    bad = config_from_dict({"verifier_dtype": "int4"}, source="test")
    with pytest.raises(ValueError, match="verifier_dtype.*unknown dtype 'int4'"):
        validate(bad)


def test_cli_refuses_a_bad_dtype_in_one_line(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a", "response": "b"}\n')
    result = CliRunner().invoke(app, ["score", "-v", "x", "-i", str(rows), "-o", str(tmp_path / "o.jsonl"),
                                      "--dtype", "float8"])
    assert result.exit_code == 2
    assert "unknown dtype 'float8'" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cli_train_check_prints_the_resolved_dtypes():
    result = CliRunner().invoke(app, ["train", "--config", "configs/demo.yaml", "--check"])
    assert result.exit_code == 0, result.output
    verifier = str(resolve_dtype("auto"))
    assert "smollm2-135m-instruct (auto: float32 (trained weights on CPU))" in result.output
    assert f"auto: {verifier}" in result.output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_judge_logprobs_equal_a_float64_head_in_both_dtypes(smollm_tokenizer, tiny_llama, dtype):
    """The judge's fp32 head over a bf16 or fp32 backbone equals a float64 head on the same hidden state."""
    model = copy.deepcopy(tiny_llama).to(dtype)
    judge = LocalJudge(model, smollm_tokenizer, name="tiny", max_batch_tokens=1)  # one job per forward
    jobs = [Job("Name a colour.", "Blue.", "I like trains a lot."), Job("2+2?", "4", "five")]
    for job, r in zip(jobs, judge.judge(jobs)):
        ids, ia, ib = judge.encode_job(job)
        with torch.no_grad():
            h = model.get_decoder()(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            logp = torch.log_softmax(h.double() @ model.lm_head.weight.double().T, dim=-1)
        assert r.logprob_A == pytest.approx(float(logp[ia]), abs=1e-4)
        assert r.logprob_B == pytest.approx(float(logp[ib]), abs=1e-4)


#: torch's own switches that make an AVX-512 CPU run its AVX2 kernels (oneDNN, ATen, MKL): the closest this
#: machine gets to a CPU without native bf16 (docs/core.md "Precision").
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def test_auto_picks_float32_where_the_cpu_runs_only_avx2_kernels():
    """Not injected: a child process restricted to AVX2 kernels answers the capability query and resolves
    `auto` by itself (on an AVX2-only machine the restriction changes nothing)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch; from cmerl.precision import cpu_bf16_support, resolve_dtype; "
            "s = cpu_bf16_support(); print(json.dumps({'native': s.native, 'source': s.source, "
            "'auto': str(resolve_dtype('auto', device='cpu', trained=False).dtype), "
            "'capability': torch.backends.cpu.get_cpu_capability()}))")
    env = {k: v for k, v in os.environ.items() if k != precision.ENV_CPU_BF16}
    out = subprocess.run([sys.executable, "-c", code], env={**env, **AVX2_ONLY, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["capability"] in ("AVX2", "DEFAULT")
    assert got == {**got, "native": False, "auto": "torch.float32"}
