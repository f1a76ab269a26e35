"""Single-process generation for one prompt: chunked prefill into a paged cache, then decoding.

The distributed engine (``msa.cluster``) serves many requests; this is the plain loop behind
``msa generate`` and the model's own tests.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from msa.model.kv_cache import PagedKVCache, build_batch
from msa.model.model import MiniMaxM3ForCausalLM
from msa.model.sampling import sample_token


@torch.no_grad()
def generate_stream(
    model: MiniMaxM3ForCausalLM,
    prompt_ids: list[int],
    *,
    max_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    prefill_chunk: int = 8192,
) -> Iterator[int]:
    """Yield up to ``max_tokens`` sampled token ids after ``prompt_ids``, stopping after a stop id."""
    if not prompt_ids:
        raise ValueError("prompt_ids must hold at least one token")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    config = model.config
    total = len(prompt_ids) + max_tokens
    if total > config.max_position_embeddings:
        raise ValueError(
            f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {config.max_position_embeddings} tokens"
        )
    param = next(model.parameters())
    bs = config.sparse.block_size
    pages = list(range((total + bs - 1) // bs))
    cache = PagedKVCache(config, len(pages), dtype=param.dtype, device=param.device, num_mtp=0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def step(tokens: list[int], cached: int) -> torch.Tensor:
        batch = build_batch([pages], [cached], [len(tokens)], bs, device=param.device, cache=cache)
        ids = torch.tensor(tokens, dtype=torch.long, device=param.device)
        return model(ids, batch, rows=batch.last_token_rows())[0]

    cached = 0
    for start in range(0, len(prompt_ids), prefill_chunk):
        chunk = prompt_ids[start : start + prefill_chunk]
        logits = step(chunk, cached)
        cached += len(chunk)
    for _ in range(max_tokens):
        token, _ = sample_token(
            logits, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator
        )
        yield token
        if token in stop_token_ids:
            return
        logits = step([token], cached)
        cached += 1
