"""Tiny random causal LMs for tests, examples and CI: real architectures, real tokenizers, seconds to build."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_causal_lm(vocab_size: int, *, arch: str = "llama", seed: int = 0, hidden_size: int = 32,
                   num_layers: int = 2, num_heads: int = 4, max_position_embeddings: int = 512,
                   dtype: torch.dtype = torch.float32, pad_token_id: int | None = None,
                   eos_token_id: int | None = None, bos_token_id: int | None = None):
    """A randomly initialised causal LM of ``arch`` (llama, qwen2, gemma3_text) in eval mode.

    ``vocab_size`` must cover the tokenizer it is paired with (use ``len(tokenizer)``).
    """
    # deferred: transformers (slow import, loaded only when used)
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"vocab_size": vocab_size, "hidden_size": hidden_size, "intermediate_size": hidden_size * 2,
              "num_hidden_layers": num_layers, "num_attention_heads": num_heads,
              "num_key_value_heads": max(1, num_heads // 2), "max_position_embeddings": max_position_embeddings,
              "pad_token_id": pad_token_id, "eos_token_id": eos_token_id, "bos_token_id": bos_token_id}
    if arch == "gemma3_text":
        kwargs.update(head_dim=hidden_size // num_heads, sliding_window=64, layer_types=None)
    config = AutoConfig.for_model(arch, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config._name_or_path = f"tiny-{arch}-v{vocab_size}-seed{seed}"
    return model


def tiny_for_tokenizer(tokenizer, *, arch: str = "llama", seed: int = 0, **kwargs):
    """:func:`tiny_causal_lm` sized and wired (pad/eos/bos ids) for ``tokenizer``."""
    return tiny_causal_lm(len(tokenizer), arch=arch, seed=seed, pad_token_id=tokenizer.pad_token_id,
                          eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **kwargs)


def write_tiny_gguf(source_gguf, dest, *, hidden_size: int = 32, num_layers: int = 1, num_heads: int = 4,
                    seed: int = 0):
    """Write a tiny random llama-arch GGUF at ``dest`` that keeps ``source_gguf``'s tokenizer and metadata.

    ``source_gguf`` must be a single-file llama GGUF (e.g. the packaged SmolLM2 file). Tensors are float32
    random values of shape (hidden_size, ...) with ``num_layers`` blocks, so the file is a few MB and
    converts in seconds: handy for testing the GGUF → HF cache without dequantizing a real model.
    Returns ``dest`` as a :class:`pathlib.Path`.
    """
    # deferred: gguf (slow import, loaded only when used); numpy (slow import, loaded only when used)
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source_gguf))
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"write_tiny_gguf needs a llama-arch GGUF (got {arch!r} in {source_gguf})")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    ffn, kv_heads = hidden_size * 2, max(1, num_heads // 2)
    head_dim = hidden_size // num_heads
    overrides = {
        "llama.block_count": num_layers, "llama.embedding_length": hidden_size,
        "llama.feed_forward_length": ffn, "llama.attention.head_count": num_heads,
        "llama.attention.head_count_kv": kv_heads, "llama.rope.dimension_count": head_dim,
        "llama.context_length": 512, "general.file_type": 0,
    }
    dest = Path(dest)
    writer = gguf.GGUFWriter(str(dest), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = overrides.get(key, field.contents())
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type)
    rng = np.random.default_rng(seed)

    def rand(*shape: int) -> np.ndarray:  # numpy shape is (out, in), as GGUF stores it reversed
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", rand(vocab, hidden_size))
    writer.add_tensor("output_norm.weight", np.ones(hidden_size, dtype=np.float32))
    for b in range(num_layers):
        writer.add_tensor(f"blk.{b}.attn_norm.weight", np.ones(hidden_size, dtype=np.float32))
        writer.add_tensor(f"blk.{b}.ffn_norm.weight", np.ones(hidden_size, dtype=np.float32))
        writer.add_tensor(f"blk.{b}.attn_q.weight", rand(hidden_size, hidden_size))
        writer.add_tensor(f"blk.{b}.attn_k.weight", rand(kv_heads * head_dim, hidden_size))
        writer.add_tensor(f"blk.{b}.attn_v.weight", rand(kv_heads * head_dim, hidden_size))
        writer.add_tensor(f"blk.{b}.attn_output.weight", rand(hidden_size, hidden_size))
        writer.add_tensor(f"blk.{b}.ffn_gate.weight", rand(ffn, hidden_size))
        writer.add_tensor(f"blk.{b}.ffn_up.weight", rand(ffn, hidden_size))
        writer.add_tensor(f"blk.{b}.ffn_down.weight", rand(hidden_size, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest
