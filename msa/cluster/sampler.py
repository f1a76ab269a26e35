"""Sampling on rank 0: next tokens, their log-probabilities and the top alternatives.

All rows of a step are sampled together on the device: per-row temperature, top-k, top-p and
random keys are tensors, and the results come back to the host in one copy. A sampled token is
the Gumbel-max / exponential-race draw ``argmax(scaled logits - log q)`` with ``q`` Exponential(1)
noise that is a pure function of (request seed, choice index, output position, token id), so a
sequence that is preempted and recomputed, or batched differently, draws the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from msa.cluster.sequence import Sequence

_MASK63 = (1 << 63) - 1
_MASK32 = (1 << 32) - 1
_HASH_MULTIPLIER = 0x45D9F3B  # < 2**31: products of 32-bit values stay inside int64


@dataclass(slots=True)
class SampleRequest:
    """Sample from the last token of row ``row`` of a step (one row per scheduled sequence)."""

    row: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    index: int
    position: int
    num_top_logprobs: int | None

    @classmethod
    def for_sequence(cls, row: int, seq: Sequence) -> SampleRequest:
        p = seq.params
        return cls(
            row=row,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=seq.seed,
            index=seq.index,
            position=seq.num_output_tokens,
            num_top_logprobs=p.logprobs,
        )

    def noise_keys(self) -> tuple[int, int]:
        """Two 32-bit keys of this draw's noise, from (seed, choice index, output position)."""
        mixed = (self.seed * 0x9E3779B97F4A7C15 + self.index * 1_000_003 + self.position) & _MASK63
        return mixed & _MASK32, mixed >> 32


@dataclass(slots=True)
class SampleResult:
    """Per sampled row: the token, its log-probability (temperature 1, before truncation) and,
    when asked, the ``num_top_logprobs`` best alternatives ``{token: logprob}``."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]
    logits: torch.Tensor | None = None
    profile: dict | None = None


def _mix32(h: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash (xor-shift-multiply) of int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = (h * _HASH_MULTIPLIER) & _MASK32
    h = h ^ (h >> 16)
    h = (h * _HASH_MULTIPLIER) & _MASK32
    return h ^ (h >> 16)


def exponential_noise(keys: torch.Tensor, vocab: int) -> torch.Tensor:
    """Exponential(1) noise ``[S, vocab]`` fp32 from per-row keys ``[S, 2]`` int64 (32-bit values):
    entry (i, t) depends only on row i's keys and the token id t."""
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    h = _mix32(_mix32(ids[None, :] ^ keys[:, :1]) ^ keys[:, 1:])
    uniform = ((h >> 8).float() + 0.5) * 2.0**-24  # 24 bits: exact in fp32, never 0 or 1
    return -torch.log(uniform)


def truncation_mask(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Tokens that top-k then top-p remove, per row: ``[S, V]`` bool. ``scaled [S, V]`` fp32 are the
    temperature-scaled logits; ``top_k [S]`` int64 (0 = off); ``top_p [S]`` fp32 (1 = off). Top-p
    keeps the smallest prefix, by descending probability after top-k, whose mass reaches top_p."""
    vocab = scaled.shape[-1]
    ordered, order = torch.sort(scaled, dim=-1, descending=True)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = torch.softmax(ordered, dim=-1)
    drop_ordered = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1.0)[:, None]
    drop = torch.zeros_like(drop_ordered).scatter(1, order, drop_ordered)
    return drop | (scaled < kth)


def _draw(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
    """Token ids ``[S]``: the draw of rows with temperature > 0, the argmax of the others."""
    params = torch.tensor(
        [[r.temperature, r.top_p, r.top_k, *r.noise_keys()] for r in requests], dtype=torch.float64
    ).to(logits.device)
    temperature = params[:, 0:1].float()
    scaled = logits / torch.where(temperature > 0, temperature, 1.0)
    if any(0 < r.top_k < logits.shape[-1] or r.top_p < 1.0 for r in requests):
        drop = truncation_mask(scaled, params[:, 2].long(), params[:, 1].float())
        scaled = scaled.masked_fill(drop, float("-inf"))
    noise = exponential_noise(params[:, 3:5].long(), logits.shape[-1])
    drawn = torch.argmax(scaled - torch.log(noise), dim=-1)
    return torch.where(temperature[:, 0] > 0, drawn, torch.argmax(logits, dim=-1))


def sample(logits: torch.Tensor, requests: list[SampleRequest], *, keep_logits: bool = False) -> SampleResult:
    """``logits [len(requests), vocab]`` (any float dtype/device) -> tokens and log-probabilities.
    Greedy rows (temperature 0) take the argmax, ties to the lowest id."""
    n = len(requests)
    if n == 0:
        return SampleResult([], [], [], logits.float().cpu() if keep_logits else None)
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if any(r.temperature > 0 for r in requests):
        tokens = _draw(logits, requests)
    else:
        tokens = torch.argmax(logits, dim=-1)
    parts = [tokens.double(), logprobs.gather(1, tokens[:, None])[:, 0].double()]
    width = max(r.num_top_logprobs or 0 for r in requests)
    if width:
        values, ids = torch.topk(logprobs, width, dim=-1)
        parts += [ids.double().flatten(), values.double().flatten()]
    host = torch.cat(parts).tolist()  # the step's one device-to-host copy
    tops: list[dict[int, float] | None] = []
    for i, r in enumerate(requests):
        if not r.num_top_logprobs:
            tops.append({} if r.num_top_logprobs == 0 else None)
            continue
        ids_at, values_at = 2 * n + i * width, 2 * n + (n + i) * width
        ids_i = host[ids_at : ids_at + r.num_top_logprobs]
        values_i = host[values_at : values_at + r.num_top_logprobs]
        tops.append({int(t): v for t, v in zip(ids_i, values_i, strict=True)})
    token_ids = [int(t) for t in host[:n]]
    return SampleResult(token_ids, host[n : 2 * n], tops, logits.cpu() if keep_logits else None)
