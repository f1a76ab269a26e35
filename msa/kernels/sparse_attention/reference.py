"""Pure-PyTorch reference of attention over a paged KV cache: block-sparse (MSA) and dense causal."""

from __future__ import annotations

import torch

from msa.kernels._paged import gather_sequence, query_positions


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor | None,
    *,
    scale: float,
    shard_rank: int = 0,
    shard_world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal GQA attention of packed queries over this shard's cached keys, restricted to the
    selected blocks when ``block_ids`` (``[T, H_kv, K]`` global ids, -1 unused) is given.
    Returns (out ``[T, H, D]`` in q's dtype, lse ``[T, H]`` fp32; -inf and zeros where no key is seen)."""
    T, H, D = q.shape
    H_kv = k_cache.shape[2]
    group = H // H_kv
    block_size = k_cache.shape[1]
    out = torch.zeros(T, H, v_cache.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((T, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(seq_lens.shape[0]):
        start, end = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        if end == start:
            continue
        seq_len = int(seq_lens[b])
        k, kpos, _ = gather_sequence(k_cache, block_table[b], seq_len, block_size, shard_rank, shard_world)
        v, _, _ = gather_sequence(v_cache, block_table[b], seq_len, block_size, shard_rank, shard_world)
        qpos = query_positions(cu_seqlens_q, seq_lens, b)
        allowed = (kpos[None, :] <= qpos[:, None])[:, None, :].expand(-1, H_kv, -1)  # [q, H_kv, n]
        if block_ids is not None:
            chosen = block_ids[start:end].long()  # [q, H_kv, K]
            in_set = (chosen[..., None] == (kpos // block_size)[None, None, None, :]).any(-2)
            allowed = allowed & in_set
        qs = q[start:end].float().view(end - start, H_kv, group, D)
        s = torch.einsum("qhgd,nhd->qhgn", qs, k) * scale
        s = s.masked_fill(~allowed[:, :, None, :], float("-inf"))
        seq_lse = torch.logsumexp(s, dim=-1)  # [q, H_kv, group]
        p = torch.exp(s - torch.where(torch.isneginf(seq_lse), 0.0, seq_lse)[..., None])
        o = torch.einsum("qhgn,nhd->qhgd", p, v)
        out[start:end] = o.reshape(end - start, H, -1)
        lse[start:end] = seq_lse.reshape(end - start, H)
    return out.to(q.dtype), lse
