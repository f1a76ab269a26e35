"""Compile the attention kernels' specializations before the first request needs them.

A Triton kernel compiles once per combination of its compile-time parameters (tile sizes, chunk
and split counts, which follow the query length, the batch size and the block table's width).
Compiling takes about a second, so the first step at a new batch size or context length would stall
every running request that long. ``warm_up_attention`` runs each kernel at every batch size and
table width where a parameter changes, for decode and for short query runs (speculative
verification, the tail chunk of a chunked prefill), over page 0 of the real cache (read only: no
key is stored), so serving meets only kernels that are already compiled.
"""

from __future__ import annotations

import torch

from msa.kernels._launch import num_sms
from msa.kernels.api import (
    merge_attention_states,
    paged_attention,
    select_and_attend,
    select_blocks,
    selection_needed,
    sparse_attention,
    store_tokens,
)

# Below this many blocks every table width is run: the dense decode kernel's split count follows
# the width one by one there.
_EVERY_WIDTH_UP_TO = 64
# Query run lengths warmed up: decode, then one per tile size of the indexer (4, 16, 64 tokens) and
# of dense attention (2, 4, 8 tokens); longer runs share the 64-token one's parameters.
QUERY_LENS = (1, 2, 3, 5, 16, 64)


def warmup_shapes(max_seqs: int, max_blocks: int, device: torch.device) -> list[tuple[int, int]]:
    """``(batch, table width)`` pairs that reach the specializations the decode kernels pick for
    up to ``max_seqs`` sequences of up to ``max_blocks`` blocks (on this shard). Batches: every
    power of two and ``max_seqs``. Widths: every one up to 64, then eight steps per doubling, each
    with the width after it (the kernels' parameters are powers of two of the width, the batch
    size and their product, so they change at such steps). Past a few programs per SM the
    selection's chunk is at its cap and the parameters follow the width alone, so larger batches
    skip those widths."""
    batches = sorted({min(max_seqs, 1 << i) for i in range(max_seqs.bit_length() + 1)})
    widths = set(range(1, min(max_blocks, _EVERY_WIDTH_UP_TO) + 1))
    octave = _EVERY_WIDTH_UP_TO
    while octave <= max_blocks:
        for step in range(8):
            w = octave + step * octave // 8
            widths.update(x for x in (w, w + 1) if x <= max_blocks)
        octave *= 2
    widths.add(max_blocks)
    saturated = 512 * num_sms(device)  # batch x width past which the selection's chunk is capped
    return [
        (b, width)
        for b in batches
        for width in sorted(widths)
        if b == 1 or width <= _EVERY_WIDTH_UP_TO or b * width <= saturated
    ]


@torch.no_grad()
def warm_up_attention(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index_k_cache: torch.Tensor | None,
    *,
    num_heads: int,
    index_heads: int,
    topk: int,
    max_seqs: int,
    max_blocks: int,
    shard_rank: int = 0,
    shard_world: int = 1,
    query_lens: tuple[int, ...] = QUERY_LENS,
) -> int:
    """Run an attention layer's kernels (storing keys, dense attention; with ``index_k_cache``,
    block selection and sparse attention too) for every shape of ``warmup_shapes`` with each
    sequence's last ``q`` tokens as queries, for each ``q`` in ``query_lens``. Every block of
    every sequence is page 0 of ``k_cache``/``v_cache`` (``[pages, block, kv_heads, D]``) and
    ``index_k_cache`` (``[pages, block, index_dim]``), which are only read. The launches go
    through the public entry points, so they take the same decisions as the model's. Returns
    the number of launches of the attention layer run."""
    device, bs, D = k_cache.device, k_cache.shape[1], k_cache.shape[3]
    shard = {"shard_rank": shard_rank, "shard_world": shard_world}
    # The step's keys are stored first; a slot of -1 (another shard's token) writes nothing.
    skip = torch.full((1,), -1, dtype=torch.int64, device=device)
    for cache in (k_cache, index_k_cache) if index_k_cache is not None else (k_cache,):
        store_tokens(cache, torch.zeros(1, *cache.shape[2:], dtype=k_cache.dtype, device=device), skip)
    runs = 0
    for q_len in query_lens:
        for b, width in warmup_shapes(max_seqs, max_blocks, device):
            # Global blocks for which this shard holds `width`: its last one is this shard's.
            seq_len = ((width - 1) * shard_world + shard_rank + 1) * bs
            if seq_len < q_len:
                continue
            table = torch.zeros(b, width, dtype=torch.int32, device=device)
            cu = torch.arange(b + 1, dtype=torch.int32, device=device) * q_len
            seq_lens = torch.full((b,), seq_len, dtype=torch.int32, device=device)
            q = torch.zeros(b * q_len, num_heads, D, dtype=k_cache.dtype, device=device)
            tables = (table, cu, seq_lens)
            paged_attention(q, k_cache, v_cache, *tables, scale=1.0, max_q_len=q_len, **shard)
            runs += 1
            if index_k_cache is None or not selection_needed(seq_len, bs, topk):
                continue
            iq = torch.zeros(
                b * q_len, index_heads, index_k_cache.shape[2], dtype=k_cache.dtype, device=device
            )
            if shard_world == 1:  # the layer selects and attends in one call
                select_and_attend(
                    q,
                    k_cache,
                    v_cache,
                    iq,
                    index_k_cache,
                    *tables,
                    topk=topk,
                    scale=1.0,
                    max_q_len=q_len,
                    **shard,
                )
            else:  # sequence shards merge their candidates between the two calls
                ids, _ = select_blocks(iq, index_k_cache, *tables, topk=topk, max_q_len=q_len, **shard)
                sparse_attention(q, k_cache, v_cache, *tables, ids, scale=1.0, max_q_len=q_len, **shard)
    if shard_world > 1:  # the sequence shards' partial outputs are merged by log-sum-exp
        outs = torch.zeros(shard_world, 1, num_heads, D, dtype=k_cache.dtype, device=device)
        merge_attention_states(outs, torch.zeros(outs.shape[:3], device=device))
    return runs
