"""Building blocks of the MiniMax-M3 backbone: norms, rotary embedding, SwiGLU-OAI MLPs and the MoE.

Head and expert counts are read off the weights at run time, so a tensor-parallel engine can slice
the projections from outside without touching this file.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from msa.platform.config import ModelConfig


class GemmaRMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * (1 + w), computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, rotary_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, rotary_dim // 2]`` fp32 for integer positions ``[T]``. Angles are formed in
    fp64: at a million positions fp32 would lose a good part of a radian."""
    inv_freq = theta ** (
        -torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=positions.device) / rotary_dim
    )
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half on the first ``2 * cos.shape[-1]`` dims of each head of ``x [T, heads, D]``;
    the remaining dims pass through."""
    half = cos.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1).to(x.dtype)


def swiglu_oai(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """g = min(gate, limit); u = clamp(up, -limit, limit); g * sigmoid(alpha * g) * (u + 1)."""
    g = gate.clamp(max=limit)
    u = up.clamp(-limit, limit)
    return g * torch.sigmoid(alpha * g) * (u + 1)


class GatedMLP(nn.Module):
    """Dense MLP and shared expert: down(swiglu_oai(gate(x), up(x)))."""

    def __init__(self, config: ModelConfig, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, config.hidden_size, bias=False)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu_oai(self.gate_proj(x), self.up_proj(x), self.alpha, self.limit))


class Expert(nn.Module):
    """A routed expert, with the checkpoint's w1 (gate), w3 (up), w2 (down) names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.moe_intermediate_size, bias=False)
        self.w2 = nn.Linear(config.moe_intermediate_size, config.hidden_size, bias=False)
        self.alpha, self.limit = config.swiglu_alpha, config.swiglu_limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu_oai(self.w1(x), self.w3(x), self.alpha, self.limit))


class Router(nn.Module):
    """fp32 sigmoid router. The correction bias only chooses the experts; the weights are the
    unbiased scores of the chosen ones, renormalised to 1 and scaled by routed_scaling_factor."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(
            torch.zeros(config.num_local_experts, config.hidden_size, dtype=torch.float32)
        )
        self.top_k = config.num_experts_per_tok
        self.scaling = config.routed_scaling_factor

    def forward(self, x: torch.Tensor, correction_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x ``[T, hidden]`` -> (expert ids ``[T, top_k]`` int64, weights ``[T, top_k]`` fp32)."""
        scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        chosen = torch.topk(scores + correction_bias.float(), self.top_k, dim=-1).indices
        weights = scores.gather(-1, chosen)
        weights = weights / weights.sum(-1, keepdim=True) * self.scaling
        return chosen, weights


class SparseMoE(nn.Module):
    """sum_i w_i E_i(x) + Shared(x). ``experts`` may hold a subset of all experts (expert
    parallelism): ``expert_offset`` is the global id of ``experts[0]``; tokens routed to experts held
    elsewhere contribute nothing here and are summed in by the engine's all-reduce."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Router(config)
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(config.num_local_experts, dtype=torch.float32), requires_grad=False
        )
        self.experts = nn.ModuleList(Expert(config) for _ in range(config.num_local_experts))
        self.shared_experts = (
            GatedMLP(config, config.shared_intermediate_size) if config.shared_intermediate_size > 0 else None
        )
        self.expert_offset = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen, weights = self.gate(x, self.e_score_correction_bias)
        out = torch.zeros_like(x, dtype=torch.float32)
        for local, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == local + self.expert_offset, as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(x[token]).float() * weights[token, slot, None]
            out = out.index_add(0, token, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return out.to(x.dtype)
