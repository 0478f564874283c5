"""Shared fixtures for the training tests: tiny models saved as HF folders, prompt files, configs.

Models are tiny random transformers with the real SmolLM2 / Qwen2.5 tokenizers (``cmerl.testing``), saved
as ordinary HF folders so the whole path (config -> ``cmerl.models.load_model`` -> TRL) is exercised.

``unigram_lm`` builds a tiny llama whose next-token distribution is ``softmax(logits)`` in every context:
token embeddings are all ``e_0``, the attention/MLP output projections are zero (the residual stream stays
``e_0``), and the output head reads only coordinate 0. A policy built this way learns one logit per token,
and a verifier built this way "strongly prefers one token pattern" in an exactly known way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml

from cmerl.models import load_tokenizer
from cmerl.testing import tiny_for_tokenizer

POLICY_TOKENIZER = "smollm2-135m-instruct"
VERIFIER_TOKENIZER = "qwen2.5-coder-0.5b-instruct"

PROMPTS = [
    "Name a colour.", "Say something about cats.", "What is rain?", "Describe the sea.",
    "Give me a word.", "Tell me about trees.", "What is a river?", "Write about the sun.",
    "What do dogs eat?", "Describe a city.", "What is music?", "Say hello.",
]


def save_model(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def tiny_random_folder(folder: Path, tokenizer_name: str, *, arch: str, seed: int) -> Path:
    """A tiny random model of ``arch`` with the real tokenizer of ``tokenizer_name``, saved to ``folder``."""
    tok = load_tokenizer(tokenizer_name)
    return save_model(tiny_for_tokenizer(tok, arch=arch, seed=seed), tok, folder)


def word_tokens(tokenizer, n: int, *, start: int = 2000) -> list[int]:
    """``n`` token ids that are a single space-prefixed lowercase word of 3+ letters, so that any
    concatenation of them decodes and re-encodes to the same ids (the BPE pre-tokenizer splits on spaces)."""
    out = []
    for tid in range(start, len(tokenizer)):
        text = tokenizer.decode([tid])
        word = text[1:]
        is_word = text.startswith(" ") and len(word) >= 3 and word.isascii() and word.isalpha() and word.islower()
        if is_word and tokenizer.encode(text + text, add_special_tokens=False) == [tid, tid]:
            out.append(tid)
            if len(out) == n:
                return out
    raise AssertionError("not enough word tokens")


def unigram_lm(tokenizer, logits: torch.Tensor, *, seed: int = 0, hidden_size: int = 32):
    """A tiny llama whose next-token distribution is ``softmax(logits)`` whatever the context."""
    model = tiny_for_tokenizer(tokenizer, arch="llama", seed=seed, hidden_size=hidden_size)
    if model.config.tie_word_embeddings:
        raise AssertionError("unigram_lm needs untied embeddings")
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.zero_()
        emb[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head.zero_()
        # RMSNorm turns e_0 into sqrt(H) * e_0, so column 0 scaled by 1/sqrt(H) gives exactly `logits`.
        head[:, 0] = logits.to(head.dtype) / math.sqrt(hidden_size)
    return model


def preference_pair(folder: Path) -> tuple[Path, Path, list[int], list[int]]:
    """A unigram policy that mostly emits 64 word tokens C, and a unigram verifier (another model, same
    tokenizer) that strongly prefers the half S of C: log p_V(S) ~ -3.6, log p_V(C \\ S) ~ -7.6, others ~ -13.6.

    Returns ``(policy_dir, verifier_dir, C, S)``.
    """
    tok = load_tokenizer(POLICY_TOKENIZER)
    cand = word_tokens(tok, 64)
    preferred = cand[::2]
    vocab = len(tok)
    policy_logits = torch.zeros(vocab)
    policy_logits[cand] = 8.0
    verifier_logits = torch.zeros(vocab)
    verifier_logits[cand] = 6.0
    verifier_logits[preferred] = 10.0
    policy_dir = save_model(unigram_lm(tok, policy_logits, seed=1), tok, folder / "unigram-policy")
    verifier_dir = save_model(unigram_lm(tok, verifier_logits, seed=2), tok, folder / "unigram-verifier")
    return policy_dir, verifier_dir, cand, preferred


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def tiny_config(tmp: Path, policy: Path, verifier: Path, prompts: Path, **overrides) -> dict:
    """A config for a fast run on tiny models: 2 prompts x 4 generations x 8 tokens per step."""
    cfg = {
        "policy": str(policy),
        "verifiers": [str(verifier)],
        "verifier_dtype": "float32",
        "prompts": str(prompts),
        "max_prompt_length": 128,
        "num_generations": 4,
        "per_device_train_batch_size": 8,
        "max_completion_length": 8,
        # A tiny random policy never ends a completion within 8 tokens: with truncated completions masked
        # (cmerl's default) every loss would be zero and the runs would test checkpoints of an untrained model.
        "mask_truncated_completions": False,
        "learning_rate": 1e-3,
        "max_steps": 3,
        "save_steps": 2,
        "seed": 0,
        "report_to": [],
        "output_dir": str(tmp / "run"),
    }
    cfg.update(overrides)
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
