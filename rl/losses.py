"""GRPO losses: group-normalised advantages, clip-higher PPO, truncated importance weights, KL, aggregation.

Three log-probabilities meet in the loss, per completion token t:
- `behaviour` (mu): what the rollout engine sampled with (possibly K versions old, and a different numerical path);
- `old` (pi_old): the trainer's log-probability under the weights at the start of this step (no gradient);
- `logp` (pi_theta): the trainer's current log-probability (with gradient).

    r_t   = exp(logp - old)                            PPO ratio, clipped to [1 - clip_low, 1 + clip_high]
    w_t   = min(exp(old - behaviour), tis_cap)         truncated importance weight (no gradient)
    loss_t = -w_t * min(r_t * A, clip(r_t) * A) + kl_coef * KL_t(logp, ref)

`w_t` corrects for staleness and for engine/trainer mismatch (the decoupled objective of AReaL / the truncated IS
of "Your efficient RL framework secretly brings you off-policy RL training"); it is truncated, never unbounded.
With one optimizer update per batch `old == logp.detach()`, so r_t = 1 at the update and only w_t acts.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from latentforge.rl.config import AGGREGATIONS, KL_ESTIMATORS, PolicyLossConfig  # noqa: F401 - re-exported


def group_advantages(rewards: torch.Tensor, normalize_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(groups, G) rewards -> (groups, G) advantages `r - mean_group` (divided by the group std when asked).

    The std is the unbiased one (Bessel), as TRL and verl use; `normalize_std=False` is Dr.GRPO's choice (no
    difficulty re-weighting). A group whose rewards are all equal gets advantage 0 whatever the normalisation.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (groups, G) with G >= 2 samples per group, got shape {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalize_std:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman's k1 / k2 / k3)."""
    log_ratio = logp - ref_logp  # log pi / pi_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        # exp(-x) - 1 + x >= 0; the log-ratio is clamped so one wild token cannot overflow
        neg = (-log_ratio).clamp(-20.0, 20.0)
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def truncated_importance_weights(old_logp: torch.Tensor, behaviour_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """`min(pi_old / mu, cap)` per token, without gradient."""
    if cap <= 0:
        raise ValueError(f"tis_cap must be positive (the largest importance weight kept), got {cap}")
    log_w = (old_logp - behaviour_logp).detach().clamp(max=math.log(cap))
    return torch.exp(log_w)


def per_token_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    behaviour_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logp: Optional[torch.Tensor] = None,
):
    """Per-token loss (same shape as `logp`, zero where `mask` is 0) and statistics (sums over masked tokens).

    `advantages` is per token (a sequence's advantage broadcast over its tokens). Statistics are sums so that
    micro-batches and ranks add up; divide by `tokens` for means.
    """
    mask = mask.to(logp.dtype)
    ratio = torch.exp((logp - old_logp.detach()).clamp(-20.0, 20.0))
    clipped_ratio = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    surrogate = torch.minimum(ratio * advantages, clipped_ratio * advantages)
    weight = truncated_importance_weights(old_logp, behaviour_logp, cfg.tis_cap)
    loss = -weight * surrogate
    kl = None
    if cfg.kl_coef > 0:
        if ref_logp is None:
            raise ValueError("loss.kl_coef > 0 needs the reference log-probabilities (ref_logp)")
        kl = kl_penalty(logp, ref_logp.detach(), cfg.kl_estimator)
        loss = loss + cfg.kl_coef * kl
    loss = loss * mask

    with torch.no_grad():
        # a token is "clipped" when the clipped branch is the active (smaller) one, so its gradient is zero
        ppo_clipped = ((ratio * advantages) > (clipped_ratio * advantages)) & (mask > 0)
        raw_weight = torch.exp(old_logp - behaviour_logp)
        stats = {
            "tokens": mask.sum(),
            "ppo_clipped": ppo_clipped.float().sum(),
            "tis_truncated": ((raw_weight > cfg.tis_cap).float() * mask).sum(),
            "tis_weight_sum": (weight * mask).sum(),
            "tis_weight_max": (raw_weight * mask).max() if mask.numel() else torch.zeros(()),
            "ratio_sum": (ratio.detach() * mask).sum(),
            "abs_log_mismatch_sum": ((old_logp - behaviour_logp).abs() * mask).sum(),
        }
        if kl is not None:
            stats["kl_sum"] = (kl.detach() * mask).sum()
    return loss, stats


def aggregate(
    per_token_loss: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str,
    *,
    num_tokens: float,
    num_sequences: float,
    max_tokens: Optional[int] = None,
) -> torch.Tensor:
    """Sum of this micro-batch's share of the global loss: adding the results of every micro-batch on every rank
    gives the loss of the whole batch. `num_tokens` / `num_sequences` are the global counts (all micro-batches,
    all ranks) of loss tokens and of sequences that have any loss token.

    token:    sum_all l_t / num_tokens                            (DAPO: long answers weigh more)
    sequence: sum_seq (sum_t l_t / len_seq) / num_sequences       (the original GRPO)
    constant: sum_all l_t / (num_sequences * max_tokens)          (Dr.GRPO: no length bias)
    """
    if aggregation == "token":
        return per_token_loss.sum() / max(num_tokens, 1.0)
    if aggregation == "sequence":
        lengths = mask.to(per_token_loss.dtype).sum(dim=-1).clamp(min=1.0)
        return (per_token_loss.sum(dim=-1) / lengths).sum() / max(num_sequences, 1.0)
    if aggregation == "constant":
        if not max_tokens:
            raise ValueError("aggregation 'constant' needs max_tokens (the rollout's max_new_tokens)")
        return per_token_loss.sum() / (max(num_sequences, 1.0) * max_tokens)
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
