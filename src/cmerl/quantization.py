"""Dynamic int8 inference for frozen models (``dtype: int8``): the CPU fast path of verifiers and judges.

:func:`quantize_int8` swaps the backbone's ``nn.Linear`` layers for torch's dynamic int8 Linear
(``torch.ao.quantization.quantize_dynamic``, fbgemm/x86 kernels): weights are stored int8 with one scale
per output channel; activations stay float32 and are quantized per call, with one scale per input tensor
(so a row's result depends slightly on what else is in its batch). The output head (the projection to
the vocabulary) and the embeddings stay float32, so log-probs keep a float32 softmax over the whole
vocabulary. The MLP output projections (``down_proj``, ``fc2``, ``c_proj``...: :data:`FLOAT_LAYERS`)
also stay float32: their inputs carry the activation outliers that one per-tensor scale cannot hold.
Measured on the packaged SmolLM2-135M-Instruct (12 bundled UltraFeedback pairs, 24 responses, mean
per-token log-likelihood against fp32): every Linear in int8 moved it by 1.21 nats/token on average (max
1.97); keeping the MLP output projections float32, 0.14 (max 0.28); keeping the whole MLP float32, 0.05.
That is the size of the gaps CME rewards rank by, so int8 is an opt-in speed path whose effect must be
checked on the task (``tests/test_quantization.py`` bounds it on real pairs; ``benchmarks/bench_int8.py``
measures speed, reward-check preferences and judge verdicts against fp32); fp32 stays the reference. End to
end it gains far less than one layer (Qwen2.5-Coder-0.5B reward check: 1.44x, half the matmul work stays
fp32), and on a CPU with native bf16, bf16 is faster (2.65x there) and closer to fp32.

Why this API: measured side by side on a 1536 -> 8960 -> 1536 Linear pair (256 tokens, one thread, AMD
EPYC Zen 5), ``quantize_dynamic`` ran 4.1x faster than fp32, torchao 0.18's eager
``Int8DynamicActivationInt8WeightConfig`` 2.5x and its weight-only int8 0.6x; ``quantize_dynamic`` ships
with the pinned torch (no new dependency). torch marks ``torch.ao.quantization`` as deprecated in favour of
torchao; if a later torch drops it, :func:`quantize_int8` raises naming the alternative.
"""

from __future__ import annotations

import warnings

import torch

#: Linear layers kept float32 by name suffix: MLP output projections, whose inputs carry activation outliers.
FLOAT_LAYERS = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "w2")


def head_module_names(model) -> set[str]:
    """Qualified names of the modules that must stay float: the output head (``get_output_embeddings``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name for name, module in model.named_modules() if head is not None and module is head}


def quantize_int8(model):
    """Return ``model`` (float32, eval mode, on CPU) with its Linear layers, the output head and
    :data:`FLOAT_LAYERS` excepted, replaced in place by dynamic int8 Linear layers. Raises ``ValueError``
    for a model that is not float32 on CPU, ``RuntimeError`` when this torch lacks the dynamic int8 kernels."""
    params = list(model.parameters())
    if any(p.device.type != "cpu" for p in params):
        raise ValueError("int8 models run on CPU only")
    if any(p.dtype != torch.float32 for p in params):
        raise ValueError("quantize_int8 needs float32 weights (load the model with dtype float32)")
    try:  # deferred: torch.ao quantization (loaded only when used)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError as exc:  # pragma: no cover - only on a torch without torch.ao.quantization
        raise RuntimeError("this torch has no torch.ao.quantization (dynamic int8); use dtype float32, or "
                           "quantize with torchao") from exc
    keep = head_module_names(model)
    spec = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name not in keep and not name.endswith(FLOAT_LAYERS)}
    if not spec:
        raise ValueError("the model has no Linear layers to quantize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*torch.ao.quantization.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        quantize_dynamic(model, qconfig_spec=spec, dtype=torch.qint8, inplace=True)
    model.eval()
    return model


def int8_linear_count(model) -> int:
    """How many dynamic int8 Linear layers ``model`` holds (0 for a float model)."""
    # deferred: torch.ao quantized modules (loaded only when used)
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return sum(isinstance(m, DynamicLinear) for m in model.modules())
