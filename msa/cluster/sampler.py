"""Sampling on rank 0: next tokens, their log-probabilities and the top alternatives.

All rows of a step are sampled together on the device: per-row temperature, top-k, top-p and
random draws are tensors, and the results come back to the host in one copy. A sampled token is
the inverse-CDF draw of one uniform number that is a pure function of (request seed, choice index,
output position), so a sequence that is preempted and recomputed, or batched differently, draws the
same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from msa.cluster.transfer import to_device

if TYPE_CHECKING:
    from msa.cluster.sequence import Sequence

_MASK63 = (1 << 63) - 1
_MASK32 = (1 << 32) - 1

# Rows with a lower temperature take the argmax, as in vLLM: dividing fp32 logits by a tiny
# temperature overflows to inf, and the softmax of those is NaN.
MIN_SAMPLING_TEMPERATURE = 1e-5


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
    allowed_token_ids: tuple[int, ...] | None = None

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
            allowed_token_ids=tuple(p.allowed_token_ids) if p.allowed_token_ids else None,
        )

    def uniform(self) -> float:
        """This draw's uniform number in (0, 1), from (seed, choice index, output position)."""
        mixed = (self.seed * 0x9E3779B97F4A7C15 + self.index * 1_000_003 + self.position) & _MASK63
        h = _mix32(_mix32(mixed & _MASK32) ^ (mixed >> 32))
        return (h + 0.5) / 2.0**32


@dataclass(slots=True)
class SampleResult:
    """Per sampled row: the token, its log-probability (temperature 1, before truncation) and,
    when asked, the ``num_top_logprobs`` best alternatives ``{token: logprob}``."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]
    logits: torch.Tensor | None = None
    profile: dict | None = None


def _mix32(h: int) -> int:
    """A bijective hash of 32-bit integers (xor-shift-multiply)."""
    h ^= h >> 16
    h = (h * 0x45D9F3B) & _MASK32
    h ^= h >> 16
    h = (h * 0x45D9F3B) & _MASK32
    return h ^ (h >> 16)


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


def allowed_only(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
    """``logits [S, V]`` with every token outside a row's ``allowed_token_ids`` at -inf (rows
    without them as they are); the allowed entries of all rows go to the device in one copy."""
    entries = [(i, t) for i, r in enumerate(requests) for t in r.allowed_token_ids or ()]
    if not entries:
        return logits
    row_of, token_of = to_device(np.asarray(entries, dtype=np.int64).T, logits.device)
    keep = torch.ones_like(logits, dtype=torch.bool)
    keep[row_of] = False  # every row with allowed ids (each has one at least)
    keep[row_of, token_of] = True
    return logits.masked_fill(~keep, float("-inf"))


def _draw(logits: torch.Tensor, requests: list[SampleRequest]) -> torch.Tensor:
    """Token ids ``[S]``: the draw of rows with temperature >= MIN_SAMPLING_TEMPERATURE, the
    argmax of the others."""
    rows = [[r.temperature, r.top_p, r.top_k, r.uniform()] for r in requests]
    params = to_device(np.asarray(rows, dtype=np.float64), logits.device)
    drawn_rows = params[:, 0] >= MIN_SAMPLING_TEMPERATURE
    scaled = logits / torch.where(drawn_rows[:, None], params[:, 0:1], 1.0).float()
    if any(0 < r.top_k < logits.shape[-1] or r.top_p < 1.0 for r in requests):
        drop = truncation_mask(scaled, params[:, 2].long(), params[:, 1].float())
        scaled = scaled.masked_fill(drop, float("-inf"))
    cdf = torch.softmax(scaled, dim=-1).double().cumsum(-1)
    target = params[:, 3:4] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True)[:, 0].clamp(max=logits.shape[-1] - 1)
    return torch.where(drawn_rows, drawn, torch.argmax(logits, dim=-1))


def sample(logits: torch.Tensor, requests: list[SampleRequest], *, keep_logits: bool = False) -> SampleResult:
    """``logits [len(requests), vocab]`` (any float dtype/device) -> tokens and log-probabilities.
    Greedy rows (temperature below MIN_SAMPLING_TEMPERATURE, 0 included) take the argmax, ties to
    the lowest id."""
    n = len(requests)
    if n == 0:
        return SampleResult([], [], [], logits.float().cpu() if keep_logits else None)
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)  # of the whole distribution, as vLLM reports them
    drawable = allowed_only(logits, requests)
    if any(r.temperature >= MIN_SAMPLING_TEMPERATURE for r in requests):
        tokens = _draw(drawable, requests)
    else:
        tokens = torch.argmax(drawable, dim=-1)
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
