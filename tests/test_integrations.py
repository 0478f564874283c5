"""verl, OpenRLHF and TRL adapters against a real server and the local engine (no framework imported)."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from _server_helpers import PAIRS, torch_threads

import cmerl.integrations.openrlhf_reward_func as reward_func_module
from cmerl.formatting import RenderConfig, render_pair
from cmerl.integrations import common, verl
from cmerl.integrations.openrlhf import render_config_for, split_queries, strip_stop_strings
from cmerl.integrations.trl import AsyncCrossModelEntropy
from cmerl.scoring.remote import RemoteVerifier

pytest_plugins = ["_server_fixtures"]  # tiny_verifier_dir, tiny_local, tiny_server fixtures

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in (common.ENV_SERVER, common.ENV_VERIFIER, common.ENV_TOKENIZER, common.ENV_PROTOCOL, common.ENV_DTYPE,
                "CMERL_PROMPT_MODE", "CMERL_STOP_STRINGS"):
        monkeypatch.delenv(var, raising=False)
    common.clear_cache()
    yield
    common.clear_cache()


def load_like(path: Path, module_name: str):
    """Import a file the way verl (custom_reward_function.path) and OpenRLHF (--reward.remote_url x.py) do."""
    spec = importlib.util.spec_from_file_location(module_name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- verl
def verl_parquet(path: Path) -> list[list[dict]]:
    messages = [[{"role": "user", "content": "What is 2+2?"}],
                [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}],
                [{"role": "user", "content": "东京在哪里？"}]]
    pd.DataFrame({"data_source": ["t"] * 3, "prompt": messages, "ability": ["chat"] * 3,
                  "reward_model": [{"style": "rule", "ground_truth": "4"}, {"style": "rule", "ground_truth": None},
                                   {"style": "rule", "ground_truth": "x"}],
                  "extra_info": [{"split": "train", "index": i} for i in range(3)]}).to_parquet(path)
    return messages


def test_prepare_dataset_adds_prompt_and_ground_truth(tmp_path):
    src, dst = tmp_path / "in.parquet", tmp_path / "out" / "train.parquet"
    messages = verl_parquet(src)
    before = src.read_bytes()
    assert verl.prepare_dataset(src, dst) == 3
    assert src.read_bytes() == before  # the source is never modified
    df = pd.read_parquet(dst)
    for row, msgs in zip(df.itertuples(), messages):
        assert verl.prompt_from_extra_info(row.extra_info) == msgs
        assert row.extra_info["split"] == "train"
    assert [r["ground_truth"] for r in df["reward_model"]] == ["4", "", "x"]
    bare = tmp_path / "bare.parquet"  # no reward_model / extra_info / data_source columns at all
    pd.DataFrame({"prompt": ["hello", "world"]}).to_parquet(bare)
    verl.prepare_dataset(bare, tmp_path / "bare_out.parquet")
    out = pd.read_parquet(tmp_path / "bare_out.parquet")
    assert list(out["data_source"]) == ["cmerl", "cmerl"]
    assert [e["prompt"] for e in out["extra_info"]] == ["hello", "world"]
    assert [r["ground_truth"] for r in out["reward_model"]] == ["", ""]
    with pytest.raises(ValueError, match="no column 'question'"):
        verl.prepare_dataset(bare, tmp_path / "x.parquet", prompt_column="question")


def test_verl_compute_score_server_local_and_router(tmp_path, tiny_server, tiny_local, tiny_verifier_dir, monkeypatch):
    src, dst = tmp_path / "in.parquet", tmp_path / "train.parquet"
    messages = verl_parquet(src)
    verl.prepare_dataset(src, dst)
    extra_infos = list(pd.read_parquet(dst)["extra_info"])  # as verl hands them over (numpy inside)
    responses = ["2 + 2 = 4.", "Hi!", "东京在日本。"]
    want = tiny_local.score(messages, responses)
    reward_file = load_like(ROOT / "examples/verl/cme_reward.py", "custom_module")

    got_sync = [reward_file.compute_score("t", r, "", e, server_url=tiny_server.url)
                for r, e in zip(responses, extra_infos)]

    async def all_async():
        return await asyncio.gather(*(reward_file.compute_score_async("t", r, "", e, server_url=tiny_server.url)
                                      for r, e in zip(responses, extra_infos)))

    got_async = asyncio.run(all_async())
    # verl's own reward-model servers (vLLM protocol) through reward_router_address
    host = tiny_server.url.removeprefix("http://")
    got_router = [verl.compute_score("t", r, "", e, reward_router_address=host,
                                     reward_model_tokenizer=tiny_local.tokenizer)
                  for r, e in zip(responses, extra_infos)]
    monkeypatch.setenv(common.ENV_VERIFIER, str(tiny_verifier_dir))
    monkeypatch.setenv(common.ENV_DTYPE, "float32")
    got_local = [verl.compute_score("t", r, "", e) for r, e in zip(responses, extra_infos)]
    for got in (got_sync, got_async, got_router, got_local):
        assert [g["score"] for g in got] == pytest.approx([w.mean_logprob for w in want], abs=1e-4)
        assert [g["cme_response_tokens"] for g in got] == [float(w.n_tokens) for w in want]
        assert set(got[0]) == {"score", "cme_mean_logprob", "cme_response_tokens", "cme_truncated"}
    with pytest.raises(ValueError, match="prepare_dataset"):
        verl.compute_score("t", "x", "", {"index": 0}, server_url=tiny_server.url)


# ---------------------------------------------------------------------------------------------- OpenRLHF
def test_split_queries_and_stop_strings():
    assert strip_stop_strings("hi<|im_end|><|endoftext|>", ["<|im_end|>", "<|endoftext|>"]) == "hi"
    assert strip_stop_strings("a</s> b", ["</s>"]) == "a</s> b"  # only at the end
    assert split_queries(["Q: x\nA: y<|im_end|>"], ["Q: x\nA: "]) == ["y"]
    with pytest.raises(ValueError, match="item 1: query does not start"):
        split_queries(["ab", "cd"], ["a", "x"])


def openrlhf_batch(actor_tok, questions, responses):
    """What OpenRLHF 0.11 sends: prompts chat-templated for the actor; query = decode(prompt ids + response ids)."""
    prompts = [actor_tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    queries = []
    for p, r in zip(prompts, responses):
        ids = actor_tok(p, add_special_tokens=False)["input_ids"] + actor_tok(r, add_special_tokens=False)["input_ids"]
        queries.append(actor_tok.decode(ids + [actor_tok.eos_token_id], skip_special_tokens=False))
    return prompts, queries


@pytest.mark.parametrize("mode", ["label", "chat", "verbatim"])
def test_openrlhf_reward_func_file(mode, tiny_server, tiny_local, tiny_verifier_dir, qwen_tokenizer, monkeypatch):
    questions = ["What is 2+2?", "Name a colour.", "Say nothing."]
    responses = ["2 + 2 = 4.", "Blue.", ""]
    prompts, queries = openrlhf_batch(qwen_tokenizer, questions, responses)
    monkeypatch.setenv(common.ENV_SERVER, tiny_server.url)
    monkeypatch.setenv("CMERL_PROMPT_MODE", mode)
    if mode == "verbatim":
        monkeypatch.setenv(common.ENV_TOKENIZER, str(tiny_verifier_dir))
        config = render_config_for("verbatim", RenderConfig())
        reqs = [render_pair(tiny_local.tokenizer, p, r, config) for p, r in zip(prompts, responses)]
        want = tiny_local.score_requests(reqs)
    else:
        want = tiny_local.score(questions if mode == "label" else prompts, responses)
    module = load_like(ROOT / "examples/openrlhf/reward_func.py", "reward_func")
    out = module.reward_func(queries, prompts, questions)
    assert isinstance(out["rewards"], torch.Tensor) and out["rewards"].shape == (3,)
    assert out["rewards"].tolist() == pytest.approx([w.mean_logprob for w in want], abs=1e-4)
    assert out["scores"].tolist() == pytest.approx([min(1.0, 2.718281828 ** w.mean_logprob) for w in want],
                                                   rel=1e-3)
    assert out["extra_logs"]["cme_response_tokens"].tolist() == [float(w.n_tokens) for w in want]
    assert module.reward_func is reward_func_module.reward_func


def test_openrlhf_reward_func_refuses_verbatim_without_tokenizer(tiny_server, monkeypatch):
    monkeypatch.setenv(common.ENV_SERVER, tiny_server.url)
    monkeypatch.setenv("CMERL_PROMPT_MODE", "verbatim")
    with pytest.raises(ValueError, match="verbatim"):
        reward_func_module.reward_func(["ab"], ["a"], [""])


def test_no_verifier_configured_is_a_clear_error():
    with pytest.raises(ValueError, match="CMERL_SERVER_URL"):
        common.get_scorer()


# ---------------------------------------------------------------------------------------------- TRL
def test_async_cme_is_async_for_trl_and_matches_sync(tiny_server, tiny_local):
    from trl.trainer.utils import get_callable_name, is_async_callable

    prompts = [p for p, _ in PAIRS]
    completions = [[{"role": "assistant", "content": r}] for _, r in PAIRS]  # TRL's conversational form
    want = [s.mean_logprob for s in tiny_local.score(prompts, [r for _, r in PAIRS])]
    with RemoteVerifier(tiny_server.url, tiny_local.tokenizer) as rv:
        reward = AsyncCrossModelEntropy(rv)
        assert is_async_callable(reward) and get_callable_name(reward) == "cme"
        metrics: dict[str, float] = {}
        got = asyncio.run(reward(prompts=prompts, completions=completions, log_metric=metrics.__setitem__))
    assert got == pytest.approx(want, abs=1e-4)
    assert metrics["cme/response_tokens_mean"] == pytest.approx(
        sum(s.n_tokens for s in tiny_local.score(prompts, [r for _, r in PAIRS])) / len(PAIRS))
    with torch_threads(1):  # a local verifier runs in a worker thread
        assert asyncio.run(AsyncCrossModelEntropy(tiny_local)(prompts, completions)) == pytest.approx(want, abs=1e-5)


def _policy_dir(tmp_path: Path) -> Path:
    from cmerl.models import load_tokenizer
    from cmerl.testing import tiny_for_tokenizer

    tok = load_tokenizer("qwen2.5-coder-0.5b-instruct")
    tiny_for_tokenizer(tok, arch="qwen2", seed=3).save_pretrained(str(tmp_path / "policy"))
    tok.save_pretrained(str(tmp_path / "policy"))
    return tmp_path / "policy"


def _run_example(launcher: list[str], tmp_path, tiny_server, tiny_verifier_dir, steps: int = 1) -> subprocess.CompletedProcess:
    args = ["examples/trl_remote/train_grpo_remote.py", "--server-url", tiny_server.url,
            "--verifier-tokenizer", str(tiny_verifier_dir), "--policy", str(_policy_dir(tmp_path)), "--max-steps", str(steps),
            "--num-generations", "2", "--per-device-batch", "2", "--max-completion-length", "8", "--n-prompts", "8",
            "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*launcher, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def scrape(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k] = float(v)
    return out


@pytest.mark.e2e
def test_trl_remote_example_trains_against_the_service(tmp_path, tiny_server, tiny_verifier_dir):
    """examples/trl_remote: a real GRPOTrainer run whose async CME reward is scored by the server."""
    key = 'cmerl_requests_total{route="/score",status="200"}'
    before = scrape(tiny_server.url).get(key, 0)
    proc = _run_example([sys.executable], tmp_path, tiny_server, tiny_verifier_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained 1 steps; rewards/cme/mean per step:" in proc.stdout
    assert scrape(tiny_server.url)[key] >= before + 1  # the step's reward call went to the server


@pytest.mark.e2e
def test_plain_trl_example_trains_with_an_in_process_verifier(tmp_path, tiny_verifier_dir):
    """examples/trl/grpo_cme.py: stock GRPOTrainer with CrossModelEntropy as its reward function."""
    args = [sys.executable, "examples/trl/grpo_cme.py", "--policy", str(_policy_dir(tmp_path)),
            "--verifier", str(tiny_verifier_dir), "--steps", "1", "--max-completion-length", "8",
            "--output-dir", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^step 1: mean CME -\d+\.\d{3}, completion length \d+$", proc.stdout, re.MULTILINE), proc.stdout


@pytest.mark.e2e
@pytest.mark.slow
def test_trl_remote_example_two_processes_share_one_service(tmp_path, tiny_server, tiny_verifier_dir):
    """Two training processes (torchrun, gloo on CPU), each a client of the same server."""
    key = 'cmerl_requests_total{route="/score",status="200"}'
    before = scrape(tiny_server.url).get(key, 0)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = _run_example([torchrun, "--nproc_per_node", "2"], tmp_path, tiny_server, tiny_verifier_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert scrape(tiny_server.url)[key] >= before + 2  # 2 processes x 1 step
