"""A pairwise judge behind Anthropic's Messages API, through the official ``anthropic`` client.

The Messages API returns no log-probs, so this judge works in parse mode: the prompt's system text goes
in ``system``, the filled user template is the one user turn, and the reply must say "The better
response is Response A|B" (:func:`cmerl.judging.parse_verdict`). ``prefill=True`` also sends the prompt's
prefill as a final assistant turn and parses prefill + continuation (cheaper; some models refuse a
prefill). No temperature is sent (the Messages API of anthropic 2.x has no such parameter; the model's
default sampling applies, so verdicts may vary between runs). An unparseable reply is retried once by the run loop and then recorded as an
**error** (never a tie); an HTTP error or an unreachable server (after the client's own retries with
backoff) raises :class:`~cmerl.judging.JudgeConnectionError` naming the URL and status.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from cmerl.judging import (
    DEFAULT_MAX_RESPONSE_CHARS,
    Job,
    JudgeConnectionError,
    JudgePrompt,
    OrderResult,
    judge_concurrently,
    parse_verdict,
    truncate_response,
)

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_KEY_ENV = "ANTHROPIC_API_KEY"


class AnthropicJudge:
    """``model`` on ``base_url`` (default Anthropic's API); the key is read from ``api_key_env`` and never
    recorded. ``retries``: the client's retries of 408/409/429/5xx and connection errors."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key_env: str = DEFAULT_KEY_ENV,
                 max_tokens: int = 32, timeout: float = 120.0, concurrency: int = 4, retries: int = 3,
                 prompt: JudgePrompt | None = None, max_response_chars: int = DEFAULT_MAX_RESPONSE_CHARS,
                 prefill: bool = False):
        import anthropic  # deferred: anthropic (API judges only)

        url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"judge base URL must start with http:// or https:// (got {url!r})")
        url = url.removesuffix("/v1")  # the client adds /v1/messages itself
        key = os.environ.get(api_key_env)
        if not key:
            raise ValueError(f"environment variable {api_key_env} (the Anthropic API key) is not set or empty; "
                             "name another with --api-key-env")
        self.model = model
        self.name = f"anthropic:{model}"
        self.base_url = url
        self.api_key_env = api_key_env
        self.max_tokens = int(max_tokens)
        self.concurrency = max(1, int(concurrency))
        self.retries = int(retries)
        self.prompt = prompt or JudgePrompt.load()
        self.max_response_chars = int(max_response_chars)
        self.prefill = bool(prefill)
        self._client = anthropic.Anthropic(api_key=key, base_url=url, timeout=timeout, max_retries=self.retries)
        self.progress: Callable[[int], None] | None = None

    def settings(self) -> dict:
        return {"kind": "anthropic", "base_url": self.base_url, "model": self.model, "api": "messages",
                "api_key_env": self.api_key_env, "mode": "parse",
                "max_tokens": self.max_tokens, "prefill": self.prefill,
                "max_response_chars": self.max_response_chars}

    def close(self) -> None:
        self._client.close()

    def judge(self, jobs: Sequence[Job]) -> list[OrderResult]:
        return judge_concurrently(self._judge_one, jobs, self.concurrency, self.progress)

    def _judge_one(self, job: Job) -> OrderResult:
        import anthropic  # deferred: anthropic (API judges only)

        system, user = self.prompt.messages(job.instruction,
                                            truncate_response(job.response_A, self.max_response_chars),
                                            truncate_response(job.response_B, self.max_response_chars))
        messages = [{"role": "user", "content": user["content"]}]
        if self.prefill:
            messages.append({"role": "assistant", "content": self.prompt.prefill})
        try:
            reply = self._client.messages.create(model=self.model, system=system["content"], messages=messages,
                                                 max_tokens=self.max_tokens)
        except anthropic.APIStatusError as exc:
            raise JudgeConnectionError(f"Anthropic judge {self.base_url} answered HTTP {exc.status_code}: "
                                       f"{str(exc)[:300]}") from None
        except anthropic.APIConnectionError as exc:
            raise JudgeConnectionError(f"Anthropic judge {self.base_url} failed after {self.retries + 1} tries: "
                                       f"{exc}") from None
        text = "".join(getattr(block, "text", "") for block in reply.content if getattr(block, "type", "") == "text")
        full = f"{self.prompt.prefill}{text}" if self.prefill else text
        letter = parse_verdict(full)
        if letter is None:
            return OrderResult(None, raw=text, error=f"unparseable judge output: {text[:120]!r}")
        return OrderResult(letter, raw=text)
