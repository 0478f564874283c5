"""Which floating-point dtype a model runs in: ``dtype="auto"`` and the hardware check behind it.

The rule (:func:`resolve_dtype`):

* CUDA: bfloat16 where the device supports it; otherwise float16 for inference-only models (verifier,
  judge, generator) and float32 for trained ones (the policy).
* CPU: bfloat16 only where the CPU has native bf16 matrix products (AVX512-BF16 / AMX), which run about
  2.5x faster than float32 there; otherwise float32, because emulated bf16 ran 4-7x *slower* than fp32 on
  AVX2-only CPUs. A trained model stays float32 on CPU either way (pure-bf16 weights lose small optimizer
  updates).

"Native bf16" is decided once per process by :func:`cpu_bf16_support`: oneDNN's capability query, then a
timed probe of one GEMM at a verifier's shape in both dtypes (a few milliseconds). The probe is the final
word, since the query has been seen to say yes on CPUs where bf16 is still slower. ``CMERL_CPU_BF16=1`` /
``0`` skips both and forces the answer (for users who know their hardware).

An explicit dtype is always honoured; ``bfloat16`` on a CPU without native bf16 warns with the measured
slow-down.

``int8`` (opt-in, never picked by ``auto``; CPU and frozen models only: verifier, judge, generator) loads
the fp32 weights and swaps the Linear layers (not the head, not the MLP output projections) for torch's
dynamic int8 Linear (:mod:`cmerl.quantization`; a 1536x8960 Linear pair ran 4x faster than fp32). It moves
mean log-likelihoods by ~0.1 nats/token (measured there): fp32 stays the reference path.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass

import torch

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
AUTO = "auto"
INT8 = "int8"  # dynamic int8 Linear layers over fp32 weights (cmerl.quantization); not a torch dtype
INT8_TRAINED = ("int8 is an inference path for frozen models (verifier, judge, generator); a trained "
                "model (the policy) needs float weights: use auto, float32 or bfloat16")
ENV_CPU_BF16 = "CMERL_CPU_BF16"
# The probe's GEMM: 256 tokens through a 896 -> 4864 projection (Qwen2.5-0.5B's MLP), the shape that
# dominates a verifier forward.
PROBE_SHAPE = (256, 896, 4864)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` → ``torch.bfloat16`` etc. ``"auto"`` is not a dtype
    (use :func:`resolve_dtype`); unknown names raise ``ValueError`` naming the accepted ones."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPE_NAMES[str(dtype).strip().lower()]
    except KeyError:
        if is_int8(dtype):
            raise ValueError("int8 is not a floating-point dtype: it is a setting of frozen models, resolved "
                             "by resolve_dtype") from None
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, float32, bfloat16, float16, int8 "
                         "(int8: frozen models on CPU only)") from None


def is_int8(dtype: str | torch.dtype) -> bool:
    """Whether a dtype setting asks for the dynamic int8 path."""
    return isinstance(dtype, str) and dtype.strip().lower() == INT8


def check_dtype_name(dtype: str | torch.dtype, *, trained: bool = False) -> str:
    """Validate a dtype setting (``auto``, a dtype name, or ``int8`` unless ``trained``) without probing
    anything; returns it lower-cased."""
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    if str(dtype).strip().lower() == AUTO:
        return AUTO
    if is_int8(dtype):
        if trained:
            raise ValueError(INT8_TRAINED)
        return INT8
    return str(parse_dtype(dtype)).removeprefix("torch.")


@dataclass(frozen=True)
class CpuBf16Support:
    """What this CPU does with bf16 matrix products.

    ``native``: the decision. ``api``: oneDNN's answer (None if torch lacks the query, or when forced).
    ``bf16_gflops``/``fp32_gflops``: the probe's rates (None when not probed). ``source``: "probe",
    "api" (the query said no, so nothing was timed) or "env" (forced by ``CMERL_CPU_BF16``)."""

    native: bool
    api: bool | None
    bf16_gflops: float | None
    fp32_gflops: float | None
    source: str

    @property
    def bf16_slowdown(self) -> float | None:
        """How many times slower a bf16 GEMM ran than fp32 (below 1 means bf16 was faster)."""
        if not self.bf16_gflops or not self.fp32_gflops:
            return None
        return self.fp32_gflops / self.bf16_gflops


def gemm_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = PROBE_SHAPE, *, repeats: int = 5,
                min_seconds: float = 0.02) -> float:
    """Best-of-``repeats`` rate of ``x @ W.T`` (x: (m, k), W: (n, k)) on the CPU in ``dtype``, in GFLOP/s
    (2·m·k·n FLOPs per product). Each repeat runs the product enough times to last ``min_seconds``."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: oneDNN primitive creation
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            torch.nn.functional.linear(x, w)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return 2.0 * m * k * n / best / 1e9


def _api_says_bf16() -> bool | None:
    query = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    if query is None:
        return None
    try:
        return bool(query())
    except RuntimeError:
        return None


@functools.cache
def cpu_bf16_support() -> CpuBf16Support:
    """Measure (once per process) whether bf16 matrix products are native and faster on this CPU."""
    forced = os.environ.get(ENV_CPU_BF16, "").strip().lower()
    if forced in ("1", "true", "yes", "native"):
        return CpuBf16Support(True, None, None, None, "env")
    if forced in ("0", "false", "no", "none"):
        return CpuBf16Support(False, None, None, None, "env")
    if forced:
        raise ValueError(f"{ENV_CPU_BF16}={forced!r}: use 1 (native bf16) or 0 (none), or unset it to measure")
    api = _api_says_bf16()
    if api is False:
        # Without oneDNN's bf16 path the product is emulated: the slow-down is still measured once, for the
        # warning an explicit bfloat16 gets.
        bf16, fp32 = gemm_gflops(torch.bfloat16, repeats=2), gemm_gflops(torch.float32, repeats=2)
        return CpuBf16Support(False, api, bf16, fp32, "api")
    bf16, fp32 = gemm_gflops(torch.bfloat16), gemm_gflops(torch.float32)
    return CpuBf16Support(bf16 > fp32, api, bf16, fp32, "probe")


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype and the reason, printed as ``float32 (CPU without native bf16)``."""

    dtype: torch.dtype
    reason: str
    quantization: str | None = None  # "int8": dynamic int8 Linear layers over ``dtype`` (float32) weights

    @property
    def name(self) -> str:
        return self.quantization or str(self.dtype).removeprefix("torch.")

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def _device_type(device: str | torch.device | None) -> str:
    return torch.device(device or "cpu").type


def resolve_dtype(dtype: str | torch.dtype = AUTO, *, device: str | torch.device | None = "cpu",
                  trained: bool = False, native_bf16: bool | None = None) -> DtypeChoice:
    """Turn a dtype setting into a concrete dtype for a model on ``device``.

    ``dtype``: ``"auto"`` or a dtype name / ``torch.dtype`` (honoured as given). ``trained``: the weights get
    gradients (the policy), else inference only. ``native_bf16``: inject the CPU's capability instead of
    measuring it (tests; callers that already know). An explicit bfloat16 on a CPU without native bf16
    warns (``RuntimeWarning``) with the measured slow-down, and is still honoured."""
    kind = _device_type(device)
    if is_int8(dtype):
        if trained:
            raise ValueError(INT8_TRAINED)
        if kind != "cpu":
            raise ValueError(f"int8 is a CPU path (torch's dynamic int8 kernels); on {kind} use auto")
        return DtypeChoice(torch.float32, "as requested: dynamic int8 Linear layers, fp32 head and activations",
                           quantization=INT8)
    if not (isinstance(dtype, str) and dtype.strip().lower() == AUTO):
        chosen = parse_dtype(dtype)
        if chosen == torch.bfloat16 and kind == "cpu":
            support = cpu_bf16_support() if native_bf16 is None else None
            if not (native_bf16 if native_bf16 is not None else support.native):
                slow = support.bf16_slowdown if support is not None else None
                factor = f" (measured {slow:.1f}x slower than float32 here)" if slow else ""
                warnings.warn(f"bfloat16 on a CPU without native bf16 matrix products is slow{factor}; "
                              "dtype auto would pick float32", RuntimeWarning, stacklevel=2)
        return DtypeChoice(chosen, "as requested")
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "GPU with bf16")
        if trained:
            return DtypeChoice(torch.float32, "trained weights on a GPU without bf16")
        return DtypeChoice(torch.float16, "GPU without bf16")
    if kind != "cpu":
        return DtypeChoice(torch.float32, f"{kind} device")
    if trained:
        return DtypeChoice(torch.float32, "trained weights on CPU")
    native = cpu_bf16_support().native if native_bf16 is None else native_bf16
    if native:
        return DtypeChoice(torch.bfloat16, "CPU with native bf16")
    return DtypeChoice(torch.float32, "CPU without native bf16")


def describe_cpu_bf16() -> str:
    """One line for logs and benchmarks: the decision and the measured rates."""
    s = cpu_bf16_support()
    if s.source == "env":
        return f"native bf16: {'yes' if s.native else 'no'} (forced by {ENV_CPU_BF16})"
    rates = (f"; GEMM {PROBE_SHAPE[0]}x{PROBE_SHAPE[1]}->{PROBE_SHAPE[2]}: bf16 {s.bf16_gflops:.1f}, "
             f"fp32 {s.fp32_gflops:.1f} GFLOP/s" if s.bf16_gflops and s.fp32_gflops else "")
    return f"native bf16: {'yes' if s.native else 'no'} (oneDNN query: {s.api}, decided by {s.source}{rates})"
