"""Plain float64 references for the scoring engine and the rewards (used by the core tests)."""

from __future__ import annotations

import math

import torch


def reference(model, ids: list[int], start: int) -> dict[str, torch.Tensor]:
    """One sequence through ``model(ids).logits``, full log-softmax in float64, at the positions that
    predict ``ids[start:]``: ``logprobs`` (n,), ``entropy`` (n,) nats, ``self_certainty`` (n,) =
    KL(uniform || p), and ``logp`` (n, vocab)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)[start - 1:len(ids) - 1]
    target = torch.tensor(ids[start:])
    p = logp.exp()
    return {
        "logprobs": logp.gather(-1, target[:, None]).squeeze(-1),
        "entropy": -(p * logp).sum(-1),
        "self_certainty": (-logp - math.log(logp.shape[-1])).mean(-1),
        "logp": logp,
    }
