"""Public kernel entry points: argument checks, then dispatch to Triton or the reference.

Every call checks its arguments' metadata (shapes, dtypes, devices, shard coordinates). The checks
of their values (``cu_seqlens_q`` ascending from 0, no sequence with more queries than tokens, a
block table wide enough whose used entries are pages of the cache, distinct ids in each selection,
store slots inside the cache) run for CPU tensors always and for CUDA tensors only with
``MSA_CHECK_INPUTS=1``: they read the values, which syncs with the host (no CUDA graph can capture
that), so the GPU path leaves them off by default.
"""

from __future__ import annotations

import os

import torch

from msa.kernels._checks import (
    check_block_table,
    check_cu_seqlens,
    check_distinct_block_ids,
    check_query_counts,
    check_same_device,
    check_shard,
    check_slots,
    values_checked,
)
from msa.kernels.indexer.reference import order_selection, select_blocks_reference
from msa.kernels.merge.reference import merge_attention_states_reference
from msa.kernels.sparse_attention.reference import paged_attention_reference


def _tileable(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def use_triton(t: torch.Tensor, *tile_dims: int) -> bool:
    """Triton for CUDA tensors whose tiled dims (block size, head dim) are powers of two >= 16;
    the reference otherwise (CPU, or toy shapes such as the tiny preset on a GPU).
    MSA_KERNEL_BACKEND=triton|reference overrides."""
    backend = os.environ.get("MSA_KERNEL_BACKEND", "auto")
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"MSA_KERNEL_BACKEND must be auto, triton or reference, got {backend!r}")
    if backend == "auto":
        return t.is_cuda and all(_tileable(d) for d in tile_dims)
    return backend == "triton"


def _check_batch(
    name: str,
    anchor: str,
    tensors: dict[str, torch.Tensor],
    shard_rank: int,
    shard_world: int,
) -> None:
    """Metadata every call checks: all ``tensors`` on the device of ``tensors[anchor]``, the
    shapes and dtypes of their block_table, cu_seqlens_q and seq_lens, and the shard."""
    check_same_device(name, anchor, tensors)
    block_table, cu_seqlens_q, seq_lens = (tensors[k] for k in ("block_table", "cu_seqlens_q", "seq_lens"))
    if block_table.dim() != 2 or block_table.dtype != torch.int32:
        raise ValueError(
            f"{name}: block_table must be a 2-D int32 tensor, got {tuple(block_table.shape)} "
            f"{block_table.dtype}"
        )
    B = block_table.shape[0]
    if cu_seqlens_q.shape != (B + 1,) or cu_seqlens_q.dtype != torch.int32:
        raise ValueError(
            f"{name}: cu_seqlens_q must be int32 of shape ({B + 1},), got "
            f"{tuple(cu_seqlens_q.shape)} {cu_seqlens_q.dtype}"
        )
    if seq_lens.shape != (B,) or seq_lens.dtype != torch.int32:
        raise ValueError(
            f"{name}: seq_lens must be int32 of shape ({B},), got {tuple(seq_lens.shape)} {seq_lens.dtype}"
        )
    check_shard(name, shard_rank, shard_world)


def _check_batch_values(
    name: str,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    total_q: int,
    cache_shape: tuple[int, ...],
    shard_rank: int,
    shard_world: int,
) -> None:
    """The value checks of a batch over a paged cache of ``cache_shape`` ``(pages, block, ...)``."""
    num_pages, block_size = cache_shape[0], cache_shape[1]
    check_cu_seqlens(name, cu_seqlens_q, total_q)
    check_query_counts(name, cu_seqlens_q, seq_lens)
    check_block_table(name, block_table, seq_lens, block_size, num_pages, shard_rank, shard_world)


def _check_topk(name: str, topk: int) -> None:
    if topk < 0:
        raise ValueError(f"{name}: topk must be >= 0, got {topk}")


def _check_index(name: str, index_q: torch.Tensor, index_k_cache: torch.Tensor) -> None:
    if index_q.dim() != 3 or index_k_cache.dim() != 3 or index_q.shape[-1] != index_k_cache.shape[-1]:
        raise ValueError(
            f"{name}: index_q [T, G, D] and index_k_cache [pages, block, D] disagree: "
            f"{tuple(index_q.shape)} vs {tuple(index_k_cache.shape)}"
        )


def select_blocks(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    topk: int,
    shard_rank: int = 0,
    shard_world: int = 1,
    max_q_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSA block selection for packed queries.

    index_q ``[T, G, D]`` (after norm and RoPE); index_k_cache ``[pages, block, D]`` (bf16, fp32 or
    float8_e4m3fn). Token score ``iq . ik / sqrt(D)`` for key positions <= the query's; a block's
    score is its max. Each query keeps its own (local) block plus the best others, ``topk`` in all,
    ties to the lower block id; when at most ``topk`` blocks are visible all of them are kept.

    Returns (block ids ``[T, G, topk]`` int32, global ids in ascending order with -1 after the
    valid ones, so the local block is the last valid entry; their scores ``[T, G, topk]`` fp32, +inf
    for the forced local block, -inf for padding). With ``shard_world > 1`` only this shard's blocks
    are candidates: combine the shards' results with ``merge_block_candidates``. ``max_q_len``
    (the longest query run, if the caller knows it) spares the Triton path a host sync.
    """
    name = "select_blocks"
    tensors = dict(
        index_q=index_q, index_k_cache=index_k_cache, block_table=block_table,
        cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens,
    )  # fmt: skip
    _check_batch(name, "index_q", tensors, shard_rank, shard_world)
    _check_index(name, index_q, index_k_cache)
    _check_topk(name, topk)
    if values_checked(index_q):
        _check_batch_values(
            name, block_table, cu_seqlens_q, seq_lens, index_q.shape[0], index_k_cache.shape,
            shard_rank, shard_world,
        )  # fmt: skip
    tables = (block_table, cu_seqlens_q, seq_lens)
    shard = dict(shard_rank=shard_rank, shard_world=shard_world, max_q_len=max_q_len)
    return _select_blocks(index_q, index_k_cache, *tables, topk=topk, **shard)


def _select_blocks(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    *tables: torch.Tensor,
    topk: int,
    shard_rank: int,
    shard_world: int,
    max_q_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_blocks`` on checked arguments (``tables``: block_table, cu_seqlens_q, seq_lens):
    Triton or the reference."""
    shard = dict(shard_rank=shard_rank, shard_world=shard_world)
    if use_triton(index_q, index_k_cache.shape[1], index_k_cache.shape[2]):
        from msa.kernels.indexer.triton import select_blocks_triton

        return select_blocks_triton(index_q, index_k_cache, *tables, topk=topk, max_q_len=max_q_len, **shard)
    return select_blocks_reference(index_q, index_k_cache, *tables, topk=topk, **shard)


def selection_needed(max_seq_len: int | None, block_size: int, topk: int) -> bool:
    """Whether block selection can change anything for a batch whose longest sequence has
    ``max_seq_len`` tokens (None: unknown). With at most ``topk`` blocks every visible block is
    selected, so MSA is exactly dense causal attention (``paged_attention``)."""
    return max_seq_len is None or -(-max_seq_len // block_size) > topk


def merge_block_candidates(ids: torch.Tensor, scores: torch.Tensor, topk: int) -> torch.Tensor:
    """Exact global top-k from per-shard candidates ``ids, scores [R, T, G, K]`` (from
    ``select_blocks`` on each shard): ``[T, G, topk]`` int32, ascending, -1 padded."""
    if ids.dim() != 4 or scores.shape != ids.shape:
        raise ValueError(
            f"merge_block_candidates: need ids and scores [R, T, G, K] of one shape, got "
            f"{tuple(ids.shape)} and {tuple(scores.shape)}"
        )
    check_same_device("merge_block_candidates", "ids", dict(ids=ids, scores=scores))
    _check_topk("merge_block_candidates", topk)
    R, T, G, K = ids.shape
    flat_ids = ids.permute(1, 2, 0, 3).reshape(T, G, R * K)
    flat_scores = scores.permute(1, 2, 0, 3).reshape(T, G, R * K)
    return order_selection(flat_ids, flat_scores, topk)[0].int()


def _check_attention(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"{name}: need q [T, H, D] and k_cache, v_cache [pages, block, H_kv, D] of one shape; "
            f"got {tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    if k_cache.shape[2] < 1:
        raise ValueError(f"{name}: H_kv (k_cache.shape[2]) must be >= 1, got {k_cache.shape[2]}")
    if q.shape[1] % k_cache.shape[2] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(
            f"{name}: q heads ({q.shape[1]}) must be a multiple of kv heads ({k_cache.shape[2]}) "
            f"and head dims must agree ({q.shape[2]} vs {k_cache.shape[3]})"
        )


def sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    scale: float,
    shard_rank: int = 0,
    shard_world: int = 1,
    max_q_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSA attention: each query head of KV group g attends, causally, to the tokens of the blocks
    ``block_ids[t, g]`` (global ids, -1 unused) that live on this shard.

    q ``[T, H, D]``; k_cache (after norm + RoPE) and v_cache ``[pages, block, H_kv, D]``.
    Returns (out ``[T, H, D]`` in q's dtype, lse ``[T, H]`` fp32); a query that sees no key here
    gets zeros and lse -inf, so ``merge_attention_states`` weighs it 0. ``max_q_len`` as in
    ``select_blocks``.
    """
    name = "sparse_attention"
    tensors = dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_seqlens_q=cu_seqlens_q,
        seq_lens=seq_lens, block_ids=block_ids,
    )  # fmt: skip
    _check_batch(name, "q", tensors, shard_rank, shard_world)
    _check_attention(name, q, k_cache, v_cache)
    if block_ids.dim() != 3 or block_ids.shape[:2] != (q.shape[0], k_cache.shape[2]):
        raise ValueError(
            f"{name}: block_ids must be 3-D [T={q.shape[0]}, H_kv={k_cache.shape[2]}, K], "
            f"got {tuple(block_ids.shape)}"
        )
    if values_checked(q):
        _check_batch_values(
            name, block_table, cu_seqlens_q, seq_lens, q.shape[0], k_cache.shape, shard_rank, shard_world
        )
        check_distinct_block_ids(name, block_ids)
    tables = (block_table, cu_seqlens_q, seq_lens)
    shard = dict(shard_rank=shard_rank, shard_world=shard_world, max_q_len=max_q_len)
    return _sparse_attention(q, k_cache, v_cache, *tables, block_ids, scale=scale, **shard)


def _sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    *tables_and_ids: torch.Tensor,
    scale: float,
    shard_rank: int,
    shard_world: int,
    max_q_len: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sparse_attention`` on checked arguments (``tables_and_ids``: block_table, cu_seqlens_q,
    seq_lens, block_ids): Triton or the reference."""
    args = (q, k_cache, v_cache, *tables_and_ids)
    shard = dict(shard_rank=shard_rank, shard_world=shard_world)
    if use_triton(q, k_cache.shape[1], k_cache.shape[3]):
        from msa.kernels.sparse_attention.triton import sparse_attention_triton

        return sparse_attention_triton(*args, scale=scale, max_q_len=max_q_len, **shard)
    return paged_attention_reference(*args, scale=scale, **shard)


def select_and_attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    topk: int,
    scale: float,
    shard_rank: int = 0,
    shard_world: int = 1,
    max_q_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An MSA layer's attention where each shard selects among its own blocks (one shard holding
    whole sequences, or shards whose selections are not merged): ``select_blocks`` then
    ``sparse_attention`` over that selection, one paged layout for K/V and the index keys.

    Returns (out ``[T, H, D]``, lse ``[T, H]``, block ids ``[T, H_kv, topk]``) as those two return
    them. On the Triton path a decode batch (one query per sequence) takes the final top-k inside
    the attention launch instead of a launch of its own. Shards that need the global top-k merge
    their candidates (``merge_block_candidates``) between the two calls instead.
    """
    name = "select_and_attend"
    tensors = dict(
        q=q, k_cache=k_cache, v_cache=v_cache, index_q=index_q, index_k_cache=index_k_cache,
        block_table=block_table, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens,
    )  # fmt: skip
    _check_batch(name, "q", tensors, shard_rank, shard_world)
    _check_attention(name, q, k_cache, v_cache)
    _check_index(name, index_q, index_k_cache)
    _check_topk(name, topk)
    if index_q.shape[:2] != (q.shape[0], k_cache.shape[2]):
        raise ValueError(
            f"{name}: index_q must be [T={q.shape[0]}, H_kv={k_cache.shape[2]}, D], "
            f"got {tuple(index_q.shape)}"
        )
    # One block table and one set of block ids address both caches: their pages must hold as many tokens.
    if index_k_cache.shape[1] != k_cache.shape[1]:
        raise ValueError(
            f"{name}: index_k_cache and k_cache must share a block size, got {index_k_cache.shape[1]} "
            f"and {k_cache.shape[1]}"
        )
    if values_checked(q):
        pages = min(k_cache.shape[0], index_k_cache.shape[0])
        _check_batch_values(
            name, block_table, cu_seqlens_q, seq_lens, q.shape[0], (pages, k_cache.shape[1]),
            shard_rank, shard_world,
        )  # fmt: skip
    shard = dict(shard_rank=shard_rank, shard_world=shard_world, max_q_len=max_q_len)
    if use_triton(q, k_cache.shape[1], k_cache.shape[3]) and use_triton(
        index_q, index_k_cache.shape[1], index_k_cache.shape[2]
    ):
        from msa.kernels.sparse_attention.triton import select_and_attend_triton

        return select_and_attend_triton(
            q, k_cache, v_cache, index_q, index_k_cache, block_table, cu_seqlens_q, seq_lens,
            topk=topk, scale=scale, **shard,
        )  # fmt: skip
    # The arguments are checked: the two steps run without checking them again.
    tables = (block_table, cu_seqlens_q, seq_lens)
    ids, _ = _select_blocks(index_q, index_k_cache, *tables, topk=topk, **shard)
    out, lse = _sparse_attention(q, k_cache, v_cache, *tables, ids, scale=scale, **shard)
    return out, lse, ids


def paged_attention(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal GQA attention of packed queries over this shard's paged cache (the dense
    layers). Shapes and results as ``sparse_attention``."""
    name = "paged_attention"
    tensors = dict(
        q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, cu_seqlens_q=cu_seqlens_q,
        seq_lens=seq_lens,
    )  # fmt: skip
    _check_batch(name, "q", tensors, shard_rank, shard_world)
    _check_attention(name, q, k_cache, v_cache)
    if values_checked(q):
        _check_batch_values(
            name, block_table, cu_seqlens_q, seq_lens, q.shape[0], k_cache.shape, shard_rank, shard_world
        )
    if use_triton(q, k_cache.shape[1], k_cache.shape[3]):
        from msa.kernels.dense_attention.triton import paged_attention_triton

        return paged_attention_triton(
            q,
            k_cache,
            v_cache,
            block_table,
            cu_seqlens_q,
            seq_lens,
            scale=scale,
            shard_rank=shard_rank,
            shard_world=shard_world,
            max_q_len=max_q_len,
        )
    return paged_attention_reference(
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
    )


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial attention ``outs [R, T, H, D]`` with ``lses [R, T, H]`` (natural log):
    lse = log sum_r exp(lse_r), out = sum_r exp(lse_r - lse) out_r. Parts with lse -inf weigh 0."""
    if outs.dim() != 4 or lses.shape != outs.shape[:3]:
        raise ValueError(
            f"merge_attention_states: need outs [R, T, H, D] and lses [R, T, H], got "
            f"{tuple(outs.shape)} and {tuple(lses.shape)}"
        )
    check_same_device("merge_attention_states", "outs", dict(outs=outs, lses=lses))
    if use_triton(outs):
        from msa.kernels.merge.triton import merge_attention_states_triton

        return merge_attention_states_triton(outs, lses)
    return merge_attention_states_reference(outs, lses)


def store_tokens(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``values [N, ...]`` into ``cache [pages, block, ...]`` at flat slots ``page * block +
    offset`` (int64 ``[N]``); rows whose slot is -1 belong to another shard and are skipped."""
    if values.shape[1:] != cache.shape[2:] or slots.shape != values.shape[:1]:
        raise ValueError(
            f"store_tokens: values {tuple(values.shape)} and slots {tuple(slots.shape)} do not fit "
            f"cache {tuple(cache.shape)}"
        )
    check_same_device("store_tokens", "cache", dict(cache=cache, values=values, slots=slots))
    if values_checked(cache):
        check_slots("store_tokens", slots, cache.shape[0] * cache.shape[1])
    if use_triton(cache) and cache.is_contiguous():
        # One kernel that skips -1 rows itself: no host sync, so decode steps can be graph-captured.
        from msa.kernels.store.triton import store_tokens_triton

        store_tokens_triton(cache, values, slots)
        return
    keep = slots >= 0
    flat = cache.view(-1, *cache.shape[2:])
    if not bool(keep.all()):
        values, slots = values[keep], slots[keep]
    flat.index_copy_(0, slots.long(), values.to(cache.dtype))
