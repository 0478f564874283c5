"""CME as an *async* TRL reward function, so TRL overlaps verifier calls with its other reward functions.

TRL (>= 0.27) treats a reward callable as async when ``inspect.iscoroutinefunction(f.__call__)`` and runs
all async reward functions concurrently with ``asyncio.gather`` on its own event-loop thread. The plain
:class:`cmerl.rewards.CrossModelEntropy` already works with a :class:`~cmerl.scoring.remote.RemoteVerifier`
(it only needs ``score`` and ``name``); :class:`AsyncCrossModelEntropy` is the same reward with an
``async __call__`` that awaits ``ascore`` of remote verifiers (local ones run in a worker thread).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Any

from cmerl.integrations.common import ascore
from cmerl.rewards import CrossModelEntropy


class AsyncCrossModelEntropy(CrossModelEntropy):
    """:class:`~cmerl.rewards.CrossModelEntropy` with an ``async __call__`` (same arguments, same rewards,
    same ``log_metric`` figures)."""

    async def __call__(self, prompts: Sequence, completions: Sequence,  # type: ignore[override]
                       completion_ids: Sequence | None = None,
                       log_metric: Callable[[str, float], None] | None = None, **kwargs: Any) -> list[float]:
        t0 = time.perf_counter()
        need_entropy = self.signal == "neg_entropy"
        per_scorer = list(await asyncio.gather(*(ascore(s, prompts, completions, entropy=need_entropy)
                                                 for s in self.scorers)))
        return self.rewards_from_scores(per_scorer, t0, log_metric)
