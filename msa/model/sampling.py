"""Token sampling from logits: temperature, top-k, top-p, with a per-request generator."""

from __future__ import annotations

import torch


def sample_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[int, torch.Tensor]:
    """One token from ``logits [vocab]``. Returns (token id, log-probabilities ``[vocab]`` fp32 of
    the distribution before truncation at temperature 1, which is what the OpenAI API reports and
    what RL importance ratios need). ``temperature == 0`` is greedy (ties to the lowest id)."""
    logits = logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    if temperature <= 0:
        return int(torch.argmax(logits)), logprobs
    scaled = logits / temperature
    if top_k and 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if top_p < 1.0:
        probs_sorted, order = torch.sort(torch.softmax(scaled, -1), descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        drop = (probs_sorted.cumsum(-1) - probs_sorted) >= top_p
        scaled = scaled.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = torch.softmax(scaled, -1)
    token = torch.multinomial(probs.cpu(), 1, generator=generator)
    return int(token), logprobs
