"""Helpers shared by the pure-PyTorch references: walking one sequence's paged cache.

Layout used by every kernel entry point (see ``msa.kernels``):
  caches ``[num_pages, page_size, ...]``; ``block_table[b, i]`` is the page that holds the sequence's
  i-th block *on this shard*; with ``shard_world`` ranks a shard holds the global blocks
  ``shard_rank, shard_rank + shard_world, ...`` (round robin), so local block i is global block
  ``shard_rank + i * shard_world``. Query tokens are packed: sequence b owns rows
  ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``, and they are its last tokens, so query i of b sits at
  global position ``seq_lens[b] - q_len_b + i``.
"""

from __future__ import annotations

import torch


def num_local_blocks(num_global_blocks, shard_rank: int, shard_world: int):
    """How many of a sequence's first ``num_global_blocks`` (>= 0) blocks live on this shard; an
    int, or an integer tensor of counts for one per sequence."""
    return (num_global_blocks - shard_rank + shard_world - 1) // shard_world


def gather_sequence(
    cache: torch.Tensor,
    block_table_row: torch.Tensor,
    seq_len: int,
    block_size: int,
    shard_rank: int,
    shard_world: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's cached tokens of one sequence, contiguous, in fp32.

    Returns (values ``[n_local_blocks * block_size, ...]``, global token positions ``[n]`` int64,
    global block ids ``[n_local_blocks]`` int64). Slots past ``seq_len`` read as zeros and keep their
    position, so causal masking (position <= query position < seq_len) hides them.
    """
    n_global = (seq_len + block_size - 1) // block_size
    n_local = num_local_blocks(n_global, shard_rank, shard_world)
    pages = block_table_row[:n_local].long()
    values = cache[pages].float().reshape(n_local * block_size, *cache.shape[2:])
    block_ids = shard_rank + shard_world * torch.arange(n_local, device=cache.device)
    positions = (block_ids[:, None] * block_size + torch.arange(block_size, device=cache.device)).reshape(-1)
    # Slots past the end were never written: zero them so 0-weighted garbage cannot turn into NaN.
    values = values.masked_fill((positions >= seq_len).view(-1, *([1] * (values.dim() - 1))), 0.0)
    return values, positions, block_ids


def query_positions(cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, b: int) -> torch.Tensor:
    """Global positions ``[q_len]`` of sequence b's query tokens."""
    q_len = int(cu_seqlens_q[b + 1] - cu_seqlens_q[b])
    return int(seq_lens[b]) - q_len + torch.arange(q_len, device=seq_lens.device)
