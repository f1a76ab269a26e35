"""Building blocks of the MiniMax-M3 backbone: norms, rotary embedding, SwiGLU-OAI MLPs and the MoE.

Head and expert counts are read off the weights at run time, so a tensor-parallel engine can slice
the projections from outside without touching this file.
"""

from __future__ import annotations

import functools

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
        # torch's rms_norm is one fused kernel on GPUs (the formula unrolled is five launches).
        scale = self.weight.float() + 1.0
        return F.rms_norm(x.float(), (x.shape[-1],), scale, self.eps).to(x.dtype)


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


@functools.lru_cache(maxsize=16)
def _grouped_mm_device(device_type: str, index: int | None) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda":
        return torch.cuda.get_device_capability(index) >= (9, 0)
    return device_type == "cpu"


def grouped_matmul_available(x: torch.Tensor, inner: int) -> bool:
    """Whether ``torch._grouped_mm`` takes ``x [N, D]`` against experts of intermediate size
    ``inner``: on Hopper or newer GPUs in bf16 (one kernel, no host sync) and on CPU, with rows
    that are multiples of 16 bytes."""
    if x.is_cuda and x.dtype != torch.bfloat16:
        return False
    aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (inner * x.element_size()) % 16 == 0
    return aligned and _grouped_mm_device(x.device.type, x.device.index)


class SparseMoE(nn.Module):
    """sum_i w_i E_i(x) + Shared(x). ``experts`` may hold a subset of all experts (expert
    parallelism): ``expert_offset`` is the global id of ``experts[0]``; tokens routed to experts held
    elsewhere contribute nothing here and are summed in by the engine's all-reduce.

    After ``stack_experts`` inference runs the experts as grouped matmuls over the tokens sorted by
    expert, with no host sync; otherwise (and under autograd) one expert at a time."""

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
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def stack_experts(self) -> None:
        """Move the experts' weights into two stacked tensors, ``w13 [E, 2 I, D]`` (w1 rows, then
        w3 rows) and ``w2 [E, D, I]``, whose slices the experts' parameters become: names and
        shapes stay, and a copy into a parameter (a weight update) lands in the stack. Call it
        once the experts are on their device and dtype."""
        if self.stacked is not None or len(self.experts) == 0:
            return
        w13 = torch.stack([torch.cat([e.w1.weight, e.w3.weight]) for e in self.experts])
        w2 = torch.stack([e.w2.weight for e in self.experts])
        inner = self.experts[0].w1.weight.shape[0]
        for i, e in enumerate(self.experts):
            for linear, value in ((e.w1, w13[i, :inner]), (e.w3, w13[i, inner:]), (e.w2, w2[i])):
                linear.weight = nn.Parameter(value, requires_grad=linear.weight.requires_grad)
        self.stacked = (w13, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen, weights = self.gate(x, self.e_score_correction_bias)
        if (
            self.stacked is not None
            and not torch.is_grad_enabled()
            and grouped_matmul_available(x, self.stacked[1].shape[-1])
        ):
            out = self._grouped_experts(x, chosen, weights)
        else:
            out = self._looped_experts(x, chosen, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return out.to(x.dtype)

    def _looped_experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x, dtype=torch.float32)
        for local, expert in enumerate(self.experts):
            token, slot = torch.nonzero(chosen == local + self.expert_offset, as_tuple=True)
            if token.numel() == 0:
                continue
            y = expert(x[token]).float() * weights[token, slot, None]
            out = out.index_add(0, token, y)
        return out

    def _grouped_experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The routed experts' weighted sum ``[T, D]`` fp32 from (token, expert) pairs sorted by
        expert: three grouped matmuls whose group ends are computed on the device."""
        w13, w2 = self.stacked
        num_experts, k = w13.shape[0], chosen.shape[1]
        local = chosen - self.expert_offset
        held = (local >= 0) & (local < num_experts)
        group = torch.where(held, local, num_experts).flatten()  # pairs held elsewhere sort last
        order = torch.argsort(group, stable=True)
        # Counted by a scatter: bincount on a GPU reads the largest id back to the host.
        counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=x.device)
        counts.index_add_(0, group, torch.ones_like(group))
        ends = counts[:num_experts].cumsum(0).to(torch.int32)
        token = order // k
        gate_up = torch._grouped_mm(x[token], w13.transpose(1, 2), offs=ends)
        gate, up = gate_up.chunk(2, dim=-1)
        expert = self.experts[0]
        hidden = swiglu_oai(gate, up, expert.alpha, expert.limit)
        y = torch._grouped_mm(hidden, w2.transpose(1, 2), offs=ends)
        # Rows past the last group end (pairs held elsewhere) are left unwritten: select, not scale.
        y = torch.where(held.flatten()[order, None], y.float() * weights.flatten()[order, None], 0.0)
        pairs = torch.empty_like(y)
        pairs[order] = y  # back to (token, slot) order: a fixed sum, where atomic adds would race
        return pairs.view(*chosen.shape, -1).sum(1)
