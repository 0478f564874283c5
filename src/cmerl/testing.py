"""Tiny random causal LMs for tests, examples and CI: real architectures, real tokenizers, seconds to build."""

from __future__ import annotations

import torch


def tiny_causal_lm(vocab_size: int, *, arch: str = "llama", seed: int = 0, hidden_size: int = 32,
                   num_layers: int = 2, num_heads: int = 4, max_position_embeddings: int = 512,
                   dtype: torch.dtype = torch.float32, pad_token_id: int | None = None,
                   eos_token_id: int | None = None, bos_token_id: int | None = None):
    """A randomly initialised causal LM of ``arch`` (llama, qwen2, gemma3_text) in eval mode.

    ``vocab_size`` must cover the tokenizer it is paired with (use ``len(tokenizer)``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
                  max_position_embeddings=max_position_embeddings, pad_token_id=pad_token_id,
                  eos_token_id=eos_token_id, bos_token_id=bos_token_id)
    if arch == "gemma3_text":
        kwargs.update(head_dim=hidden_size // num_heads, sliding_window=64, layer_types=None)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config._name_or_path = f"tiny-{arch}-seed{seed}"
    return model


def tiny_for_tokenizer(tokenizer, *, arch: str = "llama", seed: int = 0, **kwargs):
    """:func:`tiny_causal_lm` sized and wired (pad/eos/bos ids) for ``tokenizer``."""
    return tiny_causal_lm(len(tokenizer), arch=arch, seed=seed, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **kwargs)
