"""The verifier contract over HTTP: render and tokenize here, ask a server for the log-probs of those ids.

:class:`RemoteVerifier` has the same contract as the local :class:`~cmerl.scoring.Verifier` (the
:class:`~cmerl.scoring.types.AsyncScorer` protocol: ``score``, ``score_requests``, ``ascore``, ``name``;
plus ``tokenizer`` and ``render``). Pairs are rendered with :func:`cmerl.formatting.render_pair` and the verifier's
tokenizer, so the scored token spans are exactly the local engine's; the floor, empty-response score and
truncation rules are the local engine's too (:func:`~cmerl.scoring.types.response_score_from_token_logprobs`,
:func:`~cmerl.scoring.requests.truncate_request`). Nothing here imports torch.

Two wire protocols:

* ``openai``: a vLLM-compatible ``POST /v1/completions`` with token-id prompts, ``max_tokens: 1`` and
  ``prompt_logprobs: 1``; the log-prob of token ``ids[p]`` is read from
  ``choices[i].prompt_logprobs[p][str(ids[p])]["logprob"]`` (vLLM always includes the actual prompt
  token besides the top-k). Works against a plain ``vllm serve VERIFIER`` and against ``cmerl serve``.
  Entropy and self-certainty are not available over this protocol.
* ``cmerl``: ``POST /score`` of ``cmerl serve`` with token ids (or, when no tokenizer is given, the text
  pairs: the server then renders them with its own configuration).

Transport: one background event loop per verifier holds an ``httpx.AsyncClient``; requests are split in
chunks of ``chunk_size`` items sent with at most ``max_concurrency`` in flight. Connection errors,
timeouts, 408, 429 and 5xx answers are retried ``max_retries`` times by cmerl's one retry policy
(:mod:`cmerl.http_retry`: exponential backoff, ``Retry-After`` honoured up to ``max_backoff``); other 4xx
answers raise :class:`RemoteScoringError` at once with the server's message.
On first use the server is checked against the local tokenizer (vocabulary size and a tokenization
probe); a mismatch raises :class:`VerifierMismatchError`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

import httpx

from cmerl.formatting import Prompt, RenderConfig, completion_text
from cmerl.http_retry import RetriesExhaustedError, RetryPolicy, async_send_with_retries, error_message
from cmerl.scoring.requests import check_pairs, render_request, render_requests, truncate_request
from cmerl.scoring.types import (
    DEFAULT_LOGPROB_FLOOR,
    ResponseScore,
    ScoreRequest,
    attach_token_positions,
    response_score_from_token_logprobs,
)

PROTOCOLS = ("auto", "openai", "cmerl")
PROBE_TEXT = "cmerl probe: Hello, world! 12345 naïve café 東京 \t tabs\nand newlines -> {json: [1, 2]}"


class RemoteScoringError(RuntimeError):
    """A scoring server could not be reached or refused a request; ``status`` is the HTTP status (or None)."""

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class VerifierMismatchError(RemoteScoringError):
    """The server's model does not use the local tokenizer's vocabulary."""


@dataclass(frozen=True)
class ServerInfo:
    """What a server told us: protocol spoken, served model name, context limit and vocabulary size."""

    protocol: str
    model: str | None
    max_length: int | None
    vocab_size: int | None
    logprob_floor: float | None = None


def is_remote(spec: str) -> bool:
    """Whether a verifier name is a server URL (``http(s)://...``) rather than a model name."""
    return spec.startswith(("http://", "https://"))


REMOTE_OPTIONS = ("tokenizer", "protocol", "model")


def parse_remote_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``http://host:8000#tokenizer=NAME&protocol=openai&model=M`` -> (url, options).

    ``tokenizer`` (a model name) makes pairs render and tokenize locally (needed for a plain ``vllm serve``);
    without it a cmerl server renders text pairs itself. ``protocol``: auto, openai or cmerl. Raises
    ValueError naming an unknown option (configs report it as a ``ConfigError``).
    """
    url, _, fragment = spec.partition("#")
    options: dict[str, str] = {}
    for part in filter(None, fragment.split("&")):
        key, eq, value = part.partition("=")
        if not eq or key not in REMOTE_OPTIONS:
            raise ValueError(f"verifier {spec!r}: bad option {part!r}; use #key=value with keys "
                              f"{', '.join(REMOTE_OPTIONS)} joined by &")
        options[key] = value
    return url, options


def remote_verifier_from_spec(spec: str, **kwargs) -> RemoteVerifier:
    """The :class:`RemoteVerifier` a ``URL#key=value&...`` verifier name means (:func:`parse_remote_spec`)."""
    url, options = parse_remote_spec(spec)
    return RemoteVerifier(url, options.pop("tokenizer", None), **options, **kwargs)


class RemoteVerifier:
    """A verifier served over HTTP, with the contract of :class:`~cmerl.scoring.Verifier`.

    Args:
        url: base URL of the server (``http://host:8000``; a trailing ``/v1`` is accepted).
        tokenizer: the verifier's tokenizer, or a model name to load it from (:func:`cmerl.models.load_tokenizer`).
            ``None`` is allowed with a cmerl server only: text pairs are then sent and the server renders them.
        protocol: ``openai`` (vLLM ``/v1/completions``), ``cmerl`` (``/score``) or ``auto`` (ask ``/health``).
        model: model name sent to an OpenAI-compatible server (default: the first one it lists).
        name: shown in logs and used by the independence guard (default: the served model name).
        render, logprob_floor, empty_score: as for the local verifier. Without a tokenizer, an explicit
            ``render`` is sent to the server with the text pairs (else the server's own config applies).
        max_length: context limit in tokens (default: what the server reports); longer pairs are truncated
            like the local engine does (prompt tokens dropped from the left).
        api_key: bearer token (default: ``$CMERL_API_KEY``).
        timeout: seconds allowed for one HTTP request.
        max_retries, backoff, max_backoff: retry policy (attempts after the first; first delay; delay cap).
        max_concurrency: HTTP requests in flight at once; chunk_size: pairs per HTTP request.
        check: verify the server against the tokenizer on first use.
    """

    def __init__(self, url: str, tokenizer: Any = None, *, protocol: str = "auto", model: str | None = None,
                 name: str | None = None, render: RenderConfig | None = None,
                 logprob_floor: float = DEFAULT_LOGPROB_FLOOR, empty_score: float | None = None,
                 max_length: int | None = None, api_key: str | None = None, timeout: float = 120.0,
                 max_retries: int = 5, backoff: float = 0.5, max_backoff: float = 16.0, max_concurrency: int = 8,
                 chunk_size: int = 64, check: bool = True):
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https:// (got {url!r})")
        if max_concurrency < 1 or chunk_size < 1 or max_retries < 0:
            raise ValueError("max_concurrency and chunk_size must be >= 1 and max_retries >= 0")
        RetryPolicy(int(max_retries), float(backoff), float(max_backoff))  # ValueError now, not at the first request
        url = url.rstrip("/")
        self.url = url.removesuffix("/v1")
        if isinstance(tokenizer, str):
            # deferred: torch, via cmerl.models (torch-free CLI start)
            from cmerl.models import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.protocol = protocol
        self.model = model
        self._name = name
        self.render_config = render if render is not None else RenderConfig()
        self._send_render = render is not None  # text mode: ask the server to render this way
        self.logprob_floor = float(logprob_floor)
        self.empty_score = float(logprob_floor if empty_score is None else empty_score)
        self.max_length = max_length
        self.api_key = api_key if api_key is not None else os.environ.get("CMERL_API_KEY") or None
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.max_concurrency = int(max_concurrency)
        self.chunk_size = int(chunk_size)
        self.check_server = check
        self.info: ServerInfo | None = None
        self.last_seconds = 0.0
        self._init_runtime()

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: httpx.AsyncClient | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._info_lock: asyncio.Lock | None = None

    # ------------------------------------------------------------------ pickling and lifetime
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items()
                 if k not in ("_lock", "_loop", "_thread", "_client", "_semaphore", "_info_lock")}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()

    def close(self) -> None:
        """Close the HTTP client and stop the background loop (a later call starts them again)."""
        with self._lock:
            loop, thread, client = self._loop, self._thread, self._client
            self._loop = self._thread = self._client = None
            self._semaphore = self._info_lock = None
        if loop is None:
            return
        if client is not None:
            asyncio.run_coroutine_threadsafe(client.aclose(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteVerifier({self.url!r}, protocol={self.protocol!r}, model={self.name!r})"

    @property
    def name(self) -> str:
        if self._name:
            return self._name
        if self.info is not None and self.info.model:
            return self.info.model
        return self.model or self.url

    @property
    def source_name(self) -> str | None:
        """The served model's name, for the independence guard of :class:`cmerl.rewards.CrossModelEntropy`
        (asks the server on first use; None when it cannot be reached)."""
        if self.info is None:
            try:
                self.check()
            except RemoteScoringError:
                return None
        return self.info.model if self.info is not None else None

    # ------------------------------------------------------------------ rendering (same code as local)
    def _local_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this RemoteVerifier has no tokenizer (the server renders text pairs); "
                             "pass tokenizer= to render locally")
        return self.tokenizer

    def render(self, prompt: Prompt, response: str) -> ScoreRequest:
        return render_request(self._local_tokenizer(), self.render_config, prompt, response)

    def render_all(self, prompts: Sequence[Prompt], responses: Sequence) -> list[ScoreRequest]:
        return render_requests(self._local_tokenizer(), self.render_config, prompts, responses)

    # ------------------------------------------------------------------ public scoring API
    def score(self, prompts: Sequence[Prompt], responses: Sequence, *, entropy: bool = False,
              self_certainty: bool = False, progress: bool = False) -> list[ResponseScore]:
        """Score pairs; one :class:`ResponseScore` per pair, in input order (blocking)."""
        return self._run(self.ascore(prompts, responses, entropy=entropy, self_certainty=self_certainty))

    async def ascore(self, prompts: Sequence[Prompt], responses: Sequence, *, entropy: bool = False,
                     self_certainty: bool = False) -> list[ResponseScore]:
        """Async :meth:`score`: awaitable from any event loop; requests run on the verifier's own loop."""
        check_pairs(prompts, responses)
        if self.tokenizer is None:
            items: list[Any] = []
            for i, (p, r) in enumerate(zip(prompts, responses)):
                try:
                    items.append({"prompt": p, "response": completion_text(r)})
                except TypeError as exc:
                    raise TypeError(f"item {i}: {exc}") from None
        else:
            items = await asyncio.to_thread(self.render_all, list(prompts), list(responses))
        return await self._submit(self._score_items(items, entropy, self_certainty))

    def score_requests(self, requests: Sequence[ScoreRequest], *, entropy: bool = False,
                       self_certainty: bool = False, progress: bool = False) -> list[ResponseScore]:
        """Score already-tokenized requests (``input_ids``, ``response_start``), in input order."""
        return self._run(self._score_items(list(requests), entropy, self_certainty))

    def check(self) -> ServerInfo:
        """Ask the server what it serves and verify it against the local tokenizer; returns what it said."""
        return self._run(self._ensure_info())

    # ------------------------------------------------------------------ event loop plumbing
    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="cmerl-remote-verifier", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def _run(self, coro):
        try:
            loop = self._ensure_loop()
        except BaseException:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def _submit(self, coro):
        loop = self._ensure_loop()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, loop))

    def _runtime(self) -> tuple[httpx.AsyncClient, asyncio.Semaphore, asyncio.Lock]:
        """Client, semaphore and lock of the background loop (created there, on first use)."""
        if self._client is None:
            headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            limits = httpx.Limits(max_connections=self.max_concurrency * 2,
                                  max_keepalive_connections=self.max_concurrency)
            self._client = httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits,
                                             timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)))
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
            self._info_lock = asyncio.Lock()
        return self._client, self._semaphore, self._info_lock  # type: ignore[return-value]

    # ------------------------------------------------------------------ HTTP with retries
    async def _request(self, method: str, path: str, payload: Any = None) -> httpx.Response:
        """One request with the retry policy; returns any answer that is not retried (2xx or final 4xx)."""
        client, semaphore, _ = self._runtime()

        async def send() -> httpx.Response:
            async with semaphore:
                return await client.request(method, path, json=payload)

        policy = RetryPolicy(self.max_retries, self.backoff, self.max_backoff)
        try:
            return await async_send_with_retries(send, policy, method=method, url=f"{self.url}{path}")
        except RetriesExhaustedError as exc:
            raise RemoteScoringError(f"{exc}; is the server running? (raise max_retries/timeout for slow restarts)",
                                     status=exc.status) from None

    async def _post_json(self, path: str, payload: Any) -> Any:
        response = await self._request("POST", path, payload)
        if response.status_code >= 400:
            raise RemoteScoringError(
                f"POST {self.url}{path} was refused (HTTP {response.status_code}): {error_message(response)}",
                status=response.status_code)
        return response.json()

    # ------------------------------------------------------------------ server discovery and checks
    async def _ensure_info(self) -> ServerInfo:
        _, _, lock = self._runtime()
        async with lock:
            if self.info is None:
                self.info = await self._discover()
            return self.info

    async def _discover(self) -> ServerInfo:
        health: dict = {}
        response = await self._request("GET", "/health")
        if response.status_code == 401 or response.status_code == 403:
            raise RemoteScoringError(f"{self.url}/health refused us (HTTP {response.status_code})",
                                     status=response.status_code)
        try:
            body = response.json() if response.status_code == 200 and response.content else {}
            health = body if isinstance(body, dict) else {}
        except ValueError:
            health = {}
        protocol = self.protocol
        if protocol == "auto":
            protocol = "cmerl" if health.get("service") == "cmerl" else "openai"
        if protocol == "cmerl" and health.get("service") != "cmerl":
            raise RemoteScoringError(f"{self.url} is not a cmerl server (GET /health said {health!r}); "
                                     "use protocol='openai' for vLLM-compatible servers")
        if protocol == "openai" and self.tokenizer is None:
            raise ValueError("the openai protocol needs the verifier's tokenizer (tokenizer=NAME or object)")
        model, max_len, vocab = self.model, None, None
        if protocol == "cmerl":
            model = model or health.get("model")
            max_len, vocab = health.get("max_length"), health.get("vocab_size")
        else:
            model, max_len = await self._openai_model(model)
            if max_len is not None:
                max_len = int(max_len) - 1  # vLLM needs room for the one generated token
        info = ServerInfo(protocol, model, int(max_len) if max_len else None, int(vocab) if vocab else None,
                          health.get("logprob_floor"))
        if self.check_server and self.tokenizer is not None:
            await self._check_tokenizer(info)
        return info

    async def _openai_model(self, wanted: str | None) -> tuple[str | None, int | None]:
        response = await self._request("GET", "/v1/models")
        if response.status_code >= 400:
            return wanted, None
        data = response.json().get("data") or []
        ids = [m.get("id") for m in data if isinstance(m, dict)]
        if wanted is not None and ids and wanted not in ids:
            raise VerifierMismatchError(f"{self.url} serves {ids}, not model {wanted!r}")
        chosen = next((m for m in data if m.get("id") == wanted), data[0] if data else {})
        return chosen.get("id", wanted), chosen.get("max_model_len")

    async def _check_tokenizer(self, info: ServerInfo) -> None:
        local_vocab = len(self.tokenizer)
        if info.vocab_size is not None and local_vocab > info.vocab_size:
            raise VerifierMismatchError(
                f"server model {info.model!r} has a vocabulary of {info.vocab_size} tokens but the local tokenizer "
                f"{getattr(self.tokenizer, 'name_or_path', '?')!r} has {local_vocab}: they are different models")
        local = list(self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
        payload: dict[str, Any] = {"prompt": PROBE_TEXT, "add_special_tokens": False}
        if info.model and info.protocol == "openai":
            payload["model"] = info.model
        response = await self._request("POST", "/tokenize", payload)
        if response.status_code == 200:
            remote = response.json().get("tokens")
            if remote != local:
                raise VerifierMismatchError(
                    f"server model {info.model!r} tokenizes a probe differently from the local tokenizer "
                    f"{getattr(self.tokenizer, 'name_or_path', '?')!r} (server {remote[:12] if remote else remote}..., "
                    f"local {local[:12]}...): use the verifier's own tokenizer")
            return
        if info.protocol == "openai":  # no /tokenize: at least the largest local id must exist on the server
            probe = [local[0], local_vocab - 1]
            body = {"prompt": [probe], "max_tokens": 1, "prompt_logprobs": 1, "temperature": 1.0}
            if info.model:
                body["model"] = info.model
            answer = await self._request("POST", "/v1/completions", body)
            if answer.status_code >= 400:
                raise VerifierMismatchError(
                    f"server model {info.model!r} refused token id {local_vocab - 1} "
                    f"({error_message(answer)}): its vocabulary is smaller than the local tokenizer's")

    # ------------------------------------------------------------------ scoring
    async def _score_items(self, items: list[Any], entropy: bool, self_certainty: bool) -> list[ResponseScore]:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        info = await self._ensure_info()
        if info.protocol == "openai" and (entropy or self_certainty):
            raise ValueError("entropy and self-certainty need the full distribution, which the OpenAI/vLLM "
                             "protocol does not return; use a cmerl server (protocol='cmerl')")
        chunks = [items[i:i + self.chunk_size] for i in range(0, len(items), self.chunk_size)]
        if info.protocol == "openai":
            parts = await asyncio.gather(*(self._openai_chunk(c, info) for c in chunks))
        else:
            parts = await asyncio.gather(*(self._cmerl_chunk(c, entropy, self_certainty) for c in chunks))
        self.last_seconds = loop.time() - t0
        scores = [s for part in parts for s in part]
        tokenized = [k for k, it in enumerate(items) if isinstance(it, ScoreRequest)]
        attach_token_positions([scores[k] for k in tokenized], [items[k] for k in tokenized])
        return scores

    async def _cmerl_chunk(self, items: list[Any], entropy: bool, self_certainty: bool) -> list[ResponseScore]:
        wire = [{"input_ids": list(it.input_ids), "response_start": it.response_start}
                if isinstance(it, ScoreRequest) else it for it in items]
        payload = {"items": wire, "entropy": entropy, "self_certainty": self_certainty, "tokens": True,
                   "logprob_floor": self.logprob_floor, "empty_score": self.empty_score}
        if self.max_length is not None:
            payload["max_length"] = self.max_length
        if self._send_render and any(not isinstance(it, ScoreRequest) for it in items):
            payload["render"] = asdict(self.render_config)
        body = await self._post_json("/score", payload)
        scores = body.get("scores") if isinstance(body, dict) else None
        if not isinstance(scores, list) or len(scores) != len(items):
            raise RemoteScoringError(f"{self.url}/score answered {len(scores) if isinstance(scores, list) else scores!r}"
                                     f" scores for {len(items)} items")
        out = []
        for s in scores:
            out.append(response_score_from_token_logprobs(
                s["token_logprobs"], floor=self.logprob_floor, empty_score=self.empty_score,
                truncated=bool(s.get("truncated")), token_entropies=s.get("token_entropies"),
                token_self_certainty=s.get("token_self_certainty")))
            if isinstance(s.get("token_ids"), list):  # servers before 0.2 send neither
                out[-1].token_ids = [int(t) for t in s["token_ids"]]
            if isinstance(s.get("token_offsets"), list):
                out[-1].token_offsets = [(int(a), int(b)) for a, b in s["token_offsets"]]
        return out

    async def _openai_chunk(self, items: list[ScoreRequest], info: ServerInfo) -> list[ResponseScore]:
        limit = self.max_length or info.max_length
        prepared = []
        for i, r in enumerate(items):
            if r.response_start == 0 and r.input_ids:
                raise ValueError(f"request {i}: the first response token needs at least one context token")
            prepared.append(truncate_request(r, limit or max(1, len(r.input_ids))))
        todo = [i for i, p in enumerate(prepared) if len(p.ids) > p.start]
        raw: list[list[float]] = [[] for _ in prepared]
        if todo:
            payload: dict[str, Any] = {"prompt": [prepared[i].ids for i in todo], "max_tokens": 1,
                                       "prompt_logprobs": 1, "temperature": 1.0}
            if info.model:
                payload["model"] = info.model
            body = await self._post_json("/v1/completions", payload)
            choices = body.get("choices") if isinstance(body, dict) else None
            if not isinstance(choices, list) or len(choices) != len(todo):
                got = len(choices) if isinstance(choices, list) else repr(choices)
                raise RemoteScoringError(f"{self.url}/v1/completions answered {got} choices for {len(todo)} prompts")
            choices = sorted(choices, key=lambda c: c.get("index", 0))
            for k, (i, choice) in enumerate(zip(todo, choices)):
                raw[i] = read_prompt_logprobs(choice.get("prompt_logprobs"), prepared[i].ids, prepared[i].start, k)
        return [response_score_from_token_logprobs(lp, floor=self.logprob_floor, empty_score=self.empty_score,
                                                   truncated=p.truncated)
                for lp, p in zip(raw, prepared)]


def read_prompt_logprobs(prompt_logprobs: Any, ids: Sequence[int], start: int, index: int = 0) -> list[float]:
    """Log-probs of ``ids[start:]`` from one vLLM choice's ``prompt_logprobs``.

    ``prompt_logprobs[p]`` is ``None`` at position 0, else a dict ``{str(token_id): {"logprob", "rank",
    "decoded_token"}}`` holding the top-k and the actual prompt token (a bare float value is accepted too).
    """
    if not isinstance(prompt_logprobs, list) or len(prompt_logprobs) < len(ids):
        got = len(prompt_logprobs) if isinstance(prompt_logprobs, list) else type(prompt_logprobs).__name__
        raise RemoteScoringError(f"choice {index}: prompt_logprobs has {got} positions for a prompt of {len(ids)} "
                                 "tokens; does the server support prompt_logprobs?")
    out = []
    for pos in range(start, len(ids)):
        entry = prompt_logprobs[pos] or {}
        value = entry.get(str(ids[pos]))
        if value is None:
            raise RemoteScoringError(f"choice {index}: no log-prob for token {ids[pos]} at position {pos}")
        lp = value.get("logprob") if isinstance(value, dict) else value
        out.append(float("nan") if lp is None else float(lp))
    return out
