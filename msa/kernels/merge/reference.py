"""Pure-PyTorch reference of merging partial attention results by their log-sum-exp."""

from __future__ import annotations

import torch


def merge_attention_states_reference(
    outs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine R partial results ``outs [R, T, H, D]``, ``lses [R, T, H]`` (natural log) into one.
    A part whose lse is -inf weighs 0; if every part is -inf the result is zeros with lse -inf."""
    lse = torch.logsumexp(lses.float(), dim=0)
    safe = torch.where(torch.isneginf(lse), 0.0, lse)
    w = torch.exp(lses.float() - safe[None])  # exp(-inf) = 0 for empty parts
    # An empty part's rows may hold anything (NaN, inf): 0 * NaN would still be NaN.
    parts = outs.float().masked_fill(torch.isneginf(lses)[..., None], 0.0)
    out = (w[..., None] * parts).sum(0)
    return out.to(outs.dtype), lse
