"""Prompt sets: bundled files, local JSONL/JSON/Parquet, load_dataset folders, length filtering."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cmerl.data import (
    PromptDataError,
    load_prompt_set,
    prompt_token_count,
    read_prompts,
    select_prompts,
    source_kind,
    to_dataset,
    to_policy_prompt,
)
from cmerl.models import load_tokenizer


@pytest.fixture(scope="module")
def smol_tok():
    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma_tok():
    return load_tokenizer("gemma-3-270m")


def test_bundled_prompt_sets_read_in_file_order():
    uf = read_prompts("ultrafeedback")
    assert len(uf) == 1000 and all(isinstance(p, str) and p.strip() for p in uf)
    assert uf[0] == "how to cook t-bone in the oven"
    ae = read_prompts("alpaca_eval")
    assert len(ae) == 805
    assert ae[0] == "What are the names of some famous actors that started their careers on Broadway?"


def test_local_files_jsonl_json_parquet_strings_and_messages(tmp_path):
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi?"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"prompt": "one"}) + "\n\n" + json.dumps({"prompt": msgs}) + "\n")
    assert read_prompts(str(jsonl)) == ["one", msgs]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"question": "a"}, {"question": "b"}]))
    assert read_prompts(str(js), column="question") == ["a", "b"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["x", "y", "z"], "other": [1, 2, 3]}), pq_path)
    assert read_prompts(str(pq_path)) == ["x", "y", "z"]


def test_bad_files_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_prompts(str(tmp_path / "nope.jsonl"))
    f = tmp_path / "q.jsonl"
    f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    with pytest.raises(PromptDataError, match=r"row 2: missing column 'prompt'"):
        read_prompts(str(f))
    f.write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(PromptDataError, match="row 1"):
        read_prompts(str(f))
    f.write_text(json.dumps({"prompt": "  "}) + "\n")
    with pytest.raises(PromptDataError, match="empty prompt"):
        read_prompts(str(f))
    f.write_text("{not json\n")
    with pytest.raises(PromptDataError, match="line 1"):
        read_prompts(str(f))


def test_dataset_folder_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(4)))
    assert source_kind(str(folder)) == "hub"
    assert read_prompts(str(folder), split="train") == ["q0", "q1", "q2", "q3"]
    with pytest.raises(PromptDataError, match="no column 'instruction'"):
        read_prompts(str(folder), column="instruction")


_READ_HUB_DATASET = """
from cmerl.data import PromptDataError, read_prompts
try:
    read_prompts("nobody-here/no-such-dataset-cmerl")
except PromptDataError as exc:
    print(exc)
"""


@pytest.mark.e2e
@pytest.mark.parametrize("offline_mode", [False, True])
def test_unreachable_hub_dataset_is_a_clear_error(tmp_path, offline_mode):
    """No network: a hub dataset id fails at once with a clear error; in datasets' offline mode the
    lookup is left to datasets (which would use a cached copy) and its error is passed on."""
    assert source_kind("nobody-here/no-such-dataset-cmerl") == "hub"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and "OFFLINE" not in k}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9")
    if offline_mode:
        env["HF_DATASETS_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "-c", _READ_HUB_DATASET], env=env, check=False, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "could not load Hugging Face dataset 'nobody-here/no-such-dataset-cmerl'" in out.stdout
    assert ("the Hugging Face hub is unreachable from here" in out.stdout) is not offline_mode
    assert "Retrying" not in out.stderr


def test_length_filter_drops_at_the_exact_token_boundary(smol_tok):
    prompt = "Explain the water cycle to a child."
    n = len(smol_tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=True)["input_ids"])
    assert prompt_token_count(prompt, smol_tok) == n
    kept = select_prompts([prompt, "hi"], smol_tok, max_prompt_length=n)
    assert kept.prompts == [prompt, "hi"] and kept.n_too_long == 0
    dropped = select_prompts([prompt, "hi"], smol_tok, max_prompt_length=n - 1)
    assert dropped.prompts == ["hi"] and dropped.n_too_long == 1
    assert "1 dropped as longer than" in dropped.summary()
    # The system prompt counts against the limit.
    assert prompt_token_count(prompt, smol_tok, "Be brief.") > prompt_token_count(prompt, smol_tok, "")


def test_heldout_and_max_prompts(smol_tok):
    prompts = [f"question number {i}?" for i in range(10)]
    ps = select_prompts(prompts, smol_tok, max_prompt_length=None, max_prompts=4, heldout=3)
    assert ps.heldout == prompts[7:]
    assert ps.prompts == prompts[:4] and ps.n_unused == 3
    with pytest.raises(PromptDataError, match="no training prompts"):
        select_prompts(["x"], smol_tok, max_prompt_length=None, heldout=1)


def test_bundled_ultrafeedback_length_filter_counts(smol_tok):
    ps = load_prompt_set("ultrafeedback", smol_tok, max_prompt_length=64)
    independent = sum(1 for p in read_prompts("ultrafeedback") if prompt_token_count(p, smol_tok) > 64)
    assert ps.n_too_long == independent > 0
    assert len(ps.prompts) == 1000 - independent


@pytest.mark.parametrize("system_prompt", [None, "Be brief."])
def test_policy_generates_from_the_context_its_own_rewards_score(smol_tok, gemma_tok, system_prompt):
    """What GRPOTrainer feeds the policy (to_policy_prompt, then TRL's chat template) is the context the
    policy-side rewards render (policy_render_config): with and without a chat template."""
    from cmerl.formatting import render_context
    from cmerl.training import TrainConfig, policy_render_config

    render = policy_render_config(TrainConfig(system_prompt=system_prompt))
    for tok in (smol_tok, gemma_tok):
        for prompt in ("hi", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                              {"role": "user", "content": "c"}]):
            fed = to_policy_prompt(prompt, tok, system_prompt)
            if isinstance(fed, list):
                fed = tok.apply_chat_template(fed, tokenize=False, add_generation_prompt=True)
            assert fed == render_context(tok, prompt, render)


def test_policy_format(smol_tok, gemma_tok):
    assert to_policy_prompt("hi", smol_tok) == [{"role": "user", "content": "hi"}]
    assert to_policy_prompt("hi", smol_tok, "Be brief.") == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert to_policy_prompt("hi", gemma_tok) == "### Instruction:\nhi\n\n### Response:\n"
    assert to_policy_prompt("hi", gemma_tok, "Be brief.") == "### Instruction:\nBe brief.\n\nhi\n\n### Response:\n"
    ps = select_prompts(["a?", "b?"], smol_tok, max_prompt_length=None)
    ds = to_dataset(ps, smol_tok)
    assert ds.column_names == ["prompt", "raw_prompt"]
    assert ds[1]["raw_prompt"] == "b?" and ds[1]["prompt"] == [{"role": "user", "content": "b?"}]
