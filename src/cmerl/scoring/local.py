"""The in-process verifier engine (transformers): per-token log-probs of responses under a frozen model.

Speed and memory:
* requests are sorted longest first and packed into right-padded batches bounded by a token budget
  (``max_batch_tokens`` = rows x padded length) and a padding limit (``max_padding``), then results
  are put back in input order;
* the backbone runs once per batch under ``torch.inference_mode``; the output projection is applied only
  to the positions whose next token is a response token, in chunks of ``head_chunk`` rows;
* log-probs are ``gather(logits) - logsumexp(logits)`` in float32 per chunk: no (batch, length, vocab)
  log-softmax is ever built. With bf16 weights the head runs on a float32 copy of its weight by default
  (``fp32_head``) so log-probs keep float32 precision.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from cmerl.formatting import Prompt, RenderConfig
from cmerl.scoring.requests import (
    PreparedRequest,
    plan_batches,
    render_request,
    render_requests,
    truncate_request,
)
from cmerl.scoring.types import (
    DEFAULT_LOGPROB_FLOOR,
    ResponseScore,
    ScoreRequest,
    attach_token_positions,
    response_score_from_token_logprobs,
)

MIN_SHARED_PREFIX = 8  # tokens; shorter common prefixes are not worth a separate forward


class Verifier:
    """A frozen causal LM that scores (prompt, response) pairs. See module docstring for the engine.

    Args:
        model, tokenizer: a transformers causal LM (any dtype) and its tokenizer.
        name: shown in logs and used by the independence guard (defaults to the model's source).
        render: how pairs are rendered (chat template, system prompt, end-of-turn token).
        logprob_floor: per-token log-probs are clamped at this value (natural log).
        empty_score: mean and sum log-prob of an empty response, and its ``neg_entropy`` signal (default:
            ``logprob_floor``); its self-certainty is 0, the lowest value a real response can have.
        max_batch_tokens: token budget of one forward batch (rows x padded length).
        max_length: context limit in tokens (default: the model's ``max_position_embeddings``).
        head_chunk: rows of the output projection computed at once.
        fp32_head: run the output projection in float32 when the model is in a lower precision.
        max_padding: a sequence joins a batch only if padding it to the batch width adds at most this
            fraction of the width (default: 0.1 on CPU, where padded positions cost as much as real ones
            and batching gains little; 1.0, i.e. no limit, on accelerators).
        share_prefix: requests that share everything before their last context token (one prompt,
            several responses) run that prefix once and reuse its KV cache (checked once per verifier
            against the plain forward; architectures where it does not match score without sharing).
    """

    def __init__(self, model, tokenizer, *, name: str | None = None, render: RenderConfig | None = None,
                 logprob_floor: float = DEFAULT_LOGPROB_FLOOR, empty_score: float | None = None,
                 max_batch_tokens: int = 4096, max_length: int | None = None, head_chunk: int = 256,
                 fp32_head: bool = True, max_padding: float | None = None, share_prefix: bool = True):
        if hasattr(model, "get_base_model"):  # a PEFT wrapper: score with the wrapped model as it is now
            model = model.get_base_model()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.render_config = render or RenderConfig()
        self.logprob_floor = float(logprob_floor)
        self.empty_score = float(logprob_floor if empty_score is None else empty_score)
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", None) or 4096)
        if self.max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens (got {self.max_length})")
        self.head_chunk = int(head_chunk)
        self.fp32_head = fp32_head
        if max_padding is None:
            max_padding = 0.1 if torch.device(model.device).type == "cpu" else 1.0
        if not 0.0 <= max_padding <= 1.0:
            raise ValueError(f"max_padding must be between 0 and 1 (got {max_padding})")
        self.max_padding = float(max_padding)
        self.share_prefix = share_prefix
        self._share_ok: bool | None = None  # checked on first use, see _prefix_sharing_ok
        self._head_weight_fp32: torch.Tensor | None = None
        self._fast_head: bool | None = None  # checked on first use, see _fast_head_ok
        self._spec: tuple[str, dict] | None = None
        self.last_seconds = 0.0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name: str, *, dtype: str = "auto", device: str = "cpu", **kwargs) -> Verifier:
        """Load a verifier by model name (packaged alias, folder, .gguf, hub id). ``dtype`` ``auto``: bf16
        where the hardware runs it natively, else fp32 (:mod:`cmerl.precision`); the choice is logged and
        kept as ``model.cmerl_dtype``."""
        # deferred: torch, via cmerl.models (slow import, loaded only when used)
        from cmerl.models import load_model

        model, tok = load_model(name, dtype=dtype, device=device, role="verifier")
        for p in model.parameters():
            p.requires_grad_(False)
        v = cls(model, tok, name=kwargs.pop("name", name), **kwargs)
        v._spec = (name, {"dtype": dtype, "device": device, **kwargs})
        return v

    def __reduce__(self):
        """Pickles as its load recipe when built by name (cheap to send to workers), else by value."""
        if self._spec is not None:
            return (_verifier_from_spec, self._spec)
        return super().__reduce__()

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    # ------------------------------------------------------------------ rendering
    def render(self, prompt: Prompt, response: str) -> ScoreRequest:
        return render_request(self.tokenizer, self.render_config, prompt, response)

    def render_all(self, prompts: Sequence[Prompt], responses: Sequence) -> list[ScoreRequest]:
        return render_requests(self.tokenizer, self.render_config, prompts, responses)

    # ------------------------------------------------------------------ scoring
    def score(self, prompts: Sequence[Prompt], responses: Sequence, *, entropy: bool = False,
              self_certainty: bool = False, progress: bool = False) -> list[ResponseScore]:
        """Score pairs; returns one :class:`ResponseScore` per pair, in input order."""
        return self.score_requests(self.render_all(prompts, responses), entropy=entropy,
                                   self_certainty=self_certainty, progress=progress)

    def score_requests(self, requests: Sequence[ScoreRequest], *, entropy: bool = False,
                       self_certainty: bool = False, top_k: int = 0, progress: bool = False,
                       logprob_floor: float | None = None) -> list[ResponseScore]:
        """Score already-tokenized requests (``input_ids``, ``response_start``), in input order.

        ``top_k > 0`` also returns, per scored position, the k most likely tokens as
        ``extra["top_logprobs"]``: a list (one per position) of ``[(token_id, logprob), ...]`` (unclamped).
        ``logprob_floor``: the per-token clamp of this call (natural log; default: the verifier's own); the
        empty-response score stays :attr:`empty_score`. The reward service scores with a floor of -9999
        and applies each request's CME floor afterwards.
        """
        t0 = time.perf_counter()
        floor = self.logprob_floor if logprob_floor is None else float(logprob_floor)
        prepared = []
        for i, r in enumerate(requests):
            if not (0 <= r.response_start <= len(r.input_ids)):
                raise ValueError(f"request {i}: response_start {r.response_start} outside 0..{len(r.input_ids)}")
            if r.response_start == 0 and len(r.input_ids) > 0:
                raise ValueError(f"request {i}: the first response token needs at least one context token")
            prepared.append(truncate_request(r, self.max_length))
        results: list[ResponseScore | None] = [None] * len(prepared)
        todo = [i for i, p in enumerate(prepared) if len(p.ids) > p.start]
        for i, p in enumerate(prepared):
            if len(p.ids) == p.start:
                results[i] = response_score_from_token_logprobs(
                    [], floor=floor, empty_score=self.empty_score, truncated=p.truncated,
                    token_entropies=[] if entropy else None, token_self_certainty=[] if self_certainty else None)
        with torch.inference_mode():
            plan = self._plan(prepared, todo)
            iterator = plan
            if progress:
                iterator = tqdm(plan, desc=f"scoring ({self.name})", unit="batch")
            cached_group, cache = None, None
            for prefix_len, group, rows in iterator:
                batch_items = [prepared[i] for i in rows]
                if prefix_len and group != cached_group:
                    cached_group, cache = group, self._prefix_cache(batch_items[0].ids[:prefix_len])
                scores = self._score_batch(batch_items, entropy, self_certainty, floor, top_k,
                                           prefix_len=prefix_len, prefix_cache=cache if prefix_len else None)
                for i, res in zip(rows, scores):
                    results[i] = res
        attach_token_positions(results, list(requests))  # type: ignore[arg-type]
        self.last_seconds = time.perf_counter() - t0
        return results  # type: ignore[return-value]

    def _head_weight(self) -> torch.Tensor:
        w = self.model.get_output_embeddings().weight
        if not self.fp32_head or w.dtype == torch.float32:
            return w
        if self._head_weight_fp32 is None or self._head_weight_fp32.device != w.device:
            self._head_weight_fp32 = w.detach().float()
        return self._head_weight_fp32

    def _plan(self, prepared: list[PreparedRequest], todo: list[int]) -> list[tuple[int, int, list[int]]]:
        """Work items ``(shared prefix length, group id, request indices)``, one per forward batch.

        Requests whose tokens before their last context token are identical (one prompt, several
        responses: a GRPO group) form a group when ``share_prefix``: the prefix runs once and its KV cache
        serves all of the group's batches. Everything else goes into plain batches (prefix length 0).
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        if self.share_prefix and len(todo) > 1 and self._fast_head_ok() and self._prefix_sharing_ok():
            for i in todo:
                n = prepared[i].start - 1
                if n >= MIN_SHARED_PREFIX:
                    groups.setdefault(tuple(prepared[i].ids[:n]), []).append(i)
        shared = [members for members in groups.values() if len(members) > 1]
        in_group = {i for members in shared for i in members}
        rest = [i for i in todo if i not in in_group]
        plan = [(0, -1, [rest[j] for j in batch]) for batch in plan_batches(
            [len(prepared[i].ids) for i in rest], self.max_batch_tokens, max_padding=self.max_padding)]
        for g, members in enumerate(shared):
            n = prepared[members[0]].start - 1
            suffix_lengths = [len(prepared[i].ids) - n for i in members]
            for batch in plan_batches(suffix_lengths, self.max_batch_tokens, max_padding=self.max_padding):
                plan.append((n, g, [members[j] for j in batch]))
        return plan

    def _prefix_cache(self, prefix: list[int]):
        """KV cache of the backbone over ``prefix`` (batch of one)."""
        ids = torch.tensor([prefix], device=self.model.device)
        return self.model.get_decoder()(input_ids=ids, use_cache=True).past_key_values

    def _prefix_sharing_ok(self) -> bool:
        """Whether a cached prefix + suffix batch reproduces the plain forward (checked once on 24 tokens);
        if not (an architecture whose cache does not support it), prefixes are not shared."""
        if self._share_ok is None:
            ids = [t % self.vocab_size for t in range(1, 25)]
            other = ids[:16] + [t % self.vocab_size for t in range(40, 44)]
            items = [PreparedRequest(ids, 17, False), PreparedRequest(other, 17, False)]
            try:
                with torch.inference_mode():
                    backbone = self.model.get_decoder()
                    shared = self._hidden(items, 16, self._prefix_cache(ids[:16]))
                    plain = [backbone(input_ids=torch.tensor([p.ids], device=self.model.device)).last_hidden_state[0]
                             for p in items]
                ref = torch.cat([plain[0][16:], plain[1][16:]]).float()
                got = torch.cat([shared[0, :8], shared[1, :4]]).float()
                quantized = getattr(getattr(self.model, "cmerl_dtype", None), "quantization", None)
                rel = 1e-3 if self.model.dtype == torch.float32 and not quantized else 3e-2
                self._share_ok = float((got - ref).abs().max()) <= rel * (1.0 + float(ref.abs().max()))
            except (AttributeError, TypeError, ValueError, RuntimeError, IndexError):
                self._share_ok = False
        return self._share_ok

    def _padded(self, items: list[PreparedRequest], prefix_len: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of ``ids[prefix_len:]`` of each item, right-padded: ids are
        (batch, width); the mask is (batch, prefix_len + width), the shared prefix counted as attended."""
        width = max(len(p.ids) for p in items) - prefix_len
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(items), width), pad, dtype=torch.long)
        mask = torch.zeros((len(items), prefix_len + width), dtype=torch.long)
        mask[:, :prefix_len] = 1
        for b, p in enumerate(items):
            input_ids[b, :len(p.ids) - prefix_len] = torch.tensor(p.ids[prefix_len:])
            mask[b, prefix_len:len(p.ids)] = 1
        return input_ids, mask

    def _hidden(self, items: list[PreparedRequest], prefix_len: int = 0, prefix_cache=None) -> torch.Tensor:
        """Backbone hidden states (batch, width, hidden) of ``ids[prefix_len:]`` of each item, right-padded;
        with a prefix, the cached prefix (batch of one) is repeated for the batch and attended to."""
        device = self.model.device
        input_ids, mask = self._padded(items, prefix_len)
        width = input_ids.shape[1]
        backbone = self.model.get_decoder()
        if not prefix_len:
            return backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        cache = copy.deepcopy(prefix_cache)
        cache.batch_repeat_interleave(len(items))
        positions = torch.arange(prefix_len, prefix_len + width, device=device)[None].expand(len(items), -1)
        return backbone(input_ids=input_ids.to(device), attention_mask=mask.to(device), position_ids=positions,
                        past_key_values=cache, use_cache=True).last_hidden_state

    def _score_batch(self, items: list[PreparedRequest], entropy: bool, self_certainty: bool, floor: float,
                     top_k: int = 0, prefix_len: int = 0, prefix_cache=None) -> list[ResponseScore]:
        device = self.model.device
        rows, cols, targets, sizes = [], [], [], []
        for b, p in enumerate(items):
            n = len(p.ids) - p.start
            rows.append(torch.full((n,), b, dtype=torch.long))
            cols.append(torch.arange(p.start - 1 - prefix_len, len(p.ids) - 1 - prefix_len))
            targets.extend(p.ids[p.start:])
            sizes.append(n)
        row_idx, col_idx = torch.cat(rows).to(device), torch.cat(cols).to(device)
        tgt = torch.tensor(targets, device=device)
        if self._fast_head_ok():
            hidden = self._hidden(items, prefix_len, prefix_cache)
            h = hidden[row_idx, col_idx]  # (n_scored, hidden)
            stats, top = self._head_stats(h, tgt, entropy, self_certainty, top_k)
        else:  # the model's own forward: full (batch, length, vocab) logits, then the scored rows
            input_ids, mask = self._padded(items)
            logits = self.model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            stats, top = self._head_stats(logits[row_idx, col_idx], tgt, entropy, self_certainty, top_k,
                                          projected=True)
        top_split = list(zip(top[0].split(sizes), top[1].split(sizes))) if top_k else None
        out = []
        for b, parts in enumerate(zip(*[s.split(sizes) for s in stats])):
            out.append(response_score_from_token_logprobs(
                parts[0].tolist(), floor=floor, empty_score=self.empty_score, truncated=items[b].truncated,
                token_entropies=parts[1].tolist() if entropy else None,
                token_self_certainty=parts[-1].tolist() if self_certainty else None))
            if top_split is not None:
                vals, idx = top_split[b]
                out[-1].extra["top_logprobs"] = [list(zip(i.tolist(), v.tolist())) for v, i in zip(vals, idx)]
        return out

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output projection of hidden states ``h`` (n, hidden) → float32 logits (n, vocab), with the
        logit scale / final soft-cap of the architectures that have one."""
        weight = self._head_weight()
        bias = getattr(self.model.get_output_embeddings(), "bias", None)
        # An fp32 copy of a bf16 head times bf16 hidden states: every input is exactly a bf16 number, so
        # oneDNN's bf16 matmul with fp32 accumulation and output gives the fp32 result, ~3x faster on CPU.
        exact_in_bf16 = weight is self._head_weight_fp32 and h.dtype == torch.bfloat16
        with _cpu_bf16_matmul(exact_in_bf16 and weight.device.type == "cpu"):
            logits = torch.nn.functional.linear(h.to(weight.dtype), weight,
                                                None if bias is None else bias.to(weight.dtype)).float()
        scale = getattr(self.model.config, "logit_scale", None)
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if scale:
            logits = logits * scale
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _fast_head_ok(self) -> bool:
        """Whether backbone + :meth:`_logits` reproduces ``model(ids).logits`` (checked once on 8 tokens).

        Architectures that post-process logits in another way (e.g. Granite's ``logits_scaling``), or
        whose backbone cannot be found, fall back to the model's own forward: still exact, but it builds
        (batch, length, vocab) logits, so memory is no longer bounded by ``head_chunk``.
        """
        if self._fast_head is None:
            ids = torch.arange(1, 9, device=self.model.device)[None]
            try:
                with torch.inference_mode():
                    ours = self._logits(self.model.get_decoder()(input_ids=ids).last_hidden_state[0])
                    ref = self.model(input_ids=ids).logits[0].float()
                tol = 0.05 * (1.0 + float(ref.abs().max()))  # bf16 rounding passes, a wrong scale does not
                self._fast_head = ours.shape == ref.shape and float((ours - ref).abs().max()) <= tol
            except (AttributeError, TypeError, ValueError):
                self._fast_head = False
            if not self._fast_head:
                warnings.warn(f"verifier {self.name!r}: this architecture post-processes its logits in a way the "
                              "fast output projection does not reproduce; scoring with the model's full forward "
                              "instead (exact, slower, more memory)", stacklevel=3)
        return self._fast_head

    def _head_stats(self, h: torch.Tensor, tgt: torch.Tensor, entropy: bool, self_certainty: bool,
                    top_k: int = 0, projected: bool = False
                    ) -> tuple[list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Per scored position: [logprob, (entropy), (self-certainty)], each (n_scored,) float32 on CPU,
        and (top-k log-probs, top-k ids), each (n_scored, k), empty when ``top_k == 0``.

        ``h``: (n_scored, hidden) hidden states, or (n_scored, vocab) logits when ``projected``."""
        log_v = math.log(self.vocab_size)
        outs: list[list[torch.Tensor]] = [[] for _ in range(1 + entropy + self_certainty)]
        top_vals: list[torch.Tensor] = []
        top_ids: list[torch.Tensor] = []
        for s in range(0, h.shape[0], self.head_chunk):
            hc = h[s:s + self.head_chunk]
            logits = hc.float().clone() if projected else self._logits(hc)
            lse = torch.logsumexp(logits, dim=-1)
            outs[0].append(logits.gather(-1, tgt[s:s + self.head_chunk, None]).squeeze(-1) - lse)
            if not (entropy or self_certainty or top_k):
                continue
            logp = logits.sub_(lse[:, None])  # in place: log-probs (entropy as lse - E[logit] loses ~1e-4)
            k = 1
            if entropy:
                outs[k].append(-(logp.exp().mul_(logp)).sum(-1))
                k += 1
            if self_certainty:
                outs[k].append(-logp.mean(-1) - log_v)
            if top_k:
                v, i = logp.topk(min(top_k, logp.shape[-1]), dim=-1)
                top_vals.append(v)
                top_ids.append(i)
        stats = [torch.cat(o).cpu() if o else torch.empty(0) for o in outs]
        if top_k:
            return stats, (torch.cat(top_vals).cpu(), torch.cat(top_ids).cpu())
        return stats, (torch.empty(0), torch.empty(0))


@contextlib.contextmanager
def _cpu_bf16_matmul(enabled: bool):
    """Let CPU float32 matmuls run on bf16 units with fp32 accumulation (exact when the inputs are bf16
    numbers); restores the previous setting. No-op when disabled or unsupported by this torch build."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if not enabled or matmul is None or not hasattr(matmul, "fp32_precision"):
        yield
        return
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def _verifier_from_spec(name: str, kwargs: dict) -> Verifier:
    return Verifier.from_pretrained(name, **kwargs)
