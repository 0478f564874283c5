"""OpenRLHF ``reward_func`` file: pass this file's path as ``--reward.remote_url``.

    --reward.remote_url $(python -c "import cmerl.integrations.openrlhf_reward_func as m; print(m.__file__)")

OpenRLHF imports ``reward_func`` from the file and calls it (in a worker thread of its vLLM-engine actor)
with ``queries`` (prompt + response as decoded by the actor), ``prompts`` and ``labels``. The verifier is
configured by environment variables, which OpenRLHF's Ray job must carry (``--runtime-env-json``):

* ``CMERL_SERVER_URL`` (a ``cmerl serve`` or vLLM server; recommended, the actor's GPUs stay free) or
  ``CMERL_VERIFIER`` (a model name loaded inside each engine actor);
* ``CMERL_VERIFIER_TOKENIZER``: render locally with this tokenizer (needed for a vLLM server);
* ``CMERL_PROMPT_MODE``: ``chat`` (default), ``label`` or ``verbatim`` (see :mod:`cmerl.integrations.openrlhf`);
* ``CMERL_STOP_STRINGS``: comma-separated stop strings to strip from responses (default: common EOS strings).

Returns ``{"rewards": Tensor, "scores": Tensor, "extra_logs": {name: Tensor}}`` as OpenRLHF expects.
"""

from __future__ import annotations

import os
from typing import Any

from cmerl.formatting import RenderConfig
from cmerl.integrations.common import get_scorer
from cmerl.integrations.openrlhf import DEFAULT_STOP_STRINGS, render_config_for, score_queries


def reward_func(queries: list[str], prompts: list[str], labels: list[Any] | None = None, **kwargs: Any) -> dict:
    import torch  # deferred: torch (torch-free CLI start)

    mode = os.environ.get("CMERL_PROMPT_MODE", "chat")
    stops = os.environ.get("CMERL_STOP_STRINGS")
    stop_strings = tuple(s for s in stops.split(",") if s) if stops else DEFAULT_STOP_STRINGS
    scorer = get_scorer(render=render_config_for(mode, RenderConfig()))
    payload = score_queries(scorer, queries, prompts, labels, prompt_mode=mode, stop_strings=stop_strings)
    return {"rewards": torch.tensor(payload["rewards"], dtype=torch.float32),
            "scores": torch.tensor(payload["scores"], dtype=torch.float32),
            "extra_logs": {k: torch.tensor(v, dtype=torch.float32) for k, v in payload["extra_logs"].items()}}
