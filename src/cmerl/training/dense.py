"""``DenseGRPOTrainer``: TRL's GRPOTrainer with per-token (B, T) advantages from dense CME rewards.

Only the advantages change. TRL's loss is kept whole (importance ratio, clipping, KL with ``beta > 0``,
every ``loss_type``): ``GRPOTrainer._compute_loss`` accepts (B, T) advantages from a subclass. Generation,
the reward calls, gradient accumulation (the (B, T) tensor is shuffled and split with the rest of the
batch), LoRA, resume and vLLM are TRL's own code paths.

Per generation batch: TRL generates, calls the rewards (a dense reward, such as ``CrossModelEntropy(...,
dense=True)``, keeps its per-policy-token rewards from the same verifier pass as its scalar reward) and
computes its scalar advantages; this class then reads each dense reward's
:class:`~cmerl.token_rewards.TokenRewards`, checks row by row that they belong to the trainer's completion
ids (positions in the batch, verified by token ids; never looked up by decoded text), gathers them across
processes and replaces ``advantages`` with::

    A_it = A^dense_it + A^rest_i

``A^dense`` is the estimator (:mod:`cmerl.training.advantages`) on ``r_it = sum_k w_k r^k_it`` over the
dense rewards k (weights ``reward_weights``); ``A^rest`` is TRL's group-normalised advantage of the
weighted sum of the other, scalar rewards (0 when there are none or they do not vary, e.g. the repetition
guard when no completion is degenerate). With ``advantage_estimator="scalar"`` TRL's advantages are left
untouched (the dense rewards are still computed and logged).

Logged per step (``dense/...``): ``advantage_mean``, ``advantage_abs_mean`` and ``nonzero_frac`` over the
completion tokens in the loss, and ``alignment_misses`` (verifier tokens that overlapped no policy token).
"""

from __future__ import annotations

from typing import Any

import torch
from trl import GRPOTrainer

from cmerl.training.advantages import ESTIMATORS, combined_advantages
from cmerl.training.config import DENSE_LOSS_TYPES


def dense_source(reward: Any) -> Any:
    """The object inside a TRL reward callable (possibly wrapped, e.g. by cmerl's ``GuardedReward``) that
    computes per-token rewards (a non-None ``dense_tokenizer``), or None."""
    obj, depth = reward, 0
    while obj is not None and depth < 4:
        if getattr(obj, "dense_tokenizer", None) is not None:
            return obj
        obj, depth = getattr(obj, "reward", None), depth + 1
    return None


class DenseGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with dense advantages (see the module docstring); every GRPOTrainer argument
    plus ``advantage_estimator`` (one of :data:`cmerl.training.advantages.ESTIMATORS`)."""

    def __init__(self, *args: Any, advantage_estimator: str = "scalar", **kwargs: Any):
        if advantage_estimator not in ESTIMATORS:
            raise ValueError(f"unknown advantage_estimator {advantage_estimator!r}; use one of {', '.join(ESTIMATORS)}")
        self.advantage_estimator = advantage_estimator
        super().__init__(*args, **kwargs)
        self._dense_funcs = [k for k, fn in enumerate(self.reward_funcs) if dense_source(fn) is not None]
        if not self._dense_funcs:
            raise ValueError("DenseGRPOTrainer needs a reward that computes per-token rewards (the cme reward with "
                             f"dense=True); got {self.reward_func_names}")
        if advantage_estimator != "scalar" and self.multi_objective_aggregation != "sum_then_normalize":
            raise ValueError(f"dense advantage_estimator {advantage_estimator!r} combines rewards as "
                             "sum_then_normalize; multi_objective_aggregation="
                             f"{self.multi_objective_aggregation!r} is not supported with it")
        if advantage_estimator != "scalar" and self.loss_type not in DENSE_LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} uses sequence-level advantages; dense advantages work "
                             f"with {', '.join(DENSE_LOSS_TYPES)}")
        self._last_rewards_per_func: torch.Tensor | None = None

    # ------------------------------------------------------------------------------ TRL hooks
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        for k in self._dense_funcs:  # stale token rewards must never be read for a new batch
            dense_source(self.reward_funcs[k]).last_token_rewards = None
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group = self.num_generations if mode == "train" else self.num_generations_eval
        completion_ids, completion_mask = output["completion_ids"], output["completion_mask"]
        local = self._local_token_rewards(completion_ids)
        if self.advantage_estimator == "scalar":
            advantages = output["advantages"].unsqueeze(1).expand(completion_ids.shape)
        else:
            advantages = self._dense_advantages(local, len(completion_ids), completion_ids.shape[1], group)
            output["advantages"] = advantages
        self._log_dense(mode, advantages, completion_mask, local["misses"])
        return output

    # ------------------------------------------------------------------------------ dense pieces
    def _local_token_rewards(self, completion_ids: torch.Tensor) -> dict[str, Any]:
        """This process's (B, T) ``values``, ``shares`` and ``covered`` per dense reward, checked against
        the trainer's completion ids row by row, and the alignment misses."""
        b, t = completion_ids.shape
        device = completion_ids.device
        per_func: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        misses = 0
        ids_rows = completion_ids.tolist()
        lengths = [0] * b
        for k in self._dense_funcs:
            src = dense_source(self.reward_funcs[k])
            tr = src.last_token_rewards
            name = self.reward_func_names[k]
            if tr is None:
                raise RuntimeError(f"dense reward {name!r} computed no token rewards for this batch")
            if len(tr.completion_ids) != b:
                raise RuntimeError(f"dense reward {name!r} has token rewards for {len(tr.completion_ids)} "
                                   f"completions; the batch has {b}")
            values = torch.zeros(b, t)
            shares = torch.zeros(b, t)
            covered = torch.zeros(b, t, dtype=torch.bool)
            for i, ids in enumerate(tr.completion_ids):
                n = len(ids)
                if n > t or ids_rows[i][:n] != ids:
                    raise RuntimeError(f"dense reward {name!r}: the token rewards of row {i} belong to other "
                                       "completion ids than the trainer's (the reward saw a different batch)")
                values[i, :n] = torch.tensor(tr.values[i], dtype=torch.float32)
                shares[i, :n] = torch.tensor(tr.shares[i], dtype=torch.float32)
                covered[i, :n] = torch.tensor(tr.covered[i], dtype=torch.bool)
                lengths[i] = n
            per_func[k] = (values.to(device), shares.to(device), covered.to(device))
            misses += tr.misses
            src.last_token_rewards = None
        present = torch.arange(t, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]
        return {"per_func": per_func, "present": present, "misses": misses}

    def _gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B_local, T_local) of every process -> (B_global, T_max), zero-padded on the right."""
        x = self.accelerator.pad_across_processes(x, dim=1, pad_index=0)
        return self.accelerator.gather(x)

    def _dense_advantages(self, local: dict[str, Any], b: int, t: int, group: int) -> torch.Tensor:
        """This process's (B_local, T_local) advantages ``A^dense + A^rest`` (module docstring), computed on
        the whole gathered batch (groups may span processes)."""
        device = local["present"].device
        token_rewards = {k: (self._gather_rows(v), self._gather_rows(sh), self._gather_rows(cov.float()) > 0.5)
                         for k, (v, sh, cov) in local["per_func"].items()}
        present = self._gather_rows(local["present"].float()) > 0.5
        advantages = combined_advantages(
            self.advantage_estimator, token_rewards=token_rewards, present=present,
            rewards_per_func=self._last_rewards_per_func.to(device), weights=self.reward_weights.to(device),
            group_size=group, scale_rewards=self.scale_rewards)
        self._table_advantages(advantages, present)
        first = self.accelerator.process_index * b
        return advantages[first:first + b, :t].contiguous()

    def _table_advantages(self, advantages: torch.Tensor, present: torch.Tensor) -> None:
        """The completions table's ``advantage`` column: each row's mean dense advantage over its tokens
        (TRL wrote the scalar ones for these rows just before)."""
        logged = self._logs.get("advantages") if isinstance(self._logs, dict) else None
        n = advantages.shape[0]
        if logged is None or len(logged) < n:
            return
        means = ((advantages * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)).tolist()
        for j, value in enumerate(means):
            logged[len(logged) - n + j] = value

    def _log_dense(self, mode: str, advantages: torch.Tensor, mask: torch.Tensor, misses: int) -> None:
        m = mask.bool()
        vals = advantages[m].float()
        device = advantages.device
        stats = torch.stack([vals.sum(), vals.abs().sum(), (vals != 0).sum().float(), m.sum().float(),
                             torch.tensor(float(misses), device=device)])
        total = self.accelerator.gather(stats[None]).view(-1, 5).sum(dim=0).tolist()
        n = max(total[3], 1.0)
        metrics = self._metrics[mode]
        metrics["dense/advantage_mean"].append(total[0] / n)
        metrics["dense/advantage_abs_mean"].append(total[1] / n)
        metrics["dense/nonzero_frac"].append(total[2] / n)
        metrics["dense/alignment_misses"].append(total[4])
