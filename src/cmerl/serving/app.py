"""The CME reward service: a FastAPI app around one loaded verifier.

Routes (all JSON; errors are ``{"error": {"message", "type", "param", "code"}}``):

* ``POST /score``: ``{"items": [{"prompt", "response"} | {"input_ids", "response_start"}], "entropy",
  "self_certainty", "tokens", "logprob_floor", "empty_score", "max_length"}`` -> ``{"model", "scores":
  [{"mean_logprob", "sum_logprob", "n_tokens", "truncated", ...}], "usage"}``. Text items are rendered by
  the server (its render config); token items are scored as given.
* ``POST /get_reward``: OpenRLHF's remote reward protocol (:mod:`cmerl.integrations.openrlhf`).
* ``POST /v1/completions``: the scoring subset of vLLM's endpoint (``prompt_logprobs``; nothing is
  generated: ``text`` is empty). ``POST /tokenize`` and ``GET /v1/models`` as in vLLM.
* ``GET /health`` (no token needed; 200 with what is served), ``GET /metrics`` (Prometheus text),
  ``GET /openapi.json`` (the OpenAPI 3.1 document of all routes, :mod:`cmerl.serving.openapi`).

Protection: bodies over ``max_body_bytes`` or with more than ``max_items`` items get 413; undecodable
bodies 400 (not UTF-8, not JSON, ``NaN``/``Infinity`` constants, numbers beyond float64 such as
``1e400``, nesting deeper than the JSON parser goes); schema errors 422 naming the field (CME floats must
be finite: ``logprob_floor`` in [-1e6, 0], ``|empty_score| <= 1e6``); a full queue 503 with
``Retry-After``; unknown routes 404 and wrong methods 405 (with ``Allow``); with an API key set
(``CMERL_API_KEY``), every route but ``/health`` needs ``Authorization: Bearer <key>`` (401/403). Every
error, 500 included, has the error format above, and a refused request leaves its keep-alive connection
usable.

The engine runs in one worker thread behind a :class:`~cmerl.serving.batcher.DynamicBatcher`. The engine
is asked for raw log-probs (a per-call floor of -9999, like vLLM's JSON clamp); the CME floor and
empty-response score are applied per request
(:func:`cmerl.scoring.types.response_score_from_token_logprobs`), so ``/v1/completions`` returns raw log-probs.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cmerl import __version__
from cmerl.formatting import RenderConfig
from cmerl.integrations.openrlhf import (
    DEFAULT_STOP_STRINGS,
    PROMPT_MODES,
    QueryMismatchError,
    render_config_for,
    reward_payload,
    scoring_prompts,
    split_queries,
)
from cmerl.scoring.requests import render_request, truncate_request
from cmerl.scoring.types import (
    ResponseScore,
    ScoreRequest,
    attach_token_positions,
    response_score_from_token_logprobs,
)
from cmerl.serving.batcher import DynamicBatcher, Options, QueueFull, ShuttingDown
from cmerl.serving.metrics import ServiceMetrics
from cmerl.serving.openapi import openapi_schema
from cmerl.serving.schemas import (
    FLOOR_MIN,
    SCORE_ABS_MAX,
    CompletionBody,
    RewardBody,
    ScoreBody,
    TextItem,
    TokenizeBody,
)

if TYPE_CHECKING:  # the served engine; the app itself needs no torch import
    from cmerl.scoring.local import Verifier

logger = logging.getLogger("cmerl")

#: The engine's own floor: log-probs are reported as computed (vLLM clamps -inf to this value in JSON).
RAW_FLOOR = -9999.0
ROUTES = ("/score", "/get_reward", "/v1/completions", "/tokenize", "/v1/models", "/health", "/metrics",
          "/openapi.json")


@dataclass
class ServerConfig:
    """Settings of one service process (each maps to a ``cmerl serve`` flag).

    max_batch_items / max_wait_ms / batching: dynamic batching (see :class:`DynamicBatcher`).
    max_queue_items: items allowed to wait for the engine before requests get 503.
    max_body_bytes / max_items: request size limits (413).
    logprob_floor / empty_score: CME rules (default: the verifier's own).
    prompt_mode / stop_strings: how ``/get_reward`` builds (prompt, response) pairs.
    api_key: bearer token (default: ``$CMERL_API_KEY``; empty = no authentication).
    served_name: model name reported and accepted by the OpenAI routes (default: the verifier's name).
    """

    max_batch_items: int = 64
    max_wait_ms: float = 5.0
    batching: bool = True
    max_queue_items: int = 4096
    max_body_bytes: int = 16 * 1024 * 1024
    max_items: int = 1024
    max_top_logprobs: int = 20
    logprob_floor: float | None = None
    empty_score: float | None = None
    prompt_mode: str = "chat"
    stop_strings: tuple[str, ...] = DEFAULT_STOP_STRINGS
    api_key: str | None = None
    served_name: str | None = None
    shutdown_timeout_s: float = 60.0
    extra_health: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt_mode not in PROMPT_MODES:
            raise ValueError(f"unknown prompt mode {self.prompt_mode!r}; use one of {', '.join(PROMPT_MODES)}")
        for name in ("max_batch_items", "max_queue_items", "max_items", "max_body_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")
        for name in ("max_wait_ms", "shutdown_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (got {value!r})")
        if self.max_top_logprobs < 0:
            raise ValueError(f"max_top_logprobs must be >= 0 (got {self.max_top_logprobs})")
        if self.logprob_floor is not None and not (math.isfinite(self.logprob_floor)
                                                   and FLOOR_MIN <= self.logprob_floor <= 0):
            raise ValueError(f"logprob_floor must be a finite natural log in [{FLOOR_MIN:g}, 0] "
                             f"(got {self.logprob_floor!r})")
        if self.empty_score is not None and not (math.isfinite(self.empty_score)
                                                 and abs(self.empty_score) <= SCORE_ABS_MAX):
            raise ValueError(f"empty_score must be a finite number in [-{SCORE_ABS_MAX:g}, {SCORE_ABS_MAX:g}] "
                             f"(got {self.empty_score!r})")


class ApiError(Exception):
    """An error answer: HTTP ``status``, a message for humans, the offending field (``param``)."""

    TYPES: ClassVar[dict[int, str]] = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
             404: "not_found_error", 405: "method_not_allowed", 413: "request_too_large",
             422: "invalid_request_error", 500: "internal_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ---------------------------------------------------------------------------------------------- middleware
class _Middleware:
    def __init__(self, app):
        self.app = app


async def _send_error(send, err: ApiError) -> None:
    response = err.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


class MetricsMiddleware(_Middleware):
    """Counts requests by route and status and times them (outermost, so refusals are counted too)."""

    def __init__(self, app, metrics: ServiceMetrics):
        super().__init__(app)
        self.metrics = metrics
        self.pid = str(os.getpid()).encode()  # sent as ``x-cmerl-pid``: which process (replica) answered

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = {"code": 500}

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-cmerl-pid", self.pid)]}
            await send(message)

        t0 = time.perf_counter()
        self.metrics.inflight.add(1)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.add(-1)
            self.metrics.requests.inc(route=route, status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - t0, route=route)


class AuthMiddleware(_Middleware):
    """``Authorization: Bearer <key>`` on every route but ``/health`` when a key is set."""

    def __init__(self, app, api_key: str | None, metrics: ServiceMetrics):
        super().__init__(app)
        self.key = (api_key or "").encode()
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.key or scope["path"] == "/health":
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            self.metrics.rejected.inc(reason="unauthenticated")
            return await _send_error(send, ApiError(401, "missing bearer token: send 'Authorization: Bearer <key>'",
                                                    headers={"WWW-Authenticate": "Bearer"}))
        if not hmac.compare_digest(token.strip(), self.key):
            self.metrics.rejected.inc(reason="bad_token")
            return await _send_error(send, ApiError(403, "wrong API key"))
        return await self.app(scope, receive, send)


class BodyLimitMiddleware(_Middleware):
    """Reads the whole body, refusing it with 413 past ``limit`` bytes (declared or actually sent)."""

    def __init__(self, app, limit: int, metrics: ServiceMetrics):
        super().__init__(app)
        self.limit = limit
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = ApiError(413, f"request body is larger than the limit of {self.limit} bytes; "
                                "split it into smaller requests")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            self.metrics.rejected.inc(reason="too_large")
            return await _send_error(send, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                self.metrics.rejected.inc(reason="too_large")
                return await _send_error(send, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ---------------------------------------------------------------------------------------------- helpers
def _loc(loc: tuple) -> str:
    parts = []
    for i, part in enumerate(loc):
        if part in ("text", "tokens") and i > 0 and isinstance(loc[i - 1], int):
            continue  # the tag of a discriminated union, not a field
        parts.append(str(part))
    return ".".join(parts) or "body"


class _NotJson(ValueError):
    """A JSON token Python accepts but JSON (RFC 8259) and float64 do not: NaN, Infinity, 1e400."""


def _reject_constant(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number (JSON has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"the number {text[:40]} is out of range of a 64-bit float")
    return value


def parse_json_strict(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity constants and out-of-range numbers (ApiError 400), and
    bodies nested deeper than the parser's recursion limit (400)."""
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except _NotJson as exc:
        raise ApiError(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None


async def parse_body(request: Request, model: type[BaseModel]) -> Any:
    raw = await request.body()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"request body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    data = parse_json_strict(text)
    try:
        return model.model_validate(data)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        where = _loc(tuple(first["loc"]))
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise ApiError(422, f"{where}: {first['msg']}{more}", param=where) from None


def _finite(x: float) -> float:
    return x if math.isfinite(x) else RAW_FLOOR


# ---------------------------------------------------------------------------------------------- the app
class RewardService:
    """The verifier, its batcher and metrics; the route handlers are its methods."""

    def __init__(self, verifier: Verifier, config: ServerConfig):
        self.config = config
        self.name = config.served_name or verifier.name
        self.floor = float(config.logprob_floor if config.logprob_floor is not None else verifier.logprob_floor)
        self.empty_score = float(config.empty_score if config.empty_score is not None else
                                 (verifier.empty_score if config.logprob_floor is None else self.floor))
        self.verifier = verifier  # asked for raw log-probs (floor RAW_FLOOR); CME rules apply per request
        self.vocab_size = int(verifier.vocab_size)
        self.max_length = int(verifier.max_length)
        self.metrics = ServiceMetrics(queue_depth=lambda: self.batcher.queued_items)
        self.batcher = DynamicBatcher(
            self._engine, max_batch_items=config.max_batch_items, max_wait_s=config.max_wait_ms / 1000.0,
            max_queue_items=config.max_queue_items, enabled=config.batching, on_batch=self._on_batch,
            expected=self._expected_jobs)
        self._decoded: dict[int, str] = {}

    # -------------------------------------------------------------- engine side (worker thread)
    def _engine(self, requests: list[ScoreRequest], options: Options) -> list[ResponseScore]:
        return self.verifier.score_requests(requests, entropy=options.entropy, self_certainty=options.self_certainty,
                                            top_k=options.top_k, logprob_floor=RAW_FLOOR)

    def _expected_jobs(self) -> int:
        """HTTP requests in flight that have not reached the engine yet (they will, soon)."""
        return int(self.metrics.inflight.value()) - self.batcher.outstanding_jobs

    def _on_batch(self, items: int, tokens: int, seconds: float) -> None:
        self.metrics.batch_size.observe(items)
        self.metrics.tokens.inc(tokens)
        self.metrics.engine_seconds.observe(seconds)

    async def _run(self, requests: list[ScoreRequest], options: Options) -> list[ResponseScore]:
        try:
            return await self.batcher.score(requests, options)
        except QueueFull as exc:
            self.metrics.rejected.inc(reason="queue_full")
            raise ApiError(503, f"server busy: {exc}; retry later",
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after)))}) from None
        except ShuttingDown:
            self.metrics.rejected.inc(reason="shutting_down")
            raise ApiError(503, "server is shutting down", headers={"Retry-After": "1"}) from None

    # -------------------------------------------------------------- validation helpers
    def _check_items(self, n: int, field_name: str) -> None:
        if n > self.config.max_items:
            self.metrics.rejected.inc(reason="too_many_items")
            raise ApiError(413, f"{field_name} has {n} items; the limit is {self.config.max_items} per request",
                           param=field_name)
        if n == 0:
            raise ApiError(422, f"{field_name} is empty", param=field_name)

    def _check_ids(self, ids: list[int], where: str) -> None:
        for p, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise ApiError(422, f"{where}: token id {t} at position {p} is outside the vocabulary "
                                    f"(0..{self.vocab_size - 1})", param=where)

    def _render(self, prompts: list[Any], responses: list[str], config, field_name: str) -> list[ScoreRequest]:
        out = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            try:
                out.append(render_request(self.verifier.tokenizer, config, p, r))
            except Exception as exc:  # noqa: BLE001 - bad input (template errors, odd unicode) is the client's
                raise ApiError(422, f"{field_name}.{i}: cannot render this pair: {exc}",
                               param=f"{field_name}.{i}") from None
        return out

    def _finalize(self, raw: list[ResponseScore], truncated: list[bool], floor: float,
                  empty_score: float) -> list[ResponseScore]:
        return [response_score_from_token_logprobs(
                    r.token_logprobs, floor=floor, empty_score=empty_score, truncated=r.truncated or t,
                    token_entropies=r.token_entropies, token_self_certainty=r.token_self_certainty)
                for r, t in zip(raw, truncated)]

    # -------------------------------------------------------------- routes
    async def score(self, request: Request) -> JSONResponse:
        body: ScoreBody = await parse_body(request, ScoreBody)
        self._check_items(len(body.items), "items")
        limit = min(self.max_length, body.max_length or self.max_length)
        text_idx = [i for i, it in enumerate(body.items) if isinstance(it, TextItem)]
        reqs: list[ScoreRequest | None] = [None] * len(body.items)
        if text_idx:
            prompts = [_prompt_value(body.items[i].prompt) for i in text_idx]
            responses = [body.items[i].response for i in text_idx]
            config = self.verifier.render_config
            if body.render is not None:
                try:
                    config = RenderConfig(**body.render.model_dump())
                except ValueError as exc:
                    raise ApiError(422, f"render: {exc}", param="render") from None
            rendered = await asyncio.to_thread(self._render, prompts, responses, config, "items")
            for i, r in zip(text_idx, rendered):
                reqs[i] = r
        for i, it in enumerate(body.items):
            if reqs[i] is None:
                if it.response_start > len(it.input_ids) or (it.response_start == 0 and it.input_ids):
                    raise ApiError(422, f"items.{i}.response_start: {it.response_start} must be in "
                                        f"1..{len(it.input_ids)} (0 only for an empty item)",
                                   param=f"items.{i}.response_start")
                self._check_ids(it.input_ids, f"items.{i}.input_ids")
                reqs[i] = ScoreRequest(list(it.input_ids), it.response_start)
        prepared = [truncate_request(r, limit) for r in reqs]  # type: ignore[arg-type]
        raw = await self._run([ScoreRequest(p.ids, p.start) for p in prepared],
                              Options(body.entropy, body.self_certainty, 0))
        floor = self.floor if body.logprob_floor is None else float(body.logprob_floor)
        empty = (self.empty_score if body.logprob_floor is None else floor) if body.empty_score is None \
            else float(body.empty_score)
        scores = self._finalize(raw, [p.truncated for p in prepared], floor, empty)
        attach_token_positions(scores, reqs)  # type: ignore[arg-type]  # ids; offsets of text items
        self.metrics.items.inc(len(scores), route="/score")
        out = []
        for s in scores:
            d = s.to_dict(with_tokens=body.tokens)
            d.pop("extra", None)
            out.append({k: v for k, v in d.items() if v is not None})
        return JSONResponse({"model": self.name, "scores": out,
                             "usage": {"items": len(out), "tokens": sum(len(p.ids) for p in prepared)}})

    async def get_reward(self, request: Request) -> JSONResponse:
        body: RewardBody = await parse_body(request, RewardBody)
        self._check_items(len(body.query), "query")
        if len(body.prompts) != len(body.query):
            raise ApiError(422, f"prompts has {len(body.prompts)} items but query has {len(body.query)}",
                           param="prompts")
        if body.labels is not None and len(body.labels) != len(body.query):
            raise ApiError(422, f"labels has {len(body.labels)} items but query has {len(body.query)}",
                           param="labels")
        try:
            responses = split_queries(body.query, body.prompts, self.config.stop_strings)
        except QueryMismatchError as exc:
            raise ApiError(422, str(exc), param=f"query.{exc.index}") from None
        try:
            prompts = scoring_prompts(body.prompts, body.labels, self.config.prompt_mode)
        except (TypeError, ValueError) as exc:
            raise ApiError(422, str(exc), param="labels") from None
        config = render_config_for(self.config.prompt_mode, self.verifier.render_config)
        reqs = await asyncio.to_thread(self._render, prompts, responses, config, "query")
        prepared = [truncate_request(r, self.max_length) for r in reqs]
        raw = await self._run([ScoreRequest(p.ids, p.start) for p in prepared], Options())
        scores = self._finalize(raw, [p.truncated for p in prepared], self.floor, self.empty_score)
        self.metrics.items.inc(len(scores), route="/get_reward")
        return JSONResponse(reward_payload(scores))

    async def completions(self, request: Request) -> JSONResponse:
        body: CompletionBody = await parse_body(request, CompletionBody)
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"The model `{body.model}` does not exist; this server serves `{self.name}`",
                           param="model")
        if body.stream:
            raise ApiError(400, "stream=true is not supported: this server only returns prompt log-probs",
                           param="stream")
        k = body.prompt_logprobs
        if k is None:
            raise ApiError(400, f"this server only scores prompts: set prompt_logprobs "
                                f"(0..{self.config.max_top_logprobs})", param="prompt_logprobs")
        if not 0 <= k <= self.config.max_top_logprobs:
            raise ApiError(400, f"prompt_logprobs must be in 0..{self.config.max_top_logprobs} (got {k})",
                           param="prompt_logprobs")
        prompts = await asyncio.to_thread(self._prompt_ids, body)
        if not prompts:  # "" and [] and [[]] and [""] all answer 400 "... is empty"
            raise ApiError(400, "prompt is empty", param="prompt")
        self._check_items(len(prompts), "prompt")
        for i, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, f"prompt {i} is empty", param=f"prompt.{i}")
            if len(ids) > self.max_length:
                raise ApiError(400, f"prompt {i} has {len(ids)} tokens; this model's maximum context length is "
                                    f"{self.max_length}", param=f"prompt.{i}")
            self._check_ids(ids, f"prompt.{i}")
        raw = await self._run([ScoreRequest(ids, 1) for ids in prompts], Options(top_k=k))
        choices = [{"index": i, "text": "", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                    "prompt_logprobs": self._prompt_logprobs(ids, r, k)}
                   for i, (ids, r) in enumerate(zip(prompts, raw))]
        n_tokens = sum(len(ids) for ids in prompts)
        self.metrics.items.inc(len(prompts), route="/v1/completions")
        return JSONResponse({"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                             "created": int(time.time()), "model": self.name, "choices": choices,
                             "usage": {"prompt_tokens": n_tokens, "completion_tokens": 0, "total_tokens": n_tokens}})

    def _prompt_ids(self, body: CompletionBody) -> list[list[int]]:
        p = body.prompt
        if isinstance(p, str):
            p = [p]
        if p and all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[list-item]
        out = []
        for x in p:
            if isinstance(x, str):
                out.append(list(self.verifier.tokenizer(x, add_special_tokens=body.add_special_tokens)["input_ids"]))
            else:
                out.append(list(x))
        return out

    def _decode(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            text = self._decoded[token_id] = self.verifier.tokenizer.decode([token_id])
        return text

    def _prompt_logprobs(self, ids: list[int], raw: ResponseScore, k: int) -> list[dict | None]:
        """vLLM's layout: ``None`` at position 0, then ``{str(id): {"logprob", "rank", "decoded_token"}}``
        with the top-k and the actual token (its rank is exact inside the top-k, else reported as k + 1)."""
        out: list[dict | None] = [None]
        tops = raw.extra.get("top_logprobs") if k else None
        for p in range(1, len(ids)):
            entry: dict[str, dict] = {}
            top = tops[p - 1] if tops else []
            for rank, (tid, lp) in enumerate(top, start=1):
                entry[str(tid)] = {"logprob": max(_finite(lp), RAW_FLOOR), "rank": rank,
                                   "decoded_token": self._decode(tid)}
            actual = str(ids[p])
            if actual not in entry:
                entry[actual] = {"logprob": max(_finite(raw.token_logprobs[p - 1]), RAW_FLOOR),
                                 "rank": k + 1 if k else None, "decoded_token": self._decode(ids[p])}
            out.append(entry)
        return out

    async def tokenize(self, request: Request) -> JSONResponse:
        body: TokenizeBody = await parse_body(request, TokenizeBody)
        ids = list(self.verifier.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens)["input_ids"])
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": self.max_length})

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "owned_by": "cmerl", "created": 0,
             "max_model_len": self.max_length, "vocab_size": self.vocab_size}]})

    async def health(self, request: Request) -> JSONResponse:
        body = {"status": "draining" if self.batcher.closing else "ok", "service": "cmerl", "model": self.name,
                "vocab_size": self.vocab_size, "max_length": self.max_length, "logprob_floor": self.floor,
                "empty_score": self.empty_score, "prompt_mode": self.config.prompt_mode,
                "batching": self.config.batching, "queue_items": self.batcher.queued_items, "pid": os.getpid(),
                **self.config.extra_health}
        return JSONResponse(body, status_code=503 if self.batcher.closing else 200)

    async def metrics_text(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _version() -> str:
    return str(__version__)


def _prompt_value(prompt: Any) -> Any:
    if isinstance(prompt, list):
        return [m.model_dump() for m in prompt]
    return prompt


def create_app(verifier: Verifier, config: ServerConfig | None = None) -> FastAPI:
    """The service app around ``verifier`` (a local :class:`~cmerl.scoring.Verifier`, left unchanged: the
    app asks it for raw log-probs, ``logprob_floor=-9999`` per call, and applies the CME floor per request)."""
    config = config or ServerConfig()
    if config.api_key is None:
        config.api_key = os.environ.get("CMERL_API_KEY") or None
    service = RewardService(verifier, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        yield
        await asyncio.to_thread(service.batcher.close, config.shutdown_timeout_s)

    app = FastAPI(title="cmerl reward service", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.service = service

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: f"no route {request.url.path}; routes: {', '.join(ROUTES)}",
                    405: f"{request.method} is not allowed on {request.url.path}"}
        return ApiError(exc.status_code, messages.get(exc.status_code, str(exc.detail)),
                        headers=dict(exc.headers or {})).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error on %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error ({type(exc).__name__}); see the server log").response()

    async def openapi_json(request: Request) -> JSONResponse:
        return JSONResponse(document)

    document = openapi_schema(version=_version(), served_name=service.name, vocab_size=service.vocab_size,
                              max_top_logprobs=config.max_top_logprobs)

    handlers: list[tuple[str, str, Callable[[Request], Awaitable[Response]]]] = [
        ("POST", "/score", service.score), ("POST", "/get_reward", service.get_reward),
        ("POST", "/v1/completions", service.completions), ("POST", "/tokenize", service.tokenize),
        ("GET", "/v1/models", service.models), ("GET", "/health", service.health),
        ("GET", "/metrics", service.metrics_text), ("GET", "/openapi.json", openapi_json)]
    for method, path, handler in handlers:
        app.add_api_route(path, handler, methods=[method])
    # Starlette runs the last-added middleware first: metrics, then auth, then the body limit.
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes, metrics=service.metrics)
    app.add_middleware(AuthMiddleware, api_key=config.api_key, metrics=service.metrics)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    return app
