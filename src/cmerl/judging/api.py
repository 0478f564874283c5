"""Judges behind an HTTP API: the OpenAI-compatible judge (vLLM, llama.cpp server, OpenAI, ...), the
error an unreachable endpoint raises, and the concurrent one-request-per-job loop API judges share."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx

from cmerl.formatting import render_context
from cmerl.http_retry import RetriesExhaustedError, RetryPolicy, send_with_retries
from cmerl.judging.prompt import (
    DEFAULT_MAX_RESPONSE_CHARS,
    Job,
    JudgePrompt,
    Letter,
    OrderResult,
    parse_verdict,
    truncate_response,
)


def judge_concurrently(judge_one: Callable[[Job], OrderResult], jobs: Sequence[Job], concurrency: int,
                       progress: Callable[[int], None] | None = None) -> list[OrderResult]:
    """``judge_one`` on every job with ``concurrency`` threads (API judges: one request per job), results in
    job order; ``progress(1)`` after each."""
    with ThreadPoolExecutor(concurrency) as pool:
        results = []
        for r in pool.map(judge_one, jobs):
            results.append(r)
            if progress:
                progress(1)
    return results


# --------------------------------------------------------------------------- OpenAI-compatible judge
class JudgeConnectionError(RuntimeError):
    """The judge endpoint could not be reached or refused the request (not a judging error)."""


class OpenAIJudge:
    """A judge behind an OpenAI-compatible API (vLLM, llama.cpp server, OpenAI, ...).

    api="completions": the prompt is rendered to text (with ``template_tokenizer``'s chat template when
    given, else as plain ``system\\n\\nuser\\n\\n``) plus the prefill; one token is requested with
    ``logprobs=top_logprobs``; the letter's log-probs are read from the returned top list.
    api="chat": ``[system, user]`` messages; up to ``max_tokens`` tokens with ``logprobs: true`` and
    ``top_logprobs``; the letter token after "Response" (or a bare letter) gives the log-probs.
    Without logprobs in the answer (or with ``logprobs=False``) the text is parsed (parse mode). A letter
    missing from a top list gets the smallest listed log-prob as an upper bound (``extra.bounded``).
    The API key is read from the environment variable ``api_key_env`` (never stored).
    """

    def __init__(self, base_url: str, model: str, *, api: Literal["chat", "completions"] = "chat",
                 api_key_env: str | None = None, logprobs: bool = True, top_logprobs: int = 5,
                 max_tokens: int = 16, timeout: float = 120.0, concurrency: int = 4, retries: int = 3,
                 prompt: JudgePrompt | None = None, max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
                 template_tokenizer: str | None = None):
        if api not in ("chat", "completions"):
            raise ValueError(f"api must be 'chat' or 'completions' (got {api!r})")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL must start with http:// or https:// (got {base_url!r})")
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(f"environment variable {api_key_env} (the judge API key) is not set or empty")
            headers["Authorization"] = f"Bearer {key}"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.name = model
        self.api = api
        self.api_key_env = api_key_env
        self.logprobs = logprobs
        self.top_logprobs = int(top_logprobs)
        self.max_tokens = int(max_tokens)
        self.concurrency = max(1, int(concurrency))
        self.retries = int(retries)
        self.prompt = prompt or JudgePrompt.load()
        self.max_response_chars = int(max_response_chars)
        self.template_tokenizer = template_tokenizer
        self._tok = None
        if template_tokenizer:
            # deferred: torch, via cmerl.models (slow import, loaded only when used)
            from cmerl.models import load_tokenizer

            self._tok = load_tokenizer(template_tokenizer)
        self._client = httpx.Client(timeout=timeout, headers=headers)
        self.progress: Callable[[int], None] | None = None

    def settings(self) -> dict:
        return {"kind": "openai", "base_url": self.base_url, "model": self.model, "api": self.api,
                "api_key_env": self.api_key_env, "mode": "logprobs" if self.logprobs else "parse",
                "top_logprobs": self.top_logprobs, "temperature": 0.0,
                "max_tokens": 1 if self.api == "completions" else self.max_tokens,
                "max_response_chars": self.max_response_chars, "template_tokenizer": self.template_tokenizer}

    def close(self) -> None:
        self._client.close()

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        return judge_concurrently(self._judge_one, jobs, self.concurrency, self.progress)

    # -- requests
    def _post(self, path: str, body: dict) -> dict:
        """POST with cmerl's retry policy (:mod:`cmerl.http_retry`: ``retries`` retries of connection errors
        and 408/429/5xx, honouring ``Retry-After`` up to 8 s); any other non-200 answer raises at once."""
        url = self.base_url + path
        try:
            resp = send_with_retries(lambda: self._client.post(url, json=body),
                                     RetryPolicy(self.retries, backoff=0.5, max_backoff=8.0), method="POST", url=url)
        except RetriesExhaustedError as exc:
            raise JudgeConnectionError(f"judge endpoint {url} failed after {exc.attempts} tries: {exc.failure}") from None
        if resp.status_code != 200:
            raise JudgeConnectionError(f"judge endpoint {url} answered HTTP {resp.status_code}: {resp.text[:300]}")
        try:
            return resp.json()
        except ValueError:
            raise JudgeConnectionError(f"judge endpoint {url} returned non-JSON: {resp.text[:200]!r}") from None

    def _texts(self, job: Job) -> list[dict]:
        return self.prompt.messages(job.instruction, truncate_response(job.response_A, self.max_response_chars),
                                    truncate_response(job.response_B, self.max_response_chars))

    def _judge_one(self, job: Job) -> OrderResult:
        msgs = self._texts(job)
        if self.api == "completions":
            if self._tok is not None:
                text = render_context(self._tok, msgs) + self.prompt.prefill
            else:
                text = f"{msgs[0]['content']}\n\n{msgs[1]['content']}\n\n{self.prompt.prefill}"
            body = {"model": self.model, "prompt": text, "max_tokens": 1, "temperature": 0.0}
            if self.logprobs:
                body["logprobs"] = self.top_logprobs
            data = self._post("/completions", body)
            choice = (data.get("choices") or [{}])[0]
            raw = choice.get("text") or ""
            tops = ((choice.get("logprobs") or {}).get("top_logprobs") or [None])[0] if self.logprobs else None
            top_list = [(k, v) for k, v in tops.items()] if isinstance(tops, dict) else None
            return _result_from(raw, top_list)
        body = {"model": self.model, "messages": msgs, "max_tokens": self.max_tokens, "temperature": 0.0}
        if self.logprobs:
            body.update(logprobs=True, top_logprobs=self.top_logprobs)
        data = self._post("/chat/completions", body)
        choice = (data.get("choices") or [{}])[0]
        raw = (choice.get("message") or {}).get("content") or ""
        content = (choice.get("logprobs") or {}).get("content") if self.logprobs else None
        return _result_from(raw, _letter_top_list(content) if content else None)


def _letter_top_list(content: list[dict]) -> list[tuple[str, float]] | None:
    """Top log-probs at the verdict letter of a chat answer: the first token that is a bare A/B and follows
    "Response" (or starts the answer)."""
    before = ""
    for tok in content:
        t = tok.get("token", "")
        if t.strip() in ("A", "B") and (not before.strip() or re.search(r"response\W*$", before, re.IGNORECASE)):
            tops = tok.get("top_logprobs") or []
            listed = [(x.get("token", ""), x.get("logprob")) for x in tops]
            if not any(k == t for k, _ in listed):
                listed.append((t, tok.get("logprob")))
            return [(k, float(v)) for k, v in listed if v is not None]
        before += t
    return None


def _result_from(raw: str, top_list: list[tuple[str, float]] | None) -> OrderResult:
    """An :class:`OrderResult` from a judge's text and (optionally) the top log-probs at the letter."""
    if top_list:
        groups: dict[str, list[float]] = {"A": [], "B": []}
        for tok, lp in top_list:
            key = tok.strip()
            if key in groups:
                groups[key].append(lp)
        if groups["A"] or groups["B"]:
            floor = min(lp for _, lp in top_list)
            vals = {k: (_logsumexp(v) if v else floor) for k, v in groups.items()}
            bounded = [k for k, v in groups.items() if not v]
            choice: Letter = "A" if vals["A"] >= vals["B"] else "B"
            extra = {"bounded": bounded} if bounded else {}
            return OrderResult(choice, vals["A"], vals["B"], raw=raw, extra=extra)
    letter = parse_verdict(raw)
    if letter is None:
        return OrderResult(None, raw=raw, error=f"unparseable judge output: {raw[:120]!r}")
    return OrderResult(letter, raw=raw)


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))
