"""CME as a verl custom reward function, without importing verl.

verl calls ``compute_score(data_source, solution_str, ground_truth, extra_info, **kwargs)`` once per
response (``solution_str`` is the decoded response) and accepts a float or a dict holding ``"score"``;
every key of the dict is logged as reward extra info. verl does not pass the prompt, so it must travel in
``extra_info["prompt"]``: :func:`prepare_dataset` adds it (and the ``reward_model.ground_truth`` key that
verl requires, empty for label-free training) to a verl parquet file.

Point verl at this module's file, or at ``examples/verl/cme_reward.py``::

    reward.custom_reward_function.path=examples/verl/cme_reward.py
    reward.custom_reward_function.name=compute_score          # or compute_score_async

The scorer comes from :func:`cmerl.integrations.common.get_scorer` (``$CMERL_SERVER_URL`` or
``$CMERL_VERIFIER``; keyword arguments from ``reward.custom_reward_function.reward_kwargs`` win). When
verl runs its own reward-model servers (``reward.reward_model.enable=True`` with the verifier as
``model_path``) and neither is set, the score is read from them over the vLLM protocol, using the
``reward_router_address`` and ``reward_model_tokenizer`` verl passes in.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cmerl.integrations.common import ENV_SERVER, ENV_VERIFIER, ascore, get_scorer
from cmerl.io import write_atomic
from cmerl.scoring.remote import RemoteVerifier
from cmerl.scoring.types import ResponseScore, Scorer

_ROUTER_SCORERS: dict[tuple, Scorer] = {}


def _plain(value: Any) -> Any:
    """Parquet/numpy values as plain Python (arrays -> lists, nested)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def prompt_from_extra_info(extra_info: Mapping | None, key: str = "prompt") -> Any:
    """The prompt stored in ``extra_info[key]``: a string or a chat message list."""
    if not isinstance(extra_info, Mapping) or extra_info.get(key) is None:
        raise ValueError(f"extra_info has no {key!r}: verl does not pass prompts to reward functions; add them "
                         "with cmerl.integrations.verl.prepare_dataset(src.parquet, dst.parquet)")
    prompt = _plain(extra_info[key])
    if isinstance(prompt, list):
        prompt = [{"role": m["role"], "content": m["content"]} for m in prompt]
    return prompt


def _scorer(kwargs: dict[str, Any]) -> Scorer:
    server_url, verifier = kwargs.get("server_url"), kwargs.get("verifier")
    router = kwargs.get("reward_router_address")
    if not (server_url or verifier or os.environ.get(ENV_SERVER) or os.environ.get(ENV_VERIFIER)) and router:
        tok = kwargs.get("reward_model_tokenizer")
        key = (router, id(tok))
        if key not in _ROUTER_SCORERS:
            _ROUTER_SCORERS[key] = RemoteVerifier(f"http://{router}", tok, protocol="openai")
        return _ROUTER_SCORERS[key]
    return get_scorer(server_url=server_url, verifier=verifier, tokenizer=kwargs.get("tokenizer"),
                      protocol=kwargs.get("protocol"))


def _result(score: ResponseScore, signal: str) -> dict[str, float]:
    return {"score": float(score.signal(signal)), "cme_mean_logprob": float(score.mean_logprob),
            "cme_response_tokens": float(score.n_tokens), "cme_truncated": float(score.truncated)}


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Mapping | None = None,
                  **kwargs: Any) -> dict[str, float]:
    """verl reward: CME of ``solution_str`` given ``extra_info["prompt"]``.

    Keyword arguments (all optional): ``server_url``, ``verifier``, ``tokenizer``, ``protocol`` (scorer,
    see :func:`get_scorer`), ``signal`` (``mean_logprob`` default, ``sum_logprob``, ``neg_entropy``),
    ``prompt_key`` (default ``prompt``). Returns ``{"score", "cme_mean_logprob", "cme_response_tokens",
    "cme_truncated"}``. ``data_source`` and ``ground_truth`` are not used (label-free).
    """
    prompt = prompt_from_extra_info(extra_info, kwargs.get("prompt_key", "prompt"))
    signal = kwargs.get("signal", "mean_logprob")
    scorer = _scorer(kwargs)
    score = scorer.score([prompt], [solution_str], entropy=signal == "neg_entropy")[0]
    return _result(score, signal)


async def compute_score_async(data_source: str, solution_str: str, ground_truth: Any,
                              extra_info: Mapping | None = None, **kwargs: Any) -> dict[str, float]:
    """Async :func:`compute_score` (verl awaits async reward functions; remote calls then overlap)."""
    prompt = prompt_from_extra_info(extra_info, kwargs.get("prompt_key", "prompt"))
    signal = kwargs.get("signal", "mean_logprob")
    scorer = _scorer(kwargs)
    score = (await ascore(scorer, [prompt], [solution_str], entropy=signal == "neg_entropy"))[0]
    return _result(score, signal)


def prepare_dataset(src: str | Path, dst: str | Path, *, prompt_column: str = "prompt",
                    prompt_key: str = "prompt", data_source: str = "cmerl") -> int:
    """Copy a verl parquet file adding what a label-free CME run needs; returns the number of rows.

    * ``extra_info[prompt_key]`` = the row's ``prompt_column`` (verl's chat messages, or a string);
    * ``reward_model`` = ``{"style": "model", "ground_truth": ""}`` where missing (existing values kept);
    * ``data_source`` = ``data_source`` where the column is missing.

    ``dst`` is written atomically (a temporary file renamed into place); ``src`` is never modified.
    """
    import pandas as pd  # deferred: pandas (slow import, fast CLI start)

    df = pd.read_parquet(src)
    if prompt_column not in df.columns:
        raise ValueError(f"{src}: no column {prompt_column!r} (columns: {', '.join(map(str, df.columns))}); "
                         "pass prompt_column=")
    n = len(df)
    extra = [_plain(x) if isinstance(_plain(x), dict) else {} for x in df["extra_info"]] \
        if "extra_info" in df.columns else [{} for _ in range(n)]
    for e, p in zip(extra, df[prompt_column]):
        e[prompt_key] = _plain(p)
    reward = []
    for x in (df["reward_model"] if "reward_model" in df.columns else [None] * n):
        rm = _plain(x) if isinstance(_plain(x), dict) else {}
        rm.setdefault("style", "model")
        if rm.get("ground_truth") is None:
            rm["ground_truth"] = ""
        reward.append(rm)
    df = df.copy()
    df["extra_info"] = extra
    df["reward_model"] = reward
    if "data_source" not in df.columns:
        df["data_source"] = data_source
    write_atomic(dst, lambda f: df.to_parquet(f, index=False), text=False)
    return n
