"""Block-major MSA prefill: programs own a selected block and the tokens that chose it.

The query-tile kernel (``triton.py``) reads K/V per tile of query tokens. When neighbouring tokens
select unrelated blocks (a long chunk over a long prefix), every token pays the read of its own
``topk`` blocks (16 x 64 KB per KV group for M3), and those reads, mostly from L2, bound it. Here
the selection is inverted instead: entries (token, KV group, slot) are sorted by (sequence, group,
block) on the device (a stable sort, no host sync), and one program takes one block and up to
``tile_tokens`` of the tokens that selected it. It reads the block's K/V once and walks its tokens
``block_t`` at a time (rows = tokens x heads of the group), so what moves per (token, block) is
the token's query rows and its partial result (4 KB each for M3) rather than 64 KB of K/V. Each
program writes its block's softmax partial (out, lse) into the token's slot; a log-sum-exp merge
over the slots gives the output. Partials take ``topk x T x H x (D + 2)`` values of scratch, so a
long chunk goes in passes of tokens under ``max_partial_bytes``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from msa.kernels._launch import next_pow2, paged_input_strides
from msa.kernels.merge.triton import merge_states_into
from msa.kernels.sparse_attention.softmax import LOG2E, softmax_tile

# Scratch for the partial results of one pass (query tokens are taken in passes that fit): an
# 8K-token chunk of M3 (64 heads, top-16) needs 2.1 GiB; each extra pass costs its own plan and
# merge launches.
MAX_PARTIAL_BYTES = 5 << 29


@triton.jit(do_not_specialize=["n_groups", "table_width", "t0", "stride_bt", "stride_os", "stride_ls"])
def _block_major_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_table_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    order_ptr,
    tile_seg_ptr,
    tile_first_ptr,
    seg_end_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    shard_rank,
    shard_world,
    n_groups,
    table_width,
    t0,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lt,
    HEADS_PER_GROUP: tl.constexpr,
    HEADS_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    TILE_TOKENS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Program = one tile of a segment: up to TILE_TOKENS sorted entries that selected block
    ``local`` of sequence ``b`` in KV group ``g`` (segment id ``(b * n_groups + g) * table_width +
    local``); -1 marks a spare program of the grid's upper bound."""
    seg = tl.load(tile_seg_ptr + tl.program_id(0))
    if seg < 0:
        return
    first = tl.load(tile_first_ptr + tl.program_id(0))
    end = tl.minimum(tl.load(seg_end_ptr + seg), first + TILE_TOKENS)
    local = seg % table_width
    g = (seg // table_width) % n_groups
    b = seg // table_width // n_groups
    page = tl.load(block_table_ptr + b * stride_bt + local).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    q_start = tl.load(cu_q_ptr + b)
    first_pos = seq_len - (tl.load(cu_q_ptr + b + 1) - q_start)  # position of the first query

    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_SIZE)
    kpos = (shard_rank + local * shard_world) * BLOCK_SIZE + offs_s
    written = kpos < seq_len
    k = tl.load(
        k_ptr + page * stride_kp + offs_s[:, None] * stride_ks + g * stride_kh + offs_d[None, :],
        mask=written[:, None],
        other=0.0,
    )
    v = tl.load(
        v_ptr + page * stride_vp + offs_s[:, None] * stride_vs + g * stride_vh + offs_d[None, :],
        mask=written[:, None],
        other=0.0,
    )
    # A block that ends before the chunk's first query is whole to every query: no mask.
    whole = (shard_rank + local * shard_world) * BLOCK_SIZE + BLOCK_SIZE <= first_pos
    M: tl.constexpr = BLOCK_T * HEADS_P
    rows = tl.arange(0, M)
    h = rows % HEADS_P
    head = g * HEADS_PER_GROUP + h
    # Each step's rows are gathered a step ahead (their entries two steps ahead), so the gather's
    # chain of loads (entry, then query) runs under the step before instead of stalling its own.
    entry, row_ok = _entries(order_ptr, first, end, rows, HEADS_P, HEADS_PER_GROUP)
    q = _queries(q_ptr, entry // (n_groups * TOPK) + t0, head, row_ok, stride_qt, stride_qh, offs_d)
    entry_next, ok_next = _entries(order_ptr, first + BLOCK_T, end, rows, HEADS_P, HEADS_PER_GROUP)
    for e0 in range(first, end, BLOCK_T):
        q_next = _queries(
            q_ptr, entry_next // (n_groups * TOPK) + t0, head, ok_next, stride_qt, stride_qh, offs_d
        )
        entry_after, ok_after = _entries(order_ptr, e0 + 2 * BLOCK_T, end, rows, HEADS_P, HEADS_PER_GROUP)
        tok = entry // (n_groups * TOPK)  # (token, group, slot) of this pass
        slot = entry % TOPK
        if whole:
            out, lse = softmax_tile(q, k.to(q.dtype), v, None, qk_scale, IEEE)
        else:
            qpos = first_pos + t0 + tok - q_start
            out, lse = softmax_tile(q, k.to(q.dtype), v, kpos[None, :] <= qpos[:, None], qk_scale, IEEE)
        o_rows = part_out_ptr + (slot * stride_os + tok * stride_ot + head * stride_oh)  # [M] pointers
        tl.store(
            o_rows[:, None] + offs_d[None, :], out.to(part_out_ptr.dtype.element_ty), mask=row_ok[:, None]
        )
        tl.store(part_lse_ptr + slot * stride_ls + tok * stride_lt + head, lse, mask=row_ok)
        q, entry, row_ok = q_next, entry_next, ok_next
        entry_next, ok_next = entry_after, ok_after


@triton.jit
def _entries(order_ptr, e0, end, rows, HEADS_P: tl.constexpr, HEADS_PER_GROUP: tl.constexpr):
    """The planned entries of the step at ``e0`` (one per row: BLOCK_T entries x HEADS_P heads) and
    which rows are real."""
    e = e0 + rows // HEADS_P
    ok = (e < end) & (rows % HEADS_P < HEADS_PER_GROUP)
    return tl.load(order_ptr + e, mask=ok, other=0), ok


@triton.jit
def _queries(q_ptr, tok, head, ok, stride_qt, stride_qh, offs_d):
    rows = q_ptr + (tok * stride_qt + head * stride_qh)  # [M] pointers: one add per element below
    return tl.load(rows[:, None] + offs_d[None, :], mask=ok[:, None], other=0.0)


def token_sequences(cu_seqlens_q: torch.Tensor, T: int) -> torch.Tensor:
    """The sequence of each of the ``T`` packed query tokens, ``[T]`` int32."""
    tokens = torch.arange(T, device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype)
    return torch.searchsorted(cu_seqlens_q[1:], tokens, right=True).int()


def plan_block_major(
    block_ids: torch.Tensor,
    token_seq: torch.Tensor,
    *,
    n_seqs: int,
    table_width: int,
    shard_rank: int,
    shard_world: int,
    tile_tokens: int,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert a selection ``block_ids [T, G, K]`` (global ids, -1 unused) of tokens whose sequences
    are ``token_seq [T]``: entries ``(t * G + g) * K + slot`` on this shard (and, given ``keep
    [T, G]`` bool, of kept (token, group) pairs only), sorted stably by segment ``(seq * G + g) *
    table_width + local block``, cut into tiles of at most ``tile_tokens`` entries of one segment.

    Returns (order ``[E]`` entry ids in segment order, tile_seg ``[n]`` segment of each tile or -1
    for a spare one, tile_first ``[n]`` its first position in ``order``, seg_end ``[S]`` end of
    each segment in ``order``), all int32. No host sync: the number of tiles is an upper bound,
    ``E // tile_tokens`` full tiles plus one partial tile per segment."""
    _, G, K = block_ids.shape
    dev, i32 = block_ids.device, torch.int32
    ids = block_ids.reshape(-1)
    E = ids.numel()
    n_seg = n_seqs * G * table_width
    if max(E, n_seg) >= 1 << 31:
        raise ValueError(f"plan_block_major: {E} entries over {n_seg} segments overflow int32")
    # int32 throughout: half the bytes of int64 per op, and half the radix passes of the sort.
    e = torch.arange(E, device=dev, dtype=i32)
    seq = token_seq.index_select(0, e // (G * K))
    group = (e // K) % G
    mine = (ids >= 0) & ((ids - shard_rank) % shard_world == 0)
    if keep is not None:
        mine &= keep.reshape(-1).index_select(0, e // K)
    key = torch.where(mine, (seq * G + group) * table_width + (ids - shard_rank) // shard_world, n_seg)
    key, order = torch.sort(key, stable=True)
    segs = torch.arange(n_seg, device=dev, dtype=i32)
    seg_end = torch.searchsorted(key, segs, right=True, out_int32=True)
    counts = seg_end - torch.searchsorted(key, segs, out_int32=True)
    tiles = (counts + tile_tokens - 1) // tile_tokens
    tile_end = tiles.cumsum(0, dtype=i32)
    tile = torch.arange(max(1, E // tile_tokens + min(n_seg, E)), device=dev, dtype=i32)
    tile_seg = torch.searchsorted(tile_end, tile, right=True, out_int32=True)
    s = tile_seg.clamp(max=n_seg - 1)
    seg_start, tile_start = seg_end - counts, tile_end - tiles
    tile_first = seg_start.index_select(0, s) + (tile - tile_start.index_select(0, s)) * tile_tokens
    tile_seg = torch.where(tile_seg < n_seg, tile_seg, -1)
    return order.int(), tile_seg, tile_first, seg_end


def block_major_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    shard_rank: int,
    shard_world: int,
    block_t: int | None = None,
    tile_tokens: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_partial_bytes: int | None = None,
    keep: torch.Tensor | None = None,
    token_seq: torch.Tensor | None = None,
) -> None:
    """MSA attention of packed queries into ``out [T, H, D]``, ``lse [T, H]`` (zeros and -inf where
    a query sees no key on this shard), block-major (module docstring). Arguments as
    ``sparse_attention_triton``, checked by its launcher; ``block_t`` (tokens per ``tl.dot``) and
    ``tile_tokens`` (tokens per program) and ``max_partial_bytes`` (scratch per pass) override
    the defaults. With ``keep [T, G]`` bool only the kept (token, KV group) pairs are computed and
    written: the rest of ``out`` and ``lse`` is left as it was. ``token_seq`` as from
    ``token_sequences``, if the caller has it."""
    T, H, D = q.shape
    G, K = block_ids.shape[1], block_ids.shape[2]
    group = H // G
    heads_p = next_pow2(group)
    block_t = block_t or max(1, 64 // heads_p)
    block_t = max(block_t, triton.cdiv(16, heads_p))  # tl.dot needs M >= 16
    tile_tokens = max(tile_tokens or 16 * block_t, block_t)
    dev = q.device
    if token_seq is None:
        token_seq = token_sequences(cu_seqlens_q, T)
    per_token = K * H * (D * q.element_size() + 4)
    step = max(1, min(T, (max_partial_bytes or MAX_PARTIAL_BYTES) // per_token))
    part_out = torch.empty(K, step, H, D, dtype=q.dtype, device=dev)
    part_lse = torch.empty(K, step, H, dtype=torch.float32, device=dev)
    ids = block_ids.contiguous()
    for t0 in range(0, T, step):
        n = min(step, T - t0)
        part_lse.fill_(float("-inf"))  # slots no program visits weigh 0 in the merge
        order, tile_seg, tile_first, seg_end = plan_block_major(
            ids[t0 : t0 + n],
            token_seq[t0 : t0 + n],
            n_seqs=seq_lens.shape[0],
            table_width=block_table.shape[1],
            shard_rank=shard_rank,
            shard_world=shard_world,
            tile_tokens=tile_tokens,
            keep=None if keep is None else keep[t0 : t0 + n],
        )
        _block_major_kernel[(tile_seg.numel(),)](
            q,
            k_cache,
            v_cache,
            block_table,
            cu_seqlens_q,
            seq_lens,
            order,
            tile_seg,
            tile_first,
            seg_end,
            part_out,
            part_lse,
            scale * LOG2E,
            shard_rank,
            shard_world,
            G,
            block_table.shape[1],
            t0,
            *paged_input_strides(q, k_cache, v_cache, block_table),
            *part_out.stride()[:3],
            *part_lse.stride()[:2],
            HEADS_PER_GROUP=group,
            HEADS_P=heads_p,
            BLOCK_T=block_t,
            TILE_TOKENS=tile_tokens,
            HEAD_DIM=D,
            BLOCK_SIZE=k_cache.shape[1],
            TOPK=K,
            IEEE=q.dtype == torch.float32,
            num_warps=num_warps or (4 if block_t * heads_p <= 64 else 8),
            num_stages=num_stages or 2,
        )
        merge_states_into(
            part_out[:, :n],
            part_lse[:, :n],
            out[t0 : t0 + n],
            lse[t0 : t0 + n],
            None if keep is None else keep[t0 : t0 + n],
        )
