"""The reward service's OpenAPI 3.1 document, built from the same pydantic models that validate requests.

``GET /openapi.json`` serves :func:`openapi_schema`. Request bodies come from
:mod:`cmerl.serving.schemas`; the answers are described by the models below, so a client (or a fuzzer:
``tests/test_service_fuzz.py`` runs schemathesis from this document) can check every response, errors
included: every error is ``{"error": {"message", "type", "param", "code"}}`` (:class:`ErrorBody`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from cmerl.serving.schemas import CompletionBody, RewardBody, ScoreBody, TokenizeBody


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # answers may carry more fields than documented


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorBody(BaseModel):
    """Every error answer (4xx and 5xx)."""

    error: ErrorDetail


class ScoreOut(_Open):
    """One item's score (``token_*`` arrays only with ``"tokens": true``; entropy fields with ``entropy``)."""

    mean_logprob: float
    sum_logprob: float
    n_tokens: int
    truncated: bool
    token_logprobs: list[float] | None = None
    token_entropies: list[float] | None = None
    mean_entropy: float | None = None
    token_self_certainty: list[float] | None = None
    mean_self_certainty: float | None = None
    token_ids: list[int] | None = None
    token_offsets: list[tuple[int, int]] | None = None  # character spans in the response (text items)


class ScoreUsage(BaseModel):
    items: int
    tokens: int


class ScoreResponse(BaseModel):
    model: str
    scores: list[ScoreOut]
    usage: ScoreUsage


class RewardResponse(_Open):
    """OpenRLHF's remote reward answer."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class PromptLogprob(BaseModel):
    logprob: float
    rank: int | None
    decoded_token: str


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: None
    finish_reason: str
    stop_reason: None
    prompt_logprobs: list[dict[str, PromptLogprob] | None]


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class ModelCard(_Open):
    id: str
    object: str
    owned_by: str
    created: int
    max_model_len: int
    vocab_size: int


class ModelList(BaseModel):
    object: str
    data: list[ModelCard]


class Health(_Open):
    status: str
    service: str
    model: str
    vocab_size: int
    max_length: int
    logprob_floor: float
    empty_score: float
    prompt_mode: str
    batching: bool
    queue_items: int
    pid: int


_MODELS: list[type[BaseModel]] = [ScoreBody, RewardBody, CompletionBody, TokenizeBody, ErrorBody, ScoreResponse,
                                  RewardResponse, CompletionResponse, TokenizeResponse, ModelList, Health]

#: Error statuses every POST route may answer (400 undecodable body, 401/403 auth, 413 too large, 422
#: schema, 503 busy or shutting down).
_POST_ERRORS = ("400", "401", "403", "413", "422", "503")
_GET_ERRORS = ("401", "403")


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(codes: tuple[str, ...]) -> dict[str, dict]:
    return {code: _json(ErrorBody, "error") for code in codes}


def _post(summary: str, body: type[BaseModel], answer: type[BaseModel], extra_errors: tuple[str, ...] = ()) -> dict:
    return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
        "application/json": {"schema": _ref(body)}}},
        "responses": {"200": _json(answer, "success"), **_errors(_POST_ERRORS + extra_errors)}}}


def openapi_schema(title: str = "cmerl reward service", version: str = "", *, served_name: str | None = None,
                   vocab_size: int | None = None, max_top_logprobs: int | None = None) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route (see :mod:`cmerl.serving.app`).

    With the served model's facts, the request schemas say what this server accepts beyond the field
    types: token ids in ``0..vocab_size-1``, ``prompt_logprobs`` required in ``0..max_top_logprobs``,
    ``model`` the served name (or absent), ``stream`` false."""
    _, defs = models_json_schema([(m, "validation") for m in _MODELS],
                                 ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    token = {"type": "integer", "minimum": 0} | ({"maximum": vocab_size - 1} if vocab_size else {})
    schemas["TokenItem"]["properties"]["input_ids"]["items"] = token
    completion = schemas["CompletionBody"]
    for variant in completion["properties"]["prompt"]["anyOf"]:
        if variant.get("items") == {"type": "integer"}:
            variant["items"] = token
        elif variant.get("items", {}).get("items") == {"type": "integer"}:
            variant["items"]["items"] = token
    if max_top_logprobs is not None:
        completion["properties"]["prompt_logprobs"] = {"type": "integer", "minimum": 0,
                                                       "maximum": max_top_logprobs}
        completion["required"] = [*completion.get("required", []), "prompt_logprobs"]
    if served_name is not None:
        completion["properties"]["model"] = {"anyOf": [{"const": served_name}, {"type": "null"}], "default": None}
    completion["properties"]["stream"] = {"type": "boolean", "const": False, "default": False}
    paths = {
        "/score": _post("Score (prompt, response) items: CME and per-token statistics", ScoreBody, ScoreResponse),
        "/get_reward": _post("OpenRLHF remote reward", RewardBody, RewardResponse),
        "/v1/completions": _post("vLLM-compatible prompt_logprobs scoring", CompletionBody, CompletionResponse,
                                 ("404",)),
        "/tokenize": _post("Tokenize a prompt (vLLM)", TokenizeBody, TokenizeResponse),
        "/v1/models": {"get": {"summary": "The served model", "responses": {
            "200": _json(ModelList, "the served model"), **_errors(_GET_ERRORS)}}},
        "/health": {"get": {"summary": "Liveness and what is served (no token needed)", "responses": {
            "200": _json(Health, "serving"), "503": _json(Health, "draining (shutting down)")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
            "200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(_GET_ERRORS)}}},
    }
    return {"openapi": "3.1.0", "info": {"title": title, "version": version or "0"}, "paths": paths,
            "components": {"schemas": schemas}}
