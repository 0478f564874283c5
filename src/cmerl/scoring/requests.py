"""Request helpers shared by every scorer and the server (no torch): pair checks, rendering to
:class:`~cmerl.scoring.types.ScoreRequest`, fitting a request into a context limit, batch planning.

The local engine (:mod:`cmerl.scoring.local`), the HTTP client (:mod:`cmerl.scoring.remote`) and the
reward service (:mod:`cmerl.serving.app`) all use these, so a pair is rendered, truncated and batched by
the same rules whichever side scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cmerl.formatting import Prompt, RenderConfig, completion_text, render_pair
from cmerl.scoring.types import ScoreRequest


@dataclass
class PreparedRequest:
    """A request fitted into a context limit (:func:`truncate_request`): score ``ids[start:]``."""

    ids: list[int]
    start: int  # first response position inside ids
    truncated: bool


def check_pairs(prompts: Sequence, responses: Sequence) -> None:
    """Validate two parallel lists; raise naming the first bad item."""
    if isinstance(prompts, (str, bytes)) or isinstance(responses, (str, bytes)):
        raise TypeError("prompts and responses must be lists (got a single string)")
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses; they must pair up")


def render_request(tokenizer, config: RenderConfig, prompt: Prompt, response: str) -> ScoreRequest:
    """One pair rendered and tokenized (see :func:`cmerl.formatting.render_pair`)."""
    pair = render_pair(tokenizer, prompt, response, config)
    return ScoreRequest(pair.input_ids, pair.response_start, pair.response_offsets)


def render_requests(tokenizer, config: RenderConfig, prompts: Sequence[Prompt],
                    responses: Sequence) -> list[ScoreRequest]:
    """Parallel lists of prompts and responses (strings or TRL conversational completions) as requests;
    a bad item raises naming its index."""
    check_pairs(prompts, responses)
    out = []
    for i, (p, r) in enumerate(zip(prompts, responses)):
        try:
            out.append(render_request(tokenizer, config, p, completion_text(r)))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"item {i}: {exc}") from None
    return out


def truncate_request(req: ScoreRequest, max_length: int) -> PreparedRequest:
    """Fit a request into ``max_length`` tokens: drop prompt tokens from the left, keep the response;
    a response that does not fit on its own keeps one context token and its first ``max_length - 1`` tokens."""
    ids, start = req.input_ids, req.response_start
    if len(ids) <= max_length:
        return PreparedRequest(list(ids), start, False)
    n_resp = len(ids) - start
    if n_resp <= max_length - 1:
        cut = len(ids) - max_length
        return PreparedRequest(list(ids[cut:]), start - cut, True)
    keep_ctx = ids[start - 1:start] if start > 0 else []
    resp = ids[start:start + max_length - len(keep_ctx)]
    return PreparedRequest(list(keep_ctx) + list(resp), len(keep_ctx), True)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int = 256,
                 max_padding: float = 1.0) -> list[list[int]]:
    """Indices grouped into batches, longest first; each batch's rows x max length <= the budget
    (a single over-long row still forms its own batch), and a row joins a batch only while its padding
    stays within ``max_padding`` of the batch width (``length >= (1 - max_padding) * width``)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * width > max_batch_tokens or len(current) >= max_batch_size
                        or lengths[i] < (1.0 - max_padding) * width):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
