"""Pure-PyTorch reference of the MSA indexer: block-max scores and top-k block selection."""

from __future__ import annotations

import math

import torch

from msa.kernels._paged import gather_sequence, query_positions


def block_scores_reference(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    b: int,
    shard_rank: int = 0,
    shard_world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block scores of sequence b's queries over this shard's blocks.

    Returns (scores ``[q_len, G, n_local_blocks]`` fp32 with -inf for blocks not visible,
    global block ids ``[n_local_blocks]``, query positions ``[q_len]``).
    """
    block_size = index_k_cache.shape[1]
    ik, kpos, block_ids = gather_sequence(
        index_k_cache, block_table[b], int(seq_lens[b]), block_size, shard_rank, shard_world
    )
    qpos = query_positions(cu_seqlens_q, seq_lens, b)
    iq = index_q[int(cu_seqlens_q[b]) : int(cu_seqlens_q[b + 1])].float()  # [q, G, D]
    s = torch.einsum("qgd,nd->qgn", iq, ik) / math.sqrt(iq.shape[-1])
    s = s.masked_fill(kpos[None, None, :] > qpos[:, None, None], float("-inf"))
    return s.view(*s.shape[:2], -1, block_size).amax(-1), block_ids, qpos


def order_selection(ids: torch.Tensor, scores: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the best ``topk`` candidates along the last dim (score desc, ties to the lower block id);
    candidates with score -inf are dropped. Returns (ids, scores) ``[..., topk]`` with the kept ids
    in ascending order and -1 (score -inf) after them."""
    ids = ids.long()
    if ids.shape[-1] < topk:
        pad = topk - ids.shape[-1]
        ids = torch.cat([ids, ids.new_full((*ids.shape[:-1], pad), -1)], -1)
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], pad), float("-inf"))], -1)
    scores = scores.masked_fill(ids < 0, float("-inf"))
    big = torch.iinfo(torch.int64).max
    by_id = torch.sort(torch.where(ids < 0, big, ids), dim=-1, stable=True).indices
    ids, scores = ids.gather(-1, by_id), scores.gather(-1, by_id)
    by_score = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :topk]
    ids, scores = ids.gather(-1, by_score), scores.gather(-1, by_score)
    ids = torch.where(torch.isneginf(scores), -1, ids)
    asc = torch.sort(torch.where(ids < 0, big, ids), dim=-1, stable=True).indices
    return ids.gather(-1, asc), scores.gather(-1, asc)


def select_blocks_reference(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    topk: int,
    shard_rank: int = 0,
    shard_world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``msa.kernels.select_blocks``."""
    T, G, _ = index_q.shape
    block_size = index_k_cache.shape[1]
    out_ids = torch.full((T, G, topk), -1, dtype=torch.int32, device=index_q.device)
    out_scores = torch.full((T, G, topk), float("-inf"), dtype=torch.float32, device=index_q.device)
    for b in range(seq_lens.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if end == start:
            continue
        scores, block_ids, qpos = block_scores_reference(
            index_q, index_k_cache, block_table, cu_seqlens_q, seq_lens, b, shard_rank, shard_world
        )
        local = (qpos // block_size)[:, None, None] == block_ids[None, None, :]
        scores = scores.masked_fill(local, float("inf"))
        ids = block_ids.expand_as(scores)
        sel_ids, sel_scores = order_selection(ids, scores, topk)
        out_ids[start:end] = sel_ids.int()
        out_scores[start:end] = sel_scores
    return out_ids, out_scores
