"""Which scorer an adapter uses: a cmerl/vLLM server or a local verifier, from arguments or environment.

Resolution order (first match wins):

1. ``server_url`` argument, else ``$CMERL_SERVER_URL``: a :class:`~cmerl.scoring.remote.RemoteVerifier`.
   Its tokenizer comes from ``tokenizer`` / ``$CMERL_VERIFIER_TOKENIZER`` (a model name); without one the
   pairs are sent as text to a cmerl server, which renders them. ``$CMERL_PROTOCOL`` picks the protocol
   (``auto`` by default; ``openai`` for a plain ``vllm serve``, which needs the tokenizer).
2. ``verifier`` argument, else ``$CMERL_VERIFIER``: a local :class:`~cmerl.scoring.Verifier` loaded once per
   process (dtype from ``$CMERL_DTYPE``, default auto: bf16 where the hardware runs it natively, else fp32).

Scorers are cached per process by their settings, so per-sample reward calls reuse one client or model.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

from cmerl.formatting import RenderConfig
from cmerl.scoring.remote import RemoteVerifier
from cmerl.scoring.types import AsyncScorer, ResponseScore, Scorer

ENV_SERVER = "CMERL_SERVER_URL"
ENV_VERIFIER = "CMERL_VERIFIER"
ENV_TOKENIZER = "CMERL_VERIFIER_TOKENIZER"
ENV_PROTOCOL = "CMERL_PROTOCOL"
ENV_DTYPE = "CMERL_DTYPE"

_CACHE: dict[tuple, Scorer] = {}
_LOCK = threading.Lock()


def get_scorer(*, server_url: str | None = None, verifier: str | None = None, tokenizer: Any = None,
               protocol: str | None = None, render: RenderConfig | None = None, dtype: str | None = None) -> Scorer:
    """A cached :class:`~cmerl.scoring.types.Scorer` (remote ones are also an
    :class:`~cmerl.scoring.types.AsyncScorer`); see module docstring.

    ``render`` (default: :class:`RenderConfig`) is how pairs are rendered on this side."""
    render = render if render is not None else RenderConfig()
    url = server_url or os.environ.get(ENV_SERVER) or None
    if url:
        tok = tokenizer if tokenizer is not None else (os.environ.get(ENV_TOKENIZER) or None)
        proto = protocol or os.environ.get(ENV_PROTOCOL) or "auto"
        key = ("remote", url, tok if isinstance(tok, (str, type(None))) else id(tok), proto, render)
        with _LOCK:
            if key not in _CACHE:
                _CACHE[key] = RemoteVerifier(url, tok, protocol=proto, render=render)
            return _CACHE[key]
    name = verifier or os.environ.get(ENV_VERIFIER) or None
    if name:
        dt = dtype or os.environ.get(ENV_DTYPE) or "auto"
        key = ("local", name, dt, render)
        with _LOCK:
            if key not in _CACHE:
                # deferred: torch, via cmerl.scoring.Verifier (torch-free CLI start)
                from cmerl.scoring import Verifier

                _CACHE[key] = Verifier.from_pretrained(name, dtype=dt, render=render)
            return _CACHE[key]
    raise ValueError(f"no verifier configured: set {ENV_SERVER} (a cmerl or vLLM server) or {ENV_VERIFIER} "
                     "(a model name to load in this process), or pass server_url= / verifier=")


async def ascore(scorer: Scorer, prompts: Sequence[Any], responses: Sequence[Any], *, entropy: bool = False,
                 self_certainty: bool = False) -> list[ResponseScore]:
    """``scorer.ascore`` when it is an :class:`AsyncScorer` (remote verifiers), else ``scorer.score`` in a
    worker thread."""
    if isinstance(scorer, AsyncScorer):
        return await scorer.ascore(list(prompts), list(responses), entropy=entropy, self_certainty=self_certainty)
    return await asyncio.to_thread(scorer.score, list(prompts), list(responses), entropy=entropy,
                                   self_certainty=self_certainty)


def clear_cache() -> None:
    """Forget cached scorers (closing remote clients)."""
    with _LOCK:
        scorers = list(_CACHE.values())
        _CACHE.clear()
    for s in scorers:
        close = getattr(s, "close", None)
        if close is not None:
            close()
