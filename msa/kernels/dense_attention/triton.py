"""Dense causal GQA attention over the paged cache (the dense layers), in Triton.

This is the MSA attention kernel of ``msa.kernels.sparse_attention.triton`` run in its dense mode
(every visible block of the shard instead of a selection), not gather + torch SDPA: SDPA needs the
cache gathered into a contiguous copy first (a full extra read and write of K and V per call, which
is most of the cost of a decode step), it has no public way to return the log-sum-exp that
sequence-sharded decode merges by, and its causal mask aligns the query block to the top-left of the
keys, whereas here the queries are the last tokens of the sequence. Decode is split over the context
(split-K) so one sequence still fills the GPU.
"""

from __future__ import annotations

import torch

from msa.kernels.sparse_attention.triton import launch_paged_attention


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    shard_rank: int = 0,
    shard_world: int = 1,
    max_q_len: int | None = None,
    block_t: int | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention of packed queries ``q [T, H, D]`` over this shard's paged cache
    ``k_cache, v_cache [pages, block, H_kv, D]`` (q's dtype). Returns (out ``[T, H, D]`` q's dtype,
    lse ``[T, H]`` fp32; zeros and -inf where a query sees no key on this shard). Optional tuning
    arguments as in ``sparse_attention_triton``."""
    return launch_paged_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        cu_seqlens_q,
        seq_lens,
        None,
        scale=scale,
        shard_rank=shard_rank,
        shard_world=shard_world,
        max_q_len=max_q_len,
        block_t=block_t,
        num_splits=num_splits,
        name="paged_attention",
    )
