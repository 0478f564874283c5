"""The local judge: a causal LM read in log-prob mode, one forward pass per (pair, order)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch

from cmerl.formatting import RenderConfig, render_context, uses_chat_template
from cmerl.judging.prompt import (
    DEFAULT_MAX_RESPONSE_CHARS,
    Job,
    JudgePrompt,
    Letter,
    OrderResult,
    truncate_response,
)
from cmerl.scoring.requests import plan_batches

#: Shorter shared prefixes are not worth a cache (:meth:`LocalJudge._shared_prefix`).
MIN_PREFIX_TOKENS = 8


# --------------------------------------------------------------------------- local judge
class LocalJudge:
    """A causal LM judging in log-prob mode: one forward pass per (pair, order), no sampling.

    The context is the chat-templated ``[system, user]`` turns plus the prefill (the plain format for
    tokenizers without a chat template); the two candidates are the tokens that ``prefill + " A"`` and
    ``prefill + " B"`` add. Contexts are right-padded into length-sorted batches bounded by
    ``max_batch_tokens`` (rows x padded length); the output projection runs on the last position only.

    ``prefix_reuse`` (default off): the tokens every context of a call starts with (the judge's system
    prompt and the user turn's opening) run through the model once; their key/value cache is kept and
    reused by every batch whose contexts all start with them, so each row runs only its own suffix. It is
    the same computation up to float rounding (tested against the plain path), not a recorded setting.
    """

    def __init__(self, model, tokenizer, *, name: str | None = None, prompt: JudgePrompt | None = None,
                 max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS, max_batch_tokens: int = 8192,
                 render: RenderConfig = RenderConfig(), dtype: str | None = None, prefix_reuse: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        self.prompt = prompt or JudgePrompt.load()
        self.max_response_chars = int(max_response_chars)
        self.max_batch_tokens = int(max_batch_tokens)
        self.render_config = render
        self.dtype = dtype or str(next(model.parameters()).dtype).replace("torch.", "")
        self.progress: Callable[[int], None] | None = None  # called with the number of jobs just done
        self._head_fp32: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.prefix_reuse = bool(prefix_reuse)
        self._prefix: tuple[tuple[int, ...], object] | None = None  # (token ids, their KV cache, batch 1)
        self.prefix_forwards = 0  # prefix caches built (a count for tests and benchmarks)

    @classmethod
    def from_pretrained(cls, name: str, *, dtype: str = "auto", **kwargs) -> LocalJudge:
        """Load a judge by model name (packaged alias, HF folder, .gguf, hub id). ``dtype`` ``auto``: bf16
        where the hardware runs it natively, else fp32 (:mod:`cmerl.precision`); the settings record the
        setting as given, so a run resumed on another kind of CPU under ``auto`` is not refused."""
        # deferred: torch, via cmerl.models (slow import, loaded only when used)
        from cmerl.models import load_model

        model, tok = load_model(name, dtype=dtype, role="judge")
        for p in model.parameters():
            p.requires_grad_(False)
        return cls(model, tok, name=name, dtype=dtype, **kwargs)

    def settings(self) -> dict:
        return {"kind": "local", "model": self.name, "dtype": self.dtype, "mode": "logprobs",
                "max_response_chars": self.max_response_chars,
                "chat_template": uses_chat_template(self.tokenizer, self.render_config),
                "choices": [" A", " B"]}

    def _encode(self, text: str) -> list[int]:
        chat = uses_chat_template(self.tokenizer, self.render_config)
        return list(self.tokenizer(text, add_special_tokens=not chat)["input_ids"])

    def encode_job(self, job: Job) -> tuple[list[int], int, int]:
        """``(context_ids, id_A, id_B)``: the context up to the choice token and the two candidates."""
        msgs = self.prompt.messages(job.instruction, truncate_response(job.response_A, self.max_response_chars),
                                    truncate_response(job.response_B, self.max_response_chars))
        context = render_context(self.tokenizer, msgs, self.render_config) + self.prompt.prefill
        ids_a, ids_b = self._encode(context + " A"), self._encode(context + " B")
        p = 0
        while p < min(len(ids_a), len(ids_b)) and ids_a[p] == ids_b[p]:
            p += 1
        if not (len(ids_a) == len(ids_b) == p + 1):
            raise ValueError(f"judge tokenizer of {self.name!r} does not encode the choices ' A' / ' B' as one "
                             f"token each after the prefill {self.prompt.prefill!r}; change the prompt's prefill")
        return ids_a[:p], ids_a[p], ids_b[p]

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        encoded = [self.encode_job(j) for j in jobs]
        results: list[OrderResult | None] = [None] * len(jobs)
        for batch in plan_batches([len(e[0]) for e in encoded], self.max_batch_tokens):
            for i, (la, lb, mass) in zip(batch, self._choice_logprobs([encoded[i] for i in batch])):
                if math.isnan(la) or math.isnan(lb):
                    results[i] = OrderResult(None, raw="", error="judge returned NaN log-probs")
                else:
                    choice: Letter = "A" if la >= lb else "B"
                    results[i] = OrderResult(choice, la, lb, raw=choice, extra={"choice_mass": mass})
            if self.progress:
                self.progress(len(batch))
        return results  # type: ignore[return-value]

    def _choice_logprobs(self, items: list[tuple[list[int], int, int]]) -> list[tuple[float, float, float]]:
        """Per item: log p(id_A | context), log p(id_B | context) and p(A) + p(B), float32."""
        logp = self.next_token_logprobs([ids for ids, _, _ in items])
        out = []
        for r, (_, ia, ib) in enumerate(items):
            la, lb = float(logp[r, ia]), float(logp[r, ib])
            out.append((la, lb, math.exp(la) + math.exp(lb)))
        return out

    @torch.inference_mode()
    def next_token_logprobs(self, contexts: list[list[int]]) -> torch.Tensor:
        """``(len(contexts), vocab)`` float32 natural-log next-token distribution after each context (one
        right-padded forward pass, over the suffixes after a reused prefix when ``prefix_reuse``; the output
        projection runs on the last position only, in float32)."""
        model = self.model
        prefix = self._shared_prefix(contexts) if self.prefix_reuse else None
        start = 0 if prefix is None else len(prefix[0])
        rows = [ids[start:] for ids in contexts]
        width = max(len(ids) for ids in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), start + width), dtype=torch.long)
        mask[:, :start] = 1
        for r, ids in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, start:start + len(ids)] = 1
        kwargs: dict = {}
        if prefix is not None:
            cache = copy.deepcopy(prefix[1])
            cache.batch_repeat_interleave(len(rows))  # type: ignore[attr-defined]
            kwargs = {"past_key_values": cache, "use_cache": True}
        hidden = model.get_decoder()(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device),
                                     **kwargs).last_hidden_state
        last = torch.tensor([len(ids) - 1 for ids in rows], device=hidden.device)
        h = hidden[torch.arange(len(rows), device=hidden.device), last]  # (rows, hidden)
        head = model.get_output_embeddings()
        if self._head_fp32 is None or self._head_fp32[0].device != head.weight.device:
            bias = getattr(head, "bias", None)
            self._head_fp32 = (head.weight.detach().float(), None if bias is None else bias.detach().float())
        logits = torch.nn.functional.linear(h.float(), *self._head_fp32)  # float32 log-probs
        if getattr(model.config, "logit_scale", None):
            logits = logits * model.config.logit_scale
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return torch.log_softmax(logits, dim=-1)

    def _shared_prefix(self, contexts: list[list[int]]) -> tuple[tuple[int, ...], object] | None:
        """The kept prefix when every context starts with it and goes on past it; else the longest prefix all
        ``contexts`` share (leaving each at least one token), run once and kept. ``None`` for a single context
        that the kept prefix does not fit, for a prefix shorter than :data:`MIN_PREFIX_TOKENS`, and when the
        model keeps no cache."""
        kept = self._prefix
        if kept is not None and all(len(ids) > len(kept[0]) and tuple(ids[:len(kept[0])]) == kept[0]
                                    for ids in contexts):
            return kept
        if len(contexts) < 2:  # nothing to share: a one-row prefix cache would cost a forward and save none
            return None
        n = min(len(ids) for ids in contexts) - 1
        first = contexts[0]
        for ids in contexts[1:]:
            n = next((i for i in range(n) if ids[i] != first[i]), n)
        if n < MIN_PREFIX_TOKENS:
            return None
        ids = tuple(first[:n])
        out = self.model.get_decoder()(input_ids=torch.tensor([ids], device=self.model.device), use_cache=True)
        cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            self.prefix_reuse = False  # this model returns no reusable cache: the plain path from now on
            return None
        self.prefix_forwards += 1
        self._prefix = (ids, cache)
        return self._prefix
