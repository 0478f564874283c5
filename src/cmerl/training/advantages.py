"""Advantage estimators for dense (token-level) rewards, chosen by name (``advantage_estimator``).

Inputs are per group of G completions of one prompt (rows ``i``), per completion token ``t``:
``r_it`` the per-token reward, ``rho_it = r_it / N_i`` its share of the scalar reward (rows sum to the
scalar reward ``R_i``; see :mod:`cmerl.token_rewards`), and a mask of the tokens an estimator may use.
Statistics at a position ``t`` are taken over the group's completions that have a usable token at ``t``
(``m_it = 1``, ``n_t = sum_i m_it``); the std is Bessel-corrected, as TRL's, and ``eps = 1e-4``, as TRL's.

* ``scalar`` (default): TRL's GRPO advantage of the scalar rewards, the same for every token of a
  completion: ``A_it = A_i``. Identical to a run without dense rewards.
* ``position_mean``: ``A_it = r_it - mean_t``, ``mean_t = (1/n_t) sum_i m_it r_it``.
* ``position_std``: ``A_it = (r_it - mean_t) / (std_t + eps)``.
  Both use ``m_it`` = token ``t`` received verifier weight (a policy EOS without a verifier end-of-turn,
  or empty byte pieces, are left out rather than given a fake reward of 0).
* ``return_to_go``: ``G_it = sum_{s >= t} rho_is`` (so ``G_i0 = R_i``), then
  ``A_it = (G_it - mean_t(G)) / (std_t(G) + eps)`` over the completions that still have a token at ``t``
  (``scale_rewards: none`` drops the division). At ``t = 0`` this is exactly the scalar GRPO advantage.

A position where fewer than two completions have a usable token gets ``A_it = 0`` (no baseline exists).
Rows whose dense reward does not apply (the repetition guard's degenerate completions: the reward
returned None) have ``m_it = 0`` everywhere, so their dense advantage is 0.
"""

from __future__ import annotations

import torch

ESTIMATORS = ("scalar", "position_std", "position_mean", "return_to_go")
EPS = 1e-4


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    b, t = x.shape
    if b % group_size:
        raise ValueError(f"{b} completions do not form groups of {group_size}")
    return x.view(b // group_size, group_size, t)


def position_normalized(values: torch.Tensor, mask: torch.Tensor, group_size: int, *, scale: bool,
                        eps: float = EPS) -> torch.Tensor:
    """``(r_it - mean_t) [/ (std_t + eps)]`` per group and position over the masked entries; 0 elsewhere.

    values, mask: (B, T), B a multiple of ``group_size`` with each group's rows contiguous (TRL's layout).
    """
    v = _grouped(values.float(), group_size)
    m = _grouped(mask.bool(), group_size).float()
    n = m.sum(dim=1, keepdim=True)
    mean = (v * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
    centred = (v - mean) * m
    out = centred
    if scale:
        var = (centred ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)
        out = centred / (var.sqrt() + eps)
    out = torch.where(n >= 2, out, torch.zeros_like(out)) * m
    return out.view_as(values)


def reward_to_go(shares: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``G_it = sum_{s >= t} m_is rho_is`` within each row: (B, T) -> (B, T)."""
    x = shares.float() * mask.float()
    return x.flip(-1).cumsum(-1).flip(-1)


def dense_advantages(estimator: str, *, values: torch.Tensor, shares: torch.Tensor, covered: torch.Tensor,
                     present: torch.Tensor, group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """(B, T) advantages of a non-scalar estimator (formulas in the module docstring).

    values / shares: (B, T) ``r`` and ``rho`` (0 past a row's end); covered: (B, T) tokens that received
    verifier weight; present: (B, T) the row's real tokens (its reward applies; padding excluded).
    """
    if estimator == "position_std":
        return position_normalized(values, covered & present, group_size, scale=True)
    if estimator == "position_mean":
        return position_normalized(values, covered & present, group_size, scale=False)
    if estimator == "return_to_go":
        returns = reward_to_go(shares, present)
        return position_normalized(returns, present, group_size, scale=scale_rewards != "none")
    if estimator == "scalar":
        raise ValueError("the scalar estimator uses TRL's own advantages; no dense computation")
    raise ValueError(f"unknown advantage estimator {estimator!r}; use one of {', '.join(ESTIMATORS)}")


def combined_advantages(estimator: str, *, token_rewards: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                        present: torch.Tensor, rewards_per_func: torch.Tensor, weights: torch.Tensor,
                        group_size: int, scale_rewards: str = "group") -> torch.Tensor:
    """(B, T) ``A^dense + A^rest`` of a batch (``cmerl.training.dense``): the estimator on the weighted sum
    of the dense rewards, plus TRL's group advantage of the weighted sum of the other (scalar) rewards.

    token_rewards: reward column k -> ``(values, shares, covered)``, each (B, T), for the dense rewards.
    present: (B, T) real completion tokens. rewards_per_func: (B, K) TRL's scalar rewards, NaN where a
        reward does not apply (then its tokens count for nothing; a row where no dense reward applies has
        a dense advantage of 0). weights: (K,) ``reward_weights``.
    """
    b, t = present.shape
    values = torch.zeros(b, t, device=present.device)
    shares = torch.zeros(b, t, device=present.device)
    covered = torch.zeros(b, t, dtype=torch.bool, device=present.device)
    applies_any = torch.zeros(b, dtype=torch.bool, device=present.device)
    for k, (v, sh, cov) in token_rewards.items():
        applies = ~torch.isnan(rewards_per_func[:, k])
        values += weights[k] * v * applies[:, None]
        shares += weights[k] * sh * applies[:, None]
        covered |= cov.bool() & applies[:, None]
        applies_any |= applies
    usable = present.bool() & applies_any[:, None]
    advantages = dense_advantages(estimator, values=values, shares=shares, covered=covered, present=usable,
                                  group_size=group_size, scale_rewards=scale_rewards)
    rest = [k for k in range(rewards_per_func.shape[1]) if k not in token_rewards]
    if rest:
        cols = rewards_per_func[:, rest]
        combined = (cols * weights[rest]).nansum(dim=1)
        combined[torch.isnan(cols).all(dim=1)] = torch.nan
        advantages = advantages + scalar_advantages(combined, group_size, scale_rewards)[:, None]
    return advantages


def scalar_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str = "group",
                      eps: float = EPS) -> torch.Tensor:
    """TRL's ``sum_then_normalize`` GRPO advantage of (B,) rewards (NaN = does not apply: excluded from the
    baseline, advantage 0): ``(R_i - mean_group) / (std + eps)`` with ``scale_rewards`` group / batch, or
    only centred for ``none``."""
    r = rewards.float()
    grouped = r.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    out = r - mean
    if scale_rewards != "none":
        if scale_rewards == "batch":
            std = _nanstd(r).expand_as(r)
        else:
            std = _nanstd(grouped, dim=1).repeat_interleave(group_size) if group_size > 1 else torch.zeros_like(r)
        out = out / (std + eps)
    return torch.nan_to_num(out, nan=0.0)


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std ignoring NaNs (NaN with fewer than two values), as TRL's ``nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std.squeeze(dim) if dim is not None else std.reshape(())
