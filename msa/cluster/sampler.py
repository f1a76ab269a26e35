"""Sampling on rank 0: next tokens, their log-probabilities and the top alternatives.

Randomness is a pure function of (request seed, choice index, output position), so a sequence that
is preempted and recomputed, or batched differently, draws the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from msa.model.sampling import sample_token

if TYPE_CHECKING:
    from msa.cluster.sequence import Sequence

_MASK63 = (1 << 63) - 1


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
        return cls(row=row, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, seed=seq.seed,
                   index=seq.index, position=seq.num_output_tokens, num_top_logprobs=p.logprobs)

    def generator(self) -> torch.Generator:
        mixed = (self.seed * 0x9E3779B97F4A7C15 + self.index * 1_000_003 + self.position) & _MASK63
        return torch.Generator().manual_seed(mixed)


@dataclass(slots=True)
class SampleResult:
    """Per sampled row: the token, its log-probability (temperature 1, before truncation) and,
    when asked, the ``num_top_logprobs`` best alternatives ``{token: logprob}``."""

    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float] | None]
    logits: torch.Tensor | None = None
    profile: dict | None = None


def sample(logits: torch.Tensor, requests: list[SampleRequest], *, keep_logits: bool = False) -> SampleResult:
    """``logits [len(requests), vocab]`` (any float dtype/device) -> tokens and log-probabilities."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = torch.argmax(logits, dim=-1).tolist()
    tokens, chosen, tops = [], [], []
    for i, req in enumerate(requests):
        if req.temperature <= 0:
            token = greedy[i]
        else:
            token, _ = sample_token(logits[i], temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                                    generator=req.generator())
        tokens.append(token)
        chosen.append(float(logprobs[i, token]))
        if req.num_top_logprobs:
            values, ids = torch.topk(logprobs[i], req.num_top_logprobs)
            tops.append(dict(zip(ids.tolist(), values.tolist(), strict=True)))
        else:
            tops.append({} if req.num_top_logprobs == 0 else None)
    return SampleResult(tokens, chosen, tops, logits.cpu() if keep_logits else None)
