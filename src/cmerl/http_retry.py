"""One HTTP retry policy for cmerl's clients: the remote verifier (:mod:`cmerl.scoring.remote`, async)
and the OpenAI-compatible judge (:class:`cmerl.judging.OpenAIJudge`, sync).

* Retried: connection errors and timeouts (``httpx.TransportError``) and the transient answers 408, 429,
  500, 502, 503 and 504 (:data:`RETRY_STATUSES`).
* Never retried: any other answer (2xx, 3xx, other 4xx such as 400, 401, 404, 422, and 501/505, which do
  not go away by asking again); it is returned to the caller at once, which reports it in its own words.
* Delay before retry ``k`` (0, 1, ...): the answer's ``Retry-After`` when it holds a number of seconds,
  else ``backoff * 2**k`` times a jitter factor in [0.5, 1); both capped at ``max_backoff`` seconds.
* When the retries are spent, :class:`RetriesExhaustedError` names the method, the URL, the attempts and
  the last failure (``HTTP 503: <server message>`` or the transport error); ``status`` is the last HTTP
  status (None for a transport error).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


class RetriesExhaustedError(RuntimeError):
    """Every attempt failed with a retried status or a transport error."""

    def __init__(self, *, method: str, url: str, attempts: int, failure: str, status: int | None):
        super().__init__(f"{method} {url} failed after {attempts} attempts ({failure})")
        self.method, self.url, self.attempts, self.failure, self.status = method, url, attempts, failure, status


@dataclass(frozen=True)
class RetryPolicy:
    """``retries``: attempts after the first (0: no retry); ``backoff``: first delay in seconds;
    ``max_backoff``: cap on every delay, ``Retry-After`` included."""

    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 16.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError(f"retries, backoff and max_backoff must be >= 0 (got {self.retries}, {self.backoff}, "
                             f"{self.max_backoff})")

    def delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (0-based), given its answer if there was one."""
        hinted = retry_after_seconds(response) if response is not None else None
        if hinted is not None:
            return min(self.max_backoff, hinted)
        return min(self.max_backoff, self.backoff * 2 ** attempt) * random.uniform(0.5, 1.0)


def error_message(response: httpx.Response) -> str:
    """The human message of an error answer (OpenAI/vLLM ``error.message``, FastAPI ``detail``, or the text)."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail"):
            if body.get(key):
                return str(body[key])
    return str(body)[:500]


def retry_after_seconds(response: httpx.Response) -> float | None:
    """``Retry-After`` in seconds when the header holds a number (negative counts as 0), else None."""
    value = response.headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class _Attempts:
    """Bookkeeping shared by the sync and async loops: the delay after each failure, or the final error."""

    def __init__(self, policy: RetryPolicy, method: str, url: str):
        self.policy, self.method, self.url, self.attempt = policy, method, url, 0

    def failed(self, outcome: httpx.Response | httpx.TransportError) -> float:
        """Seconds to wait before the next attempt; raises :class:`RetriesExhaustedError` if none is left."""
        if isinstance(outcome, httpx.Response):
            failure, status = f"HTTP {outcome.status_code}: {error_message(outcome)}", outcome.status_code
            response: httpx.Response | None = outcome
        else:
            failure, status, response = f"{type(outcome).__name__}: {outcome or 'no detail'}", None, None
        if self.attempt >= self.policy.retries:
            raise RetriesExhaustedError(method=self.method, url=self.url, attempts=self.attempt + 1,
                                        failure=failure, status=status)
        delay = self.policy.delay(self.attempt, response)
        self.attempt += 1
        return delay


def send_with_retries(send: Callable[[], httpx.Response], policy: RetryPolicy, *, method: str,
                      url: str) -> httpx.Response:
    """Call ``send()`` (one HTTP request) until it returns an answer that is not retried, and return it."""
    attempts = _Attempts(policy, method, url)
    while True:
        try:
            response = send()
        except httpx.TransportError as exc:
            time.sleep(attempts.failed(exc))
            continue
        if response.status_code not in RETRY_STATUSES:
            return response
        time.sleep(attempts.failed(response))


async def async_send_with_retries(send: Callable[[], Awaitable[httpx.Response]], policy: RetryPolicy, *,
                                  method: str, url: str) -> httpx.Response:
    """:func:`send_with_retries` for a coroutine ``send`` (waits with ``asyncio.sleep``)."""
    attempts = _Attempts(policy, method, url)
    while True:
        try:
            response = await send()
        except httpx.TransportError as exc:
            await asyncio.sleep(attempts.failed(exc))
            continue
        if response.status_code not in RETRY_STATUSES:
            return response
        await asyncio.sleep(attempts.failed(response))
