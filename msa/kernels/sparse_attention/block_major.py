"""Block-major MSA prefill: programs own a selected block and the tokens that chose it.

The query-tile kernel (``triton.py``) reads K/V per tile of query tokens. When neighbouring tokens
select unrelated blocks (a long chunk over a long prefix), every token pays the read of its own
``topk`` blocks (16 x 64 KB per KV group for M3), and those reads, mostly from L2, bound it. Here
the selection is inverted instead: entries (token, KV group, slot) are grouped by (sequence, group,
block) on the device (a counting sort, no host sync), and one program takes one block and up to
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


@triton.jit(
    do_not_specialize=["n_groups", "table_width", "n_seg", "t0", "stride_bt", "stride_os", "stride_ls"]
)
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
    tile_end_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    shard_rank,
    shard_world,
    n_groups,
    table_width,
    n_seg,
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
    """Program = one tile of a segment: up to TILE_TOKENS planned entries that selected block
    ``local`` of sequence ``b`` in KV group ``g`` (segment id ``(b * n_groups + g) * table_width +
    local``); programs past the plan's tile count (``tile_end[n_seg - 1]``) are spares of the
    grid's upper bound."""
    if tl.program_id(0) >= tl.load(tile_end_ptr + n_seg - 1):
        return
    seg = tl.load(tile_seg_ptr + tl.program_id(0))
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
    return torch.searchsorted(cu_seqlens_q[1:], tokens, right=True, out_int32=True)


@triton.jit
def _entry_segments(ids_ptr, token_seq_ptr, keep_ptr, e, E, shard_rank, shard_world, table_width, G, K, KEEP):
    """Segment ``(seq * G + g) * table_width + local block`` of entries ``e`` (token, group,
    slot), -1 for one off this shard, unused, past ``E`` or (``KEEP``) of a pair not kept."""
    ok = e < E
    blk = tl.load(ids_ptr + e, mask=ok, other=-1)
    mine = ok & (blk >= 0) & ((blk - shard_rank) % shard_world == 0)
    if KEEP:
        mine = mine & (tl.load(keep_ptr + e // K, mask=ok, other=0) != 0)
    seq = tl.load(token_seq_ptr + e // (G * K), mask=ok, other=0)
    seg = (seq * G + (e // K) % G) * table_width + (blk - shard_rank) // shard_world
    return tl.where(mine, seg, -1)


@triton.jit(do_not_specialize=["E", "table_width"])
def _rank_entries_kernel(
    ids_ptr, token_seq_ptr, keep_ptr, counts_ptr, rank_ptr, E, shard_rank, shard_world, table_width,
    G: tl.constexpr, K: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Count each segment's entries; each entry's rank among them (the order of the atomic
    increments, -1 for no segment)."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seg = _entry_segments(
        ids_ptr, token_seq_ptr, keep_ptr, e, E, shard_rank, shard_world, table_width, G, K, KEEP
    )
    rank = tl.atomic_add(counts_ptr + seg, 1, mask=seg >= 0, sem="relaxed")
    tl.store(rank_ptr + e, tl.where(seg >= 0, rank, -1), mask=e < E)


@triton.jit(do_not_specialize=["n_seg"])
def _scan_segments_kernel(
    counts_ptr, seg_end_ptr, tile_end_ptr, n_seg, TILE_TOKENS: tl.constexpr, BLOCK: tl.constexpr
):
    """One program: each segment's end in the order (inclusive scan of the counts) and the end of
    its tiles (inclusive scan of ``ceil(count / TILE_TOKENS)``)."""
    entries = 0
    tiles = 0
    for s0 in range(0, n_seg, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        count = tl.load(counts_ptr + s, mask=s < n_seg, other=0)
        seg_tiles = (count + TILE_TOKENS - 1) // TILE_TOKENS
        tl.store(seg_end_ptr + s, entries + tl.cumsum(count, 0), mask=s < n_seg)
        tl.store(tile_end_ptr + s, tiles + tl.cumsum(seg_tiles, 0), mask=s < n_seg)
        entries += tl.sum(count, 0)
        tiles += tl.sum(seg_tiles, 0)


@triton.jit(do_not_specialize=["E", "table_width"])
def _place_entries_kernel(
    ids_ptr, token_seq_ptr, keep_ptr, counts_ptr, rank_ptr, seg_end_ptr, tile_end_ptr, order_ptr,
    tile_seg_ptr, tile_first_ptr, E, shard_rank, shard_world, table_width,
    G: tl.constexpr, K: tl.constexpr, KEEP: tl.constexpr, TILE_TOKENS: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Each entry to its place in the order (its segment's start plus its rank); the first entry
    of every tile writes the tile's segment and first place."""
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    seg = _entry_segments(
        ids_ptr, token_seq_ptr, keep_ptr, e, E, shard_rank, shard_world, table_width, G, K, KEEP
    )
    mine = seg >= 0
    rank = tl.load(rank_ptr + e, mask=mine, other=0)
    count = tl.load(counts_ptr + seg, mask=mine, other=0)
    place = tl.load(seg_end_ptr + seg, mask=mine, other=0) - count + rank
    tl.store(order_ptr + place, e, mask=mine)
    tile = tl.load(tile_end_ptr + seg, mask=mine, other=0) - (count + TILE_TOKENS - 1) // TILE_TOKENS
    tile += rank // TILE_TOKENS
    lead = mine & (rank % TILE_TOKENS == 0)
    tl.store(tile_seg_ptr + tile, seg, mask=lead)
    tl.store(tile_first_ptr + tile, place, mask=lead)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Invert a selection ``block_ids [T, G, K]`` (global ids, -1 unused) of tokens whose sequences
    are ``token_seq [T]``: entries ``(t * G + g) * K + slot`` on this shard (and, given ``keep
    [T, G]`` (nonzero: kept), of kept (token, group) pairs only), grouped by segment ``(seq * G +
    g) * table_width + local block`` (segments ascending, entries of one segment in no set
    order), cut into tiles of at most ``tile_tokens`` entries of one segment.

    A counting sort in three launches, with no host sync: count and rank each segment's entries
    (atomics), scan the counts, place the entries. Returns (order ``[E]`` entry ids in segment
    order, tile_seg ``[n]`` segment of each tile, tile_first ``[n]`` its first place in ``order``,
    seg_end ``[S]`` end of each segment in ``order``, tile_end ``[S]`` end of each segment's tiles,
    so ``tile_end[-1]`` tiles are real), all int32. ``n`` is an upper bound of the tile count,
    ``E // tile_tokens`` full tiles plus one partial tile per segment; the rest are spare."""
    T, G, K = block_ids.shape
    dev, i32 = block_ids.device, torch.int32
    E = T * G * K
    n_seg = n_seqs * G * table_width
    if max(E, n_seg) >= 1 << 31:
        raise ValueError(f"plan_block_major: {E} entries over {n_seg} segments overflow int32")
    ids = block_ids.contiguous()
    keep_arg = ids if keep is None else keep.contiguous()
    counts = torch.zeros(n_seg, dtype=i32, device=dev)
    rank = torch.empty(E, dtype=i32, device=dev)
    seg_end = torch.empty(n_seg, dtype=i32, device=dev)
    tile_end = torch.empty(n_seg, dtype=i32, device=dev)
    order = torch.empty(E, dtype=i32, device=dev)
    n_tiles = max(1, E // tile_tokens + min(n_seg, E))
    tile_seg = torch.empty(n_tiles, dtype=i32, device=dev)
    tile_first = torch.empty(n_tiles, dtype=i32, device=dev)
    block = 1024
    common = dict(G=G, K=K, KEEP=keep is not None, BLOCK=block)
    grid = (triton.cdiv(E, block),)
    shard = (shard_rank, shard_world, table_width)
    _rank_entries_kernel[grid](ids, token_seq, keep_arg, counts, rank, E, *shard, **common)
    # One program scans every segment: a few steps for one long sequence (32K segments at 1M
    # tokens), more for a batch of many sequences with wide tables.
    _scan_segments_kernel[(1,)](
        counts, seg_end, tile_end, n_seg, TILE_TOKENS=tile_tokens, BLOCK=4096, num_warps=8
    )
    _place_entries_kernel[grid](
        ids, token_seq, keep_arg, counts, rank, seg_end, tile_end, order, tile_seg, tile_first, E, *shard,
        TILE_TOKENS=tile_tokens, **common,
    )  # fmt: skip
    return order, tile_seg, tile_first, seg_end, tile_end


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
        order, tile_seg, tile_first, seg_end, tile_end = plan_block_major(
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
            tile_end,
            part_out,
            part_lse,
            scale * LOG2E,
            shard_rank,
            shard_world,
            G,
            block_table.shape[1],
            seg_end.numel(),
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
