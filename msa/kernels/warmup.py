"""Compile the attention kernels' specializations before the first request needs them.

A Triton kernel compiles once per combination of its compile-time parameters (tile sizes, chunk
and split counts, which follow the query length, the batch size and the block table's width).
Compiling takes about a second, so the first step at a new batch size or context length would stall
every running request that long. ``warm_up_attention`` runs each kernel at every batch size and
table width where a parameter changes, for decode, for short query runs (speculative
verification, the tail chunk of a chunked prefill) and, given the step's token budget, for prefill
chunks beside decodes, with selections that take the sparse prefill's second pass; over page 0 of
the real cache (read only: no key is stored), so serving meets only kernels that are already
compiled.
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
    step_tokens: int = 0,
) -> int:
    """Run an attention layer's kernels (storing keys, dense attention; with ``index_k_cache``,
    block selection and sparse attention too) for every shape of ``warmup_shapes`` with each
    sequence's last ``q`` tokens as queries, for each ``q`` in ``query_lens``. Every block of
    every sequence is page 0 of ``k_cache``/``v_cache`` (``[pages, block, kv_heads, D]``) and
    ``index_k_cache`` (``[pages, block, index_dim]``), which are only read. The launches go
    through the public entry points, so they take the same decisions as the model's. Returns
    the number of launches of the attention layer run.

    ``step_tokens`` (the engine's per-step token budget) adds the prefill chunks: runs of 128,
    256 ... queries up to it, at the batch sizes whose runs fit in one step (the selection's
    tiling and candidate merge follow a run's tile count), and per such length one run whose
    tokens choose blocks apart from their neighbours' (as unrelated queries do), which takes the
    sparse prefill's second pass (token by token or, for long runs, block-major) with its merge."""
    device, bs, D = k_cache.device, k_cache.shape[1], k_cache.shape[3]
    shard = {"shard_rank": shard_rank, "shard_world": shard_world}
    # The step's keys are stored first; a slot of -1 (another shard's token) writes nothing.
    skip = torch.full((1,), -1, dtype=torch.int64, device=device)
    for cache in (k_cache, index_k_cache) if index_k_cache is not None else (k_cache,):
        store_tokens(cache, torch.zeros(1, *cache.shape[2:], dtype=k_cache.dtype, device=device), skip)
    runs = 0
    chunks = [n for n in (128 << i for i in range(32)) if n <= step_tokens]
    for q_len, chunk in [(n, False) for n in query_lens] + [(n, True) for n in chunks]:
        for b, width in warmup_shapes(max_seqs, max_blocks, device):
            # Global blocks for which this shard holds `width`: its last one is this shard's.
            seq_len = ((width - 1) * shard_world + shard_rank + 1) * bs
            if seq_len < q_len:
                continue
            if chunk:
                # A prefill chunk shares its step with decodes: the launch grid follows the batch
                # size times the chunk's tiles, with the step's tokens within the budget.
                q_lens = [min(q_len, step_tokens - b + 1)] + [1] * (b - 1)
            else:
                q_lens = [q_len] * b
            table = torch.zeros(b, width, dtype=torch.int32, device=device)
            cu = torch.tensor([0, *q_lens], dtype=torch.int32, device=device).cumsum(0, dtype=torch.int32)
            seq_lens = torch.full((b,), seq_len, dtype=torch.int32, device=device)
            q = torch.zeros(sum(q_lens), num_heads, D, dtype=k_cache.dtype, device=device)
            tables = (table, cu, seq_lens)
            longest = q_lens[0]
            # A chunk's dense attention takes the same parameters at every width past a few blocks,
            # and its cost grows with the width: wide tables run the selection and sparse kernels only.
            if not chunk or width <= _EVERY_WIDTH_UP_TO:
                paged_attention(q, k_cache, v_cache, *tables, scale=1.0, max_q_len=longest, **shard)
                runs += 1
            if index_k_cache is None or not selection_needed(seq_len, bs, topk):
                continue
            iq = torch.zeros(
                q.shape[0], index_heads, index_k_cache.shape[2], dtype=k_cache.dtype, device=device
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
                    max_q_len=longest,
                    **shard,
                )
            else:  # sequence shards merge their candidates between the two calls
                ids, _ = select_blocks(iq, index_k_cache, *tables, topk=topk, max_q_len=longest, **shard)
                sparse_attention(q, k_cache, v_cache, *tables, ids, scale=1.0, max_q_len=longest, **shard)
    if index_k_cache is not None:
        for q_len in chunks:
            runs += _crowded_run(q_len, k_cache, v_cache, num_heads, topk, max_blocks, shard)
    if shard_world > 1:  # the sequence shards' partial outputs are merged by log-sum-exp
        outs = torch.zeros(shard_world, 1, num_heads, D, dtype=k_cache.dtype, device=device)
        merge_attention_states(outs, torch.zeros(outs.shape[:3], device=device))
    return runs


def _crowded_run(
    q_len: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_heads: int,
    topk: int,
    max_blocks: int,
    shard: dict,
) -> int:
    """Sparse attention of one run of ``q_len`` queries whose tokens each choose their own block
    and ``topk - 1`` random ones before the run (a selection of unrelated queries), over enough
    blocks that the choices rarely meet; 0 if this shard's cache is too small for it."""
    device, bs, groups, D = k_cache.device, k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    rank, world = shard["shard_rank"], shard["shard_world"]
    before = q_len // bs + 4 * topk  # global blocks wholly before the run
    total = before + -(-q_len // bs)
    width = -(-(total - rank) // world)  # this shard's blocks of the sequence
    if width > max_blocks or before < topk:
        return 0
    seq_len = before * bs + q_len
    gen = torch.Generator(device=device).manual_seed(0)
    others = torch.rand(q_len * groups, before, generator=gen, device=device).argsort(-1)[:, : topk - 1]
    pos = torch.arange(seq_len - q_len, seq_len, device=device).repeat_interleave(groups)
    ids = torch.cat([others, (pos // bs)[:, None]], 1).sort(-1).values
    tables = (
        torch.zeros(1, width, dtype=torch.int32, device=device),
        torch.tensor([0, q_len], dtype=torch.int32, device=device),
        torch.tensor([seq_len], dtype=torch.int32, device=device),
    )
    q = torch.zeros(q_len, num_heads, D, dtype=k_cache.dtype, device=device)
    ids = ids.view(q_len, groups, topk).to(torch.int32)
    sparse_attention(q, k_cache, v_cache, *tables, ids, scale=1.0, max_q_len=q_len, **shard)
    return 1
