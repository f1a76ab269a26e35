"""Advantages and losses of the policy-gradient algorithms.

GRPO: each prompt's G episodes are a group; advantage = (r - mean_group) / (std_group + eps)
(std division optional), the same for every generated token of an episode. REINFORCE++:
advantage = (r - mean_batch) / (std_batch + eps) over the whole batch, no groups, no critic.
Both train with the clipped ratio of PPO against the rollout's log-probabilities and, when
``kl_coef > 0``, the k3 estimate of KL(policy || reference) per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-6


def grpo_advantages(rewards: torch.Tensor, *, normalize_std: bool = True) -> torch.Tensor:
    """rewards ``[num_groups, G]`` fp32 -> advantages ``[num_groups, G]`` in the rewards' dtype. Std
    is the unbiased sample std of the group; a group of equal rewards gets zero advantages. The
    statistics are taken in float64, and equal groups are zeroed outright: their fp32 mean can sit a
    rounding step off the rewards, which dividing by std ~ 0 would blow up."""
    r = rewards.double()
    centered = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        centered = centered / (r.std(dim=1, keepdim=True) + EPS)
    equal = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return centered.masked_fill(equal, 0.0).to(rewards.dtype)


def reinforce_pp_advantages(rewards: torch.Tensor, *, normalize_std: bool = True) -> torch.Tensor:
    """rewards of any shape -> advantages whitened over the whole batch (REINFORCE++), taken in
    float64; a batch of equal rewards gets zero advantages."""
    r = rewards.double()
    if r.numel() == 0 or r.amax() == r.amin():
        return torch.zeros_like(rewards)
    centered = r - r.mean()
    if normalize_std:
        centered = centered / (r.std() + EPS)
    return centered.to(rewards.dtype)


def compute_advantages(name: str, rewards: torch.Tensor, *, normalize_std: bool = True) -> torch.Tensor:
    if name == "grpo":
        return grpo_advantages(rewards, normalize_std=normalize_std)
    if name == "reinforce_pp":
        return reinforce_pp_advantages(rewards, normalize_std=normalize_std)
    raise ValueError(f"unknown algorithm {name!r}; choose 'grpo' or 'reinforce_pp'")


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref) from samples of pi: exp(d) - d - 1, d = ref - pi.
    Non-negative and unbiased; elementwise on any shape."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


@dataclass(frozen=True, slots=True)
class LossTerms:
    """Sums over the masked tokens (divide by the token count of the global batch to average)."""

    loss: torch.Tensor
    pg: torch.Tensor
    kl: torch.Tensor
    clipped: torch.Tensor
    ratio: torch.Tensor


def policy_loss_sums(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    kl_coef: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
) -> LossTerms:
    """Clipped-ratio policy gradient (+ k3 KL) summed over tokens where ``mask`` is 1.

    All inputs ``[N]`` fp32 over the same tokens: current and rollout log-probabilities of the
    sampled tokens, per-token advantages, and the 0/1 loss mask. Per token:
    pg = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A), ratio = exp(lp - old).
    """
    mask = mask.to(logprobs.dtype)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * advantages
    pg = -torch.minimum(unclipped, clipped)
    kl = torch.zeros_like(pg)
    if kl_coef > 0.0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl = kl_k3(logprobs, ref_logprobs)
    per_token = pg + kl_coef * kl
    was_clipped = (clipped < unclipped).to(mask.dtype)
    return LossTerms(
        loss=(per_token * mask).sum(),
        pg=(pg * mask).sum().detach(),
        kl=(kl * mask).sum().detach(),
        clipped=(was_clipped * mask).sum().detach(),
        ratio=(ratio * mask).sum().detach(),
    )
