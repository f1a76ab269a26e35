"""Triton split-K attention over a paged KV cache: block-sparse (MSA) and dense causal.

One program owns a tile of ``BLOCK_T`` query tokens of one sequence and one KV group, so the
group's query heads and tokens form the rows of one ``tl.dot`` (M = BLOCK_T x heads per group):
each K/V block is read once for all of them. In sparse mode the program walks the union of the
tile's selected blocks in ascending order (each row only sees its own token's blocks), which a
light launch before it lists per tile (``_tile_plan_kernel``); in dense mode it walks every
visible block of this shard. Decode splits that walk over ``num_splits``
programs (split-K) writing fp32 partials, merged by log-sum-exp: in a second launch with one
program per (token, head) while the split grid is a wave or two, else by the last split of each
(tile, group) to finish, known by an atomic ticket, in the same launch. The tile kernel reads K/V
blocks by TMA where the caches allow it (Hopper), else by pointer loads masked past seq_len.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from msa.kernels._checks import check_shard
from msa.kernels._launch import (
    block_descriptor,
    check_int32,
    check_last_dim_contiguous,
    max_query_len,
    next_pow2,
    num_sms,
    paged_input_strides,
    pdl,
    splits_bucket,
    tickets,
)
from msa.kernels.indexer.triton import (
    check_selection_inputs,
    launch_candidate_picks,
    launch_chunk_scores,
    select_blocks_triton,
    take_selection,
)
from msa.kernels.merge.triton import MAX_LATENCY_BOUND_PARTS, finish_merge, merge_states_into, merge_weights
from msa.kernels.sparse_attention.block_major import block_major_attention
from msa.kernels.sparse_attention.softmax import LOG2E, normalize_softmax, online_softmax_step, softmax_tile


@triton.jit
def _combine_last(
    ticket_ptr,
    num_splits,
    part_out_ptrs,
    part_lse_ptrs,
    stride_os,
    stride_ls,
    final_out_ptrs,
    final_lse_ptrs,
    row_ok,
    M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_P: tl.constexpr,
):
    """Called by every split after writing its partial ``(out, lse)`` rows; the last split of the
    unit to arrive merges all ``num_splits`` (<= ``SPLITS_P``) partials by log-sum-exp (a split
    that saw no key has lse -inf and weighs 0), writes the final rows and re-zeroes the unit's
    ticket. All partial lse come in one load and the partial outputs in an unrolled loop, so the
    reads overlap instead of waiting on each other."""
    tl.debug_barrier()  # every thread's partial is stored before the ticket is taken
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == num_splits - 1:
        r = tl.arange(0, SPLITS_P)
        part_ok = (r < num_splits)[:, None] & row_ok[None, :]
        lses = tl.load(
            part_lse_ptrs[None, :] + r[:, None] * stride_ls,
            mask=part_ok,
            other=float("-inf"),
            cache_modifier=".cg",
        )  # [SPLITS_P, M]
        w, m, total = merge_weights(lses)
        merged = tl.zeros([M, HEAD_DIM], tl.float32)
        for i in tl.static_range(SPLITS_P):
            if i < num_splits:
                o_i = tl.load(
                    part_out_ptrs + i * stride_os, mask=row_ok[:, None], other=0.0, cache_modifier=".cg"
                )
                w_i = tl.sum(tl.where(r[:, None] == i, w, 0.0), 0)  # [M]
                merged += w_i[:, None] * o_i
        final, final_lse = finish_merge(merged, m, total)
        tl.store(final_out_ptrs, final.to(final_out_ptrs.dtype.element_ty), mask=row_ok[:, None])
        tl.store(final_lse_ptrs, final_lse, mask=row_ok)
        tl.store(ticket_ptr, 0)  # ready for the next launch


# The selection's strides follow the candidate count when the kernel takes the top-k itself.
@triton.jit(do_not_specialize=["n_slots", "table_width", "stride_bt", "stride_ls", "stride_it", "stride_ig"])
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_table_ptr,
    seq_lens_ptr,
    ids_ptr,
    out_ptr,
    lse_ptr,
    final_out_ptr,
    final_lse_ptr,
    tickets_ptr,
    sel_ids_ptr,
    sel_scores_ptr,
    qk_scale,
    shard_rank,
    shard_world,
    table_width,
    n_slots,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_it,
    stride_ig,
    stride_os,
    stride_ot,
    stride_oh,
    stride_ls,
    stride_lt,
    stride_fot,
    stride_foh,
    stride_flt,
    stride_sit,
    stride_sig,
    stride_sst,
    stride_ssg,
    HEADS_PER_GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    PER_SPLIT: tl.constexpr,
    SPARSE: tl.constexpr,
    IEEE: tl.constexpr,
    COMBINE: tl.constexpr,
    SPLITS_P: tl.constexpr,
    PDL: tl.constexpr,
    TABLE_P: tl.constexpr,
    LAUNCH_DEPENDENTS: tl.constexpr,
    CAND_P: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
):
    """Decode (one query per sequence): program (sequence, group, split) attends over the
    ``PER_SPLIT`` blocks in slots ``split * PER_SPLIT ...`` (of the selection, or dense: of the
    shard's blocks), loading them all at once. No query offsets to read (token = sequence) and no
    loop: the chain is ids -> pages -> K/V. With ``CAND_P`` the ids are the selection's candidate
    keys (``n_slots`` per sequence and group): each program takes their top-``TOPK`` itself and
    split 0 writes the selection to ``sel_ids``/``sel_scores``."""
    b = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    if PDL:
        gdc_wait()  # launched early: the selection (and everything before it) is visible from here on
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()  # the merge launch may start: it waits for the partials
    rows = tl.arange(0, ROWS)
    head = g * HEADS_PER_GROUP + rows
    row_ok = rows < HEADS_PER_GROUP
    offs_d = tl.arange(0, HEAD_DIM)
    offs_s = tl.arange(0, BLOCK_SIZE)
    slot = split * PER_SPLIT + tl.arange(0, PER_SPLIT)
    seq_len = tl.load(seq_lens_ptr + b)
    row = block_table_ptr + b * stride_bt
    if SPARSE:  # the slots of the selection: global block ids
        if TABLE_P > 0:
            # A narrow block table comes whole, read beside the selection instead of after it.
            cols = tl.arange(0, TABLE_P)
            table = tl.load(row + cols, mask=cols < table_width, other=0)
        if CAND_P > 0:
            blk = take_selection(
                ids_ptr + b * stride_it + g * stride_ig,
                n_slots,
                slot,
                sel_ids_ptr + b * stride_sit + g * stride_sig,
                sel_scores_ptr + b * stride_sst + g * stride_ssg,
                split == 0,
                TOPK,
                TOPK_P,
                CAND_P,
            )
        else:
            blk = tl.load(ids_ptr + b * stride_it + g * stride_ig + slot, mask=slot < n_slots, other=-1)
        mine = (blk >= 0) & ((blk - shard_rank) % shard_world == 0)
        local = (blk - shard_rank) // shard_world
        if TABLE_P > 0:
            page = tl.sum(tl.where(cols[None, :] == local[:, None], table[None, :], 0), 1).to(tl.int64)
        else:
            page = tl.load(row + local, mask=mine, other=0).to(tl.int64)
    else:  # the slots are this shard's blocks in order (n_slots: the block table's width)
        local = slot
        blk = shard_rank + slot * shard_world
        # Masked by the table's width, so the read need not wait for seq_len (a page past the
        # sequence only addresses loads that `live` turns off).
        page = tl.load(row + local, mask=slot < n_slots, other=0).to(tl.int64)
        mine = (slot < n_slots) & (blk * BLOCK_SIZE < seq_len)
    q = tl.load(
        q_ptr + b * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    kpos = blk[:, None] * BLOCK_SIZE + offs_s[None, :]  # [PER_SPLIT, BLOCK_SIZE]
    live = mine[:, None] & (kpos < seq_len)  # the one query sits at seq_len - 1: sees every written key
    k = tl.load(
        k_ptr
        + page[:, None, None] * stride_kp
        + offs_s[None, :, None] * stride_ks
        + g * stride_kh
        + offs_d[None, None, :],
        mask=live[:, :, None],
        other=0.0,
    )
    v = tl.load(
        v_ptr
        + page[:, None, None] * stride_vp
        + offs_s[None, :, None] * stride_vs
        + g * stride_vh
        + offs_d[None, None, :],
        mask=live[:, :, None],
        other=0.0,
    )
    N: tl.constexpr = PER_SPLIT * BLOCK_SIZE
    k = tl.reshape(k, [N, HEAD_DIM]).to(q.dtype)
    v = tl.reshape(v, [N, HEAD_DIM])
    out, lse = softmax_tile(q, k, v, tl.reshape(live, [N])[None, :], qk_scale, IEEE)
    o_rows = b * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr + split * stride_os + o_rows, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    tl.store(lse_ptr + split * stride_ls + b * stride_lt + head, lse, mask=row_ok)
    if COMBINE:
        _combine_last(
            tickets_ptr + b * tl.num_programs(1) + g,
            tl.num_programs(2),
            out_ptr + o_rows,
            lse_ptr + b * stride_lt + head,
            stride_os,
            stride_ls,
            final_out_ptr + b * stride_fot + head[:, None] * stride_foh + offs_d[None, :],
            final_lse_ptr + b * stride_flt + head,
            row_ok,
            ROWS,
            HEAD_DIM,
            SPLITS_P,
        )


@triton.jit
def _tile_tokens(cu_q_ptr, pid, tiles_per_seq, BLOCK_T: tl.constexpr):
    """Tile ``pid`` of a launch of ``tiles_per_seq`` tiles per sequence: (sequence, its first and
    end query row, the tile's first row); the tile is empty when its first row is not under the end."""
    b = pid // tiles_per_seq
    q_start = tl.load(cu_q_ptr + b)
    q_end = tl.load(cu_q_ptr + b + 1)
    return b, q_start, q_end, q_start + (pid % tiles_per_seq) * BLOCK_T


@triton.jit
def _or_within_runs(start_a, bits_a, start_b, bits_b):
    """Scan step of an OR that restarts where ``start`` is set."""
    return start_a | start_b, tl.where(start_b != 0, bits_b, bits_a | bits_b)


@triton.jit(do_not_specialize=["tiles_per_seq", "union_max", "stride_bt", "stride_it", "stride_ig"])
def _tile_plan_kernel(
    ids_ptr,
    block_table_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    plan_ptr,
    count_ptr,
    crowded_ptr,
    keep_ptr,
    token_seq_ptr,
    shard_rank,
    shard_world,
    tiles_per_seq,
    union_max,
    stride_bt,
    stride_it,
    stride_ig,
    BLOCK_T: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    CROWDING: tl.constexpr,
):
    """Program = (tile of ``BLOCK_T`` query tokens, KV group) of a sparse prefill launch: the union
    of its tokens' selected blocks on this shard that its last token can see, ascending, into its
    row of ``plan`` (N ids, their N pages, then N masks of the tokens that chose them, bit t for the
    tile's token t; N = BLOCK_T x TOPK_P) and its size into ``count``
    (0 for a tile past its sequence's end). With ``CROWDING`` (the first of two passes) a union
    over ``union_max`` blocks is not planned: ``crowded`` gets 1 and ``count`` -1, and the
    attention kernel's program for the tile returns at once; the flag also goes to ``keep [T, G]``
    for each of the tile's tokens, and each token's sequence to ``token_seq [T]`` (what the
    block-major pass takes). One warp of few registers (many
    programs to an SM) sorts the tile's ids, so the attention kernel (few programs to an SM)
    spends none of its time on this, nor on a crowded tile."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    unit = pid * tl.num_programs(1) + g
    b, q_start, q_end, t0 = _tile_tokens(cu_q_ptr, pid, tiles_per_seq, BLOCK_T)
    if t0 >= q_end:  # past the sequence's end (the launch is sized by the longest): nothing to plan
        tl.store(count_ptr + unit, 0)
        return
    N: tl.constexpr = BLOCK_T * TOPK_P
    flat = tl.arange(0, N)
    ftok = t0 + flat // TOPK_P
    cand = tl.load(
        ids_ptr + ftok * stride_it + g * stride_ig + flat % TOPK_P,
        mask=(ftok < q_end) & (flat % TOPK_P < TOPK),
        other=-1,
    )
    # A block past the tile's last query is invisible to every row: never planned, so the walk
    # ends at the sequence's last (maybe partial) block at the latest.
    last_qpos = tl.load(seq_lens_ptr + b) - q_end + tl.minimum(t0 + BLOCK_T, q_end) - 1
    on_shard = (cand >= 0) & ((cand - shard_rank) % shard_world == 0) & (cand <= last_qpos // BLOCK_SIZE)
    # Sorted as (id, token of the tile), the distinct ids are those unlike their left neighbour;
    # off-shard ones sort last. (Ids stay under 2**31 / BLOCK_T: 2**26 blocks for the largest tile.)
    keys = tl.sort(tl.where(on_shard, cand * BLOCK_T + flat // TOPK_P, 2147483647))
    planned = keys != 2147483647
    ids = tl.where(planned, keys // BLOCK_T, 2147483647)
    left = tl.gather(ids, tl.maximum(flat - 1, 0), 0)
    right = tl.gather(ids, tl.minimum(flat + 1, N - 1), 0)
    first = planned & ((flat == 0) | (ids != left))
    last = planned & ((flat == N - 1) | (ids != right))
    rank = tl.cumsum(first.to(tl.int32), 0) - 1  # [N] place among the distinct ids
    # Which of the tile's tokens chose each id: one bit per token, OR-ed over the id's run.
    _, chosen_by = tl.associative_scan(
        (first.to(tl.int32), tl.where(planned, 1 << (keys % BLOCK_T), 0)), 0, _or_within_runs
    )
    n_iter = tl.sum(first.to(tl.int32), 0)
    if CROWDING:
        crowded = n_iter > union_max
        tl.store(crowded_ptr + unit, crowded.to(tl.int8))
        toks = t0 + tl.arange(0, BLOCK_T)
        tl.store(keep_ptr + toks * tl.num_programs(1) + g, crowded.to(tl.int8), mask=toks < q_end)
        if g == 0:
            tl.store(token_seq_ptr + toks, b, mask=toks < q_end)
        if crowded:
            tl.store(count_ptr + unit, -1)
            return
    pages = tl.load(block_table_ptr + b * stride_bt + (ids - shard_rank) // shard_world, mask=first, other=0)
    plan = plan_ptr + unit * (3 * N)
    tl.store(plan + rank, ids, mask=first)
    tl.store(plan + N + rank, pages, mask=first)
    tl.store(plan + 2 * N + rank, chosen_by, mask=last)
    tl.store(count_ptr + unit, n_iter)


@triton.jit
def _walk_step(it, plan, N, row_tok, row_ok, table_row, shard_rank, shard_world, SPARSE: tl.constexpr):
    """Step ``it`` of a tile's walk: (global block id, its page, which rows see it). Sparse: the
    tile's plan (ids, pages, the masks of the tokens that chose them) and each row's token of the
    tile ``row_tok``; dense: this shard's blocks in order, seen by every real row."""
    if SPARSE:
        blk = tl.load(plan + it)
        page = tl.load(plan + N + it)
        chosen_by = tl.load(plan + 2 * N + it)
        visible = row_ok & ((chosen_by >> row_tok) & 1 != 0)  # [M]
    else:
        blk = shard_rank + it * shard_world
        page = tl.load(table_row + it)
        visible = row_ok
    return blk, page, visible


@triton.jit
def _tma_block(desc, page, g, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Block ``page`` of KV head ``g`` from a cache descriptor (``_tma_descriptors``), ``[BLOCK_SIZE,
    HEAD_DIM]``."""
    return tl.reshape(desc.load([page, 0, g, 0]), [BLOCK_SIZE, HEAD_DIM])


@triton.jit
def _walk_range(
    start, end, stride, q, m_i, l_i, acc, qk_scale, walk, kv,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, SPARSE: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr, WHOLE: tl.constexpr,
):  # fmt: skip
    """Steps ``start, start + stride ...`` under ``end`` of a tile's walk, folded into its online
    softmax (``_walk_block``)."""
    for it in range(start, end, stride):
        m_i, l_i, acc = _walk_block(
            it, q, m_i, l_i, acc, qk_scale, walk, kv, BLOCK_SIZE, HEAD_DIM, SPARSE, IEEE, TMA, WHOLE, False
        )
    return m_i, l_i, acc


@triton.jit
def _walk_block(
    it, q, m_i, l_i, acc, qk_scale, walk, kv,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, SPARSE: tl.constexpr, IEEE: tl.constexpr,
    TMA: tl.constexpr, WHOLE: tl.constexpr, TAIL: tl.constexpr,
):  # fmt: skip
    """Step ``it`` of a tile's walk folded into its online softmax. ``walk``: (plan, N, row_tok,
    row_ok, qpos, table_row, KV group, seq_len, shard rank, shard world); ``kv``: the caches'
    descriptors (``TMA``), pointers and strides. ``WHOLE``: the block lies wholly at or before
    every row's query, so rows are masked, not scores. ``TAIL`` (TMA): the block may be the
    sequence's partial last one, whose rows past seq_len come in holding anything; they are zeroed
    in V (0 x NaN in P @ V would poison the row)."""
    plan, N, row_tok, row_ok, qpos, table_row, g, seq_len, shard_rank, shard_world = walk
    k_desc, v_desc, k_ptr, v_ptr, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh = kv
    offs_s = tl.arange(0, BLOCK_SIZE)
    offs_d = tl.arange(0, HEAD_DIM)
    blk, page, visible = _walk_step(it, plan, N, row_tok, row_ok, table_row, shard_rank, shard_world, SPARSE)
    kpos = blk * BLOCK_SIZE + offs_s  # [BLOCK_SIZE]
    if TMA:
        k = _tma_block(k_desc, page, g, BLOCK_SIZE, HEAD_DIM)
        v = _tma_block(v_desc, page, g, BLOCK_SIZE, HEAD_DIM)
        if TAIL:
            v = tl.where((kpos < seq_len)[:, None], v, 0.0)
    else:
        written = kpos < seq_len
        page = page.to(tl.int64)
        k = tl.load(
            k_ptr + page * stride_kp + offs_s[:, None] * stride_ks + g * stride_kh + offs_d[None, :],
            mask=written[:, None],
            other=0.0,
        )  # [BLOCK_SIZE, D]
        # V is requested with K so both reads are in flight together.
        v = tl.load(
            v_ptr + page * stride_vp + offs_s[:, None] * stride_vs + g * stride_vh + offs_d[None, :],
            mask=written[:, None],
            other=0.0,
        )
    if WHOLE:
        allowed = visible
    else:
        allowed = visible[:, None] & (kpos[None, :] <= qpos[:, None])
    return online_softmax_step(q, k.to(q.dtype), v, allowed, m_i, l_i, acc, qk_scale, IEEE, WHOLE)


@triton.jit(do_not_specialize=["tiles_per_seq", "shared_tiles_per_seq", "stride_bt", "stride_ls"])
def _paged_attention_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    block_table_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    out_ptr,
    lse_ptr,
    final_out_ptr,
    final_lse_ptr,
    tickets_ptr,
    plan_ptr,
    count_ptr,
    k_desc,
    v_desc,
    qk_scale,
    shard_rank,
    shard_world,
    tiles_per_seq,
    num_splits,
    crowded_ptr,
    shared_tiles_per_seq,
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
    stride_fot,
    stride_foh,
    stride_flt,
    HEADS_PER_GROUP: tl.constexpr,
    HEADS_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TOPK_P: tl.constexpr,
    SPARSE: tl.constexpr,
    IEEE: tl.constexpr,
    COMBINE: tl.constexpr,
    SPLITS_P: tl.constexpr,
    ADAPT: tl.constexpr = 0,
    SHARED_T: tl.constexpr = 1,
    LAUNCH_DEPENDENTS: tl.constexpr = False,
    TMA: tl.constexpr = False,
    WHOLE: tl.constexpr = False,
):
    M: tl.constexpr = BLOCK_T * HEADS_P
    if LAUNCH_DEPENDENTS:
        gdc_launch_dependents()  # the merge launch may start: it waits for the partials
    pid = tl.program_id(0)
    g = tl.program_id(1)
    split = tl.program_id(2)
    unit = pid * tl.num_programs(1) + g
    if SPARSE:  # the size of the tile's union of blocks (``_tile_plan_kernel``)
        n_plan = tl.load(count_ptr + unit)
        if ADAPT == 1:  # first pass: a crowded tile (count -1) is left to the second
            if n_plan < 0:
                return
    b, q_start, q_end, t0 = _tile_tokens(cu_q_ptr, pid, tiles_per_seq, BLOCK_T)
    if t0 >= q_end:
        return
    if ADAPT == 2:  # second pass: only the tokens of tiles the first pass found crowded
        shared = b * shared_tiles_per_seq + (t0 - q_start) // SHARED_T
        if tl.load(crowded_ptr + shared * tl.num_programs(1) + g) == 0:
            return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - (q_end - q_start)  # global position of the sequence's first query

    rows = tl.arange(0, M)
    tok = t0 + rows // HEADS_P  # [M]
    head = g * HEADS_PER_GROUP + rows % HEADS_P
    row_ok = (tok < q_end) & (rows % HEADS_P < HEADS_PER_GROUP)
    qpos = first_pos + tok - q_start  # [M]
    last_qpos = first_pos + tl.minimum(t0 + BLOCK_T, q_end) - 1 - q_start  # the tile's last query
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [M, D]

    if SPARSE:
        # The tile's union of blocks, ascending, with their pages and the tokens that chose them
        # (``_tile_plan_kernel``): the loop reads each as a scalar, and a row sees a block when
        # its token's bit is set.
        N: tl.constexpr = BLOCK_T * TOPK_P
        plan = plan_ptr + unit * (3 * N)
        n_iter = n_plan
    else:
        n_global = last_qpos // BLOCK_SIZE + 1
        n_iter = tl.maximum(0, (n_global - shard_rank + shard_world - 1) // shard_world)
        plan, N = plan_ptr, 0  # unused: the walk is the shard's blocks in order
    row_tok = rows // HEADS_P

    if WHOLE:
        # Blocks below ``whole_end`` lie wholly at or before the tile's first query: every row that
        # selected one sees all of its keys, so the walk's first steps (up to ``n_whole_rows``; the
        # walk ascends) mask rows, not scores, and only the last few steps mask key by key.
        whole_end = (first_pos + t0 - q_start + 1) // BLOCK_SIZE
        if SPARSE:
            every = tl.arange(0, N)
            planned = tl.load(plan + every, mask=every < n_iter, other=2147483647)
            n_whole_rows = tl.sum((planned < whole_end).to(tl.int32), 0)
        else:
            n_whole_rows = tl.minimum(
                n_iter, tl.maximum(0, (whole_end - shard_rank + shard_world - 1) // shard_world)
            )
        # The first step of this split's stride at or past them.
        split_on = split + tl.cdiv(tl.maximum(n_whole_rows - split, 0), num_splits) * num_splits
    else:
        n_whole_rows = 0
        split_on = split

    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, HEAD_DIM], tl.float32)
    table_row = block_table_ptr + b * stride_bt
    walk = (plan, N, row_tok, row_ok, qpos, table_row, g, seq_len, shard_rank, shard_world)
    kv = (k_desc, v_desc, k_ptr, v_ptr, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh)
    if WHOLE:
        m_i, l_i, acc = _walk_range(
            split, n_whole_rows, num_splits, q, m_i, l_i, acc, qk_scale, walk, kv,
            BLOCK_SIZE, HEAD_DIM, SPARSE, IEEE, TMA, True,
        )  # fmt: skip
    if TMA:
        # A TMA copy has no row mask, and the rows of the sequence's partial last block past
        # seq_len hold anything (0 x NaN in P @ V would poison the row). Only the walk's last
        # block can be that one (the plan drops blocks past the tile), so while the tile reaches
        # into a partial last block, the walk's last step zeroes those rows of V (that block is
        # not whole: a walk of whole blocks has no such step).
        tail = (
            (seq_len % BLOCK_SIZE != 0)
            & (last_qpos >= seq_len - seq_len % BLOCK_SIZE)
            & (n_whole_rows < n_iter)
        )
        n_full = n_iter - tail.to(tl.int32)
    else:
        n_full = n_iter
    m_i, l_i, acc = _walk_range(
        split_on, n_full, num_splits, q, m_i, l_i, acc, qk_scale, walk, kv,
        BLOCK_SIZE, HEAD_DIM, SPARSE, IEEE, TMA, False,
    )  # fmt: skip
    if TMA:
        if tail and (n_full - split) % num_splits == 0:
            m_i, l_i, acc = _walk_block(
                n_full, q, m_i, l_i, acc, qk_scale, walk, kv, BLOCK_SIZE, HEAD_DIM, SPARSE, IEEE, TMA,
                False, True,
            )  # fmt: skip

    out, lse = normalize_softmax(acc, m_i, l_i)
    tl.store(
        out_ptr + split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_ok[:, None],
    )
    tl.store(lse_ptr + split * stride_ls + tok * stride_lt + head, lse, mask=row_ok)
    if COMBINE:
        # Split-K combine by the last split to finish this (tile, group): no second launch, and
        # the partials it reads were just written, so they come from L2.
        _combine_last(
            tickets_ptr + unit,
            num_splits,
            out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            lse_ptr + tok * stride_lt + head,
            stride_os,
            stride_ls,
            final_out_ptr + tok[:, None] * stride_fot + head[:, None] * stride_foh + offs_d[None, :],
            final_lse_ptr + tok * stride_flt + head,
            row_ok,
            M,
            HEAD_DIM,
            SPLITS_P,
        )


def _check_caches(name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: q must be fp32, bf16 or fp16, got {q.dtype}")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    if k_cache.dtype not in floats or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"{name}: k_cache and v_cache must share one of fp32, bf16, fp16; "
            f"got {k_cache.dtype}, {v_cache.dtype}"
        )
    check_last_dim_contiguous(name, q=q, k_cache=k_cache, v_cache=v_cache)
    D = q.shape[-1]
    if D < 16 or D & (D - 1):
        raise ValueError(f"{name}: head_dim must be a power of two >= 16, got {D}")
    bs = k_cache.shape[1]
    if bs < 16 or bs & (bs - 1):
        raise ValueError(f"{name}: block size must be a power of two >= 16, got {bs}")


def _check_block_ids(name: str, block_ids: torch.Tensor) -> None:
    if block_ids.dtype != torch.int32:
        raise ValueError(f"{name}: block_ids must be int32, got {block_ids.dtype}")
    check_last_dim_contiguous(name, block_ids=block_ids)


_DENSE_DECODE_BLOCKS = 32
# Split-K grids of up to this many programs per SM merge their partials in a launch of their own
# (``_merge_by_launch``). On an H200, against the last split merging in the kernel: 10.2 vs 14.0 us
# (dense, 2K, batch 1), 76.8 vs 89.5 us (dense, 128K, batch 1), 10.7 vs 14.6 us (sparse, 8K,
# batch 1), 20.9 vs 21.9 us (sparse, 8K, batch 8, two waves; a limit of one wave left it at 22.0)
# (`benchmarks/kernels.py --sweep merge`).
_MERGE_WAVES = 2
# A dense decode walk takes its split count from _dense_decode_splits; a grid over one wave keeps
# at least this many blocks per split.
_DENSE_SPLIT_BLOCKS = 4
_MAX_SPLITS = MAX_LATENCY_BOUND_PARTS  # either split-K merge holds (or unrolls over) every split
# A decode step's attention launch takes the final top-k of up to this many candidates per (sequence,
# KV group) itself (``select_and_attend_triton``); more are first cut down by the merge launch's
# slices. 0: the selection is the merge launch's. Side by side on an H200 against 0
# (benchmarks/results/kernels-sweep-decode-select-NVIDIA-H200.txt): 23.5-23.7 against 24.7-25.0 us
# at 128K and batch 1, 16.5-16.7 against 17.5-17.7 at 32K, 78.3-78.6 against 78.9-79.1 at 1M, 51.0-51.3
# against 52.2-52.4 at 128K and batch 4; 4096 (1M at batch 1 then takes 4096 keys per program) took
# 80.0-80.3, 256 (128K then goes through the slices) 24.0-24.2.
_ATTENTION_SELECT_MAX = 1024
# Sparse decode reads a block table up to this wide whole, beside the selection (on an H100 this
# paid at 64 blocks and cost time at 256).
_WHOLE_TABLE_BLOCKS = 64
# Sparse prefill's shared first-pass tile: this many tokens (times the minimum tile), crowded (its
# tokens go to the second pass) when its union of blocks exceeds _CROWDED_SHARE of its tokens'
# selections, its K/V loaded without a pipeline (_SHARED_STAGES). A tile of M3 is then 64 rows on
# 4 warps and two programs fit on an SM, so one's softmax can overlap the other's matmuls; a
# smaller tile's union also wastes less (smooth queries: 21 blocks per 4 tokens, 26 per 8). Side
# by side on an H200 (benchmarks/results/kernels-sweep-shared-tile-NVIDIA-H200.txt, K/V by TMA,
# whole blocks first) the 128K prefill's attention took 33.2-33.4 ms with smooth queries against
# 37.3-37.4 with 8-token tiles (share 1/3, two stages), level with independent queries; two
# stages, 2-token tiles or a share of 1/3 were slower, 2/3 level.
_SHARED_TILE = 4
# A tile plan marks the tokens that chose each block with the bits of one int32: sparse tiles hold
# at most this many query tokens.
_PLAN_TOKENS = 32
_CROWDED_SHARE = 1 / 2
_SHARED_STAGES = 1
_ADAPTIVE_MIN_TOKENS = 64
# In query runs at least this long the crowded tokens of sparse prefill go block-major
# (``block_major.py``): its plan (a counting sort of the selection) costs a few small launches,
# which a long chunk's attention hides.
_BLOCK_MAJOR_MIN_TOKENS = 1024
# Prefill and dense-layer tiles read K/V blocks by TMA (Hopper's tensor memory accelerator) where
# the caches allow it: a block goes to shared memory in one copy, with no address tensor or
# staging registers (the shared-tile kernel: 218 registers, none spilled, against 255 with 4
# spilled; kernels-sweep-profile-NVIDIA-H200.txt as of commit cb1b51b). Side by side on an H200
# (benchmarks/results/kernels-sweep-shared-tile-NVIDIA-H200.txt and kernels-sweep-tma-NVIDIA-H200.txt):
# the 128K prefill's attention with smooth queries took 33.2-33.4 ms against 41.5 with pointer
# loads (1M: 288.2-289.9 against 364.4-365.5), the last 8K chunk's crowded tiles token by token
# 2.38-2.54 against 2.90-3.07 ms (smooth), a dense 8K-token chunk over 128K 94.6-94.9 against
# 103.4-103.5 ms, dense decode at 128K 71.4-71.7 against 76.6-76.8 us; independent queries
# (block-major) level.
_TMA = True
# With TMA, a prefill tile's walk outside the shared first pass keeps three blocks in flight
# where they fit in this much shared memory (dense 8K chunk over 128K: 94.7-95.4 ms, against
# 97.4-97.7 with two stages), else two.
_TMA_STAGE_BYTES = 200 << 10
# A prefill tile walks the blocks that lie wholly before its first query first, masking rows, not
# scores (``_walk_range``): most of its steps then skip the per-score causal and selection masks.
# Side by side on an H200 (benchmarks/results/kernels-sweep-whole-steps-NVIDIA-H200.txt): the 128K
# prefill's attention with smooth queries took 33.3-33.6 ms against 35.1, a dense 8K-token chunk
# over 128K 77.6-78.0 against 92.4-92.7 ms; independent queries (block-major) level. A decode
# walk is bound by bytes, and a second loop would cost each split a pipeline fill of its own (it
# measured slower at 128K and batch 1), so decode keeps one loop.
_WHOLE_STEPS = True


def _tma_descriptors(
    k_cache: torch.Tensor, v_cache: torch.Tensor
) -> tuple[TensorDescriptor, TensorDescriptor] | tuple[None, None]:
    """Descriptors of one (page, KV head) block of each cache ``[pages, block, H_kv, D]``
    (``block_descriptor``), or (None, None) where TMA is off or cannot read both."""
    if not _TMA:
        return None, None
    k_desc, v_desc = block_descriptor(k_cache), block_descriptor(v_cache)
    if k_desc is None or v_desc is None:
        return None, None
    return k_desc, v_desc


def _dense_decode_splits(blocks: int, units: int, sms: int) -> int:
    """Split count of a dense decode walk over a table of ``blocks`` blocks by ``units`` (sequence,
    KV group) pairs: the largest power of two that keeps the grid within two programs per SM (one
    program's loop keeps too few loads in flight to draw its SM's share of the bandwidth; a third
    would double the slowest SM's work), halved while a split would walk fewer than
    ``_DENSE_SPLIT_BLOCKS`` blocks and the grid is over one wave. On an H200 against one program
    per SM, side by side (``benchmarks/results/kernels-sweep-dense-splits-NVIDIA-H200.txt``): 45.7
    vs 51.3 us at 64K and batch 1, 27.6 vs 32.4 us at 8K and batch 4, 41.7 vs 47.5 us at 8K and
    batch 8."""
    splits = max(1, min(_MAX_SPLITS, blocks, 2 * sms // units))
    splits = 1 << (splits.bit_length() - 1)
    while splits > 1 and blocks < _DENSE_SPLIT_BLOCKS * splits and units * splits > sms:
        splits //= 2
    return splits


def _merge_by_launch(programs: int, splits: int, device: torch.device) -> bool:
    """Whether a split-K grid of ``programs`` merges its partials in a launch of its own rather
    than by the last split of each unit. Within a wave or two the splits finish nearly together,
    so the in-kernel merge adds one program's serial read of all its unit's partials to the end
    of the step, where the merge launch (started early, waiting on the device) reads them with
    one program per (token, head); over more waves the units that finish early merge while
    later ones still run, which a launch after the grid cannot."""
    return splits > 1 and programs <= _MERGE_WAVES * num_sms(device)


class _SplitOutputs:
    """Where a split-K launch of ``splits`` programs per unit (``units`` units: (tile, KV group)
    pairs) writes into ``out [T, H, D]``/``lse [T, H]``, and how its partials are merged: by a
    launch of its own (``_merge_by_launch``) or by the last split of each unit (atomic tickets).
    One split writes ``out``/``lse`` directly."""

    def __init__(self, splits: int, units: int, out: torch.Tensor, lse: torch.Tensor):
        T, H, D = out.shape
        self.splits, self.out, self.lse = splits, out, lse
        self.by_launch = _merge_by_launch(units * splits, splits, out.device)
        if splits > 1:
            self.part_out = torch.empty(splits, T, H, D, dtype=torch.float32, device=out.device)
            self.part_lse = torch.empty(splits, T, H, dtype=torch.float32, device=out.device)
        else:
            self.part_out, self.part_lse = out[None], lse[None]
        self.tickets = tickets(out.device, units) if splits > 1 and not self.by_launch else lse

    def strides(self) -> tuple[int, ...]:
        """stride_o{s,t,h}, stride_l{s,t}, stride_fo{t,h}, stride_flt: the kernels' output strides."""
        po, pl = self.part_out.stride(), self.part_lse.stride()
        return (*po[:3], *pl[:2], *self.out.stride()[:2], self.lse.stride(0))

    def flags(self, early: bool) -> dict:
        """The split kernel's merge parameters (``early``: launched with programmatic dependent
        launch, so the merge launch may start before it ends)."""
        return dict(
            COMBINE=self.splits > 1 and not self.by_launch,
            # Only the in-kernel combine unrolls over the splits.
            SPLITS_P=1 if self.by_launch else splits_bucket(self.splits),
            LAUNCH_DEPENDENTS=self.by_launch and early,
        )

    def merge(self) -> None:
        """After the split kernel: the merge launch, where the partials are merged by one."""
        if self.by_launch:
            merge_states_into(self.part_out, self.part_lse, self.out, self.lse, latency_bound=True)


def _launch_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: float,
    shard_rank: int,
    shard_world: int,
    num_splits: int | None,
    name: str,
    num_warps: int | None,
    candidates: torch.Tensor | None = None,
    selection: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence: split-K over the selected blocks (dense: over the block table), a
    few blocks per program. ``candidates`` (int64 keys ``[B, H_kv, N]``, instead of ``block_ids``)
    are the selection's candidates: the kernel takes their top-k itself and writes it to
    ``selection`` (ids, scores ``[B, H_kv, topk]``)."""
    B, H, D = q.shape
    H_kv = k_cache.shape[2]
    sel_ids, sel_scores = selection if selection is not None else (out, out)  # (unused without)
    if candidates is not None:
        topk, n_slots, ids_arg = sel_ids.shape[2], candidates.shape[2], candidates
        stride_it, stride_ig = candidates.stride(0), candidates.stride(1)
    elif block_ids is not None:
        _check_block_ids(name, block_ids)
        topk, ids_arg, stride_it, stride_ig = (
            block_ids.shape[2],
            block_ids,
            block_ids.stride(0),
            block_ids.stride(1),
        )
        n_slots = topk
    else:
        topk, ids_arg, stride_it, stride_ig = max(1, block_table.shape[1]), block_table, 0, 0
        n_slots = topk
    if topk == 0:
        # No block selected: a grid of no splits would leave out and lse unwritten.
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    # K and V of the blocks a program loads at once stay in registers: two 128 x 128 bf16 blocks.
    most = next_pow2(max(1, 256 // D))
    sms = num_sms(q.device)
    if num_splits is None:
        if B * H_kv * topk <= sms:
            # One block per program still fits in one wave (a batch of 1-2 for M3 at top-16): the
            # step is latency-bound, so each program's chain should be short, and the split
            # launch merges the partials.
            per_split = 1
        else:
            # Two blocks per program (one measured slower: twice the partials to combine), more
            # while the grid would exceed a few programs per SM or the last split combine over
            # 16 partials.
            per_split = min(2, most)
            while per_split < min(most, topk) and (
                B * H_kv * triton.cdiv(topk, per_split) > 4 * sms or triton.cdiv(topk, per_split) > 16
            ):
                per_split *= 2
    else:
        per_split = min(most, next_pow2(triton.cdiv(topk, max(1, num_splits))))
    per_split = min(per_split, next_pow2(topk))
    splits = triton.cdiv(topk, per_split)
    split_out = _SplitOutputs(splits, B * H_kv, out, lse)
    rows = max(16, next_pow2(H // H_kv))
    early = pdl(q.device)
    _decode_kernel[(B, H_kv, splits)](
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        ids_arg,
        split_out.part_out,
        split_out.part_lse,
        out,
        lse,
        split_out.tickets,
        sel_ids,
        sel_scores,
        scale * LOG2E,
        shard_rank,
        shard_world,
        block_table.shape[1],
        n_slots,
        *paged_input_strides(q, k_cache, v_cache, block_table),
        stride_it,
        stride_ig,
        *split_out.strides(),
        *sel_ids.stride()[:2],
        *sel_scores.stride()[:2],
        HEADS_PER_GROUP=H // H_kv,
        ROWS=rows,
        HEAD_DIM=D,
        BLOCK_SIZE=k_cache.shape[1],
        PER_SPLIT=per_split,
        SPARSE=block_ids is not None or candidates is not None,
        IEEE=q.dtype == torch.float32,
        PDL=early,
        **split_out.flags(early),
        TABLE_P=_WHOLE_TABLE_BLOCKS
        if (block_ids is not None or candidates is not None) and block_table.shape[1] <= _WHOLE_TABLE_BLOCKS
        else 0,
        CAND_P=max(next_pow2(n_slots), next_pow2(topk)) if candidates is not None else 0,
        TOPK=topk if candidates is not None else 1,
        TOPK_P=next_pow2(topk) if candidates is not None else 1,
        # A grid within one wave has SMs to spare: more warps per program load its blocks faster.
        num_warps=num_warps or (8 if B * H_kv * splits <= sms else 4),
        launch_pdl=early,
    )
    split_out.merge()
    return out, lse


def launch_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    block_ids: torch.Tensor | None,
    *,
    scale: float,
    shard_rank: int,
    shard_world: int,
    max_q_len: int | None,
    block_t: int | None,
    num_splits: int | None,
    name: str,
    num_warps: int | None = None,
    num_stages: int | None = None,
    by_block: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks, picks the kernel, the tile and the split count, launches, and merges split-K
    partials."""
    _check_caches(name, q, k_cache, v_cache)
    check_int32(name, block_table=block_table, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    check_shard(name, shard_rank, shard_world)
    T, H, D = q.shape
    H_kv = k_cache.shape[2]
    group = H // H_kv
    B = seq_lens.shape[0]
    out = torch.empty(T, H, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=q.device)
    longest = max_query_len(cu_seqlens_q, max_q_len)
    if T == 0 or longest == 0:
        return out, lse
    heads_p = next_pow2(group)
    sparse = block_ids is not None
    # Decode over a few blocks: the split-per-block kernel (every sparse step; dense ones while
    # the block table is short, since its grid grows with the table).
    if (
        longest == 1
        and T == B
        and block_t is None
        and (sparse or block_table.shape[1] <= _DENSE_DECODE_BLOCKS)
    ):
        return _launch_decode(
            q, k_cache, v_cache, block_table, seq_lens, block_ids, out, lse,
            scale=scale, shard_rank=shard_rank, shard_world=shard_world, num_splits=num_splits,
            name=name, num_warps=num_warps,
        )  # fmt: skip
    if by_block:
        if not sparse:
            raise ValueError(f"{name}: the block-major kernel needs a selection (block_ids)")
        _check_block_ids(name, block_ids)
        block_major_attention(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, block_ids, out, lse,
            scale=scale, shard_rank=shard_rank, shard_world=shard_world, block_t=block_t,
            num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
        return out, lse
    # Sparse prefill picks its tile per tile: tokens whose selections overlap (neighbours on one
    # topic) share one pass over the union of their blocks; where the union is crowded
    # (unrelated selections), the masked rows cost more than the K/V reads saved, so those
    # tokens go in a second pass: block-major in a long chunk (each selected block read once for
    # all the crowded tokens that chose it), else one by one.
    adaptive = sparse and block_t is None and num_splits is None and longest >= _ADAPTIVE_MIN_TOKENS
    if block_t is None:
        # Dense: tiles of up to 128 rows. Sparse: one token's heads (16 rows for M3).
        rows = 16 if sparse else 128
        block_t = max(1, min(next_pow2(longest), rows // heads_p))
    block_t = max(block_t, triton.cdiv(16, heads_p))  # tl.dot needs M >= 16
    if sparse and block_t > _PLAN_TOKENS:
        raise ValueError(
            f"{name}: sparse tiles hold at most {_PLAN_TOKENS} query tokens, got block_t={block_t}"
        )
    tiles = triton.cdiv(longest, block_t)
    if sparse:
        _check_block_ids(name, block_ids)
        topk = block_ids.shape[2]
        work = block_t * topk  # most blocks one tile can visit
    else:
        topk = 1
        work = block_table.shape[1]
    if num_splits is None:
        programs = B * tiles * H_kv
        if not sparse and longest == 1:
            num_splits = _dense_decode_splits(work, programs, num_sms(q.device))
        else:  # about one program per SM: each split then walks a couple of blocks
            num_splits = max(1, min(work // 2 if sparse else work, triton.cdiv(num_sms(q.device), programs)))
    num_splits = min(num_splits, _MAX_SPLITS)
    adaptive = adaptive and num_splits == 1
    split_out = _SplitOutputs(num_splits, B * tiles * H_kv, out, lse)
    topk_p = next_pow2(topk)
    k_desc, v_desc = _tma_descriptors(k_cache, v_cache)
    stage_bytes = 2 * k_cache.shape[1] * D * k_cache.element_size()  # one K and one V block
    walk_stages = 3 if k_desc is not None and longest > 1 and 3 * stage_bytes <= _TMA_STAGE_BYTES else 2

    def launch(
        tile_t: int,
        n_tiles: int,
        adapt: int,
        crowded: torch.Tensor,
        union_max: int,
        shared_t: int,
        shared_tiles: int,
        keep: torch.Tensor | None = None,
        token_seq: torch.Tensor | None = None,
    ):
        units = B * n_tiles * H_kv
        if sparse:
            plan = torch.empty(units, 3 * tile_t * topk_p, dtype=torch.int32, device=q.device)
            count = torch.empty(units, dtype=torch.int32, device=q.device)
            _tile_plan_kernel[(B * n_tiles, H_kv)](
                block_ids,
                block_table,
                cu_seqlens_q,
                seq_lens,
                plan,
                count,
                crowded,
                crowded if keep is None else keep,
                crowded if token_seq is None else token_seq,
                shard_rank,
                shard_world,
                n_tiles,
                union_max,
                block_table.stride(0),
                block_ids.stride(0),
                block_ids.stride(1),
                BLOCK_T=tile_t,
                BLOCK_SIZE=k_cache.shape[1],
                TOPK=topk,
                TOPK_P=topk_p,
                CROWDING=adapt == 1,
                num_warps=max(1, min(4, tile_t * topk_p // 128)),  # one warp sorts without barriers
            )
        else:  # unused
            plan, count = lse, lse
        _paged_attention_kernel[(B * n_tiles, H_kv, num_splits)](
            q,
            k_cache,
            v_cache,
            block_table,
            cu_seqlens_q,
            seq_lens,
            split_out.part_out,
            split_out.part_lse,
            out,
            lse,
            split_out.tickets,
            plan,
            count,
            k_desc,
            v_desc,
            scale * LOG2E,
            shard_rank,
            shard_world,
            n_tiles,
            num_splits,
            crowded,
            shared_tiles,
            *paged_input_strides(q, k_cache, v_cache, block_table),
            *split_out.strides(),
            HEADS_PER_GROUP=group,
            HEADS_P=heads_p,
            BLOCK_T=tile_t,
            HEAD_DIM=D,
            BLOCK_SIZE=k_cache.shape[1],
            TOPK_P=topk_p,
            SPARSE=sparse,
            IEEE=q.dtype == torch.float32,
            ADAPT=adapt,
            SHARED_T=shared_t,
            TMA=k_desc is not None,
            WHOLE=_WHOLE_STEPS and longest > 1,
            **split_out.flags(pdl(q.device)),
            num_warps=num_warps or (4 if tile_t * heads_p <= 64 else 8),
            num_stages=num_stages or (_SHARED_STAGES if adapt == 1 else walk_stages),
        )

    if not adaptive:
        launch(block_t, tiles, 0, lse, 0, 1, 1)
        split_out.merge()
        return out, lse
    shared_t = min(_SHARED_TILE * block_t, _PLAN_TOKENS)
    shared_tiles = triton.cdiv(longest, shared_t)
    crowded = torch.empty(B * shared_tiles * H_kv, dtype=torch.int8, device=q.device)
    # Sharing pays while the union is under _CROWDED_SHARE of the tile's selections (on this
    # shard): a pass over one block with the whole tile's rows costs a few single-token passes.
    union_max = int(shared_t * topk * _CROWDED_SHARE) // shard_world
    keep = torch.empty(T, H_kv, dtype=torch.int8, device=q.device)
    seq = torch.empty(T, dtype=torch.int32, device=q.device)
    launch(shared_t, shared_tiles, 1, crowded, union_max, shared_t, shared_tiles, keep, seq)
    if by_block is None and longest >= _BLOCK_MAJOR_MIN_TOKENS:
        block_major_attention(
            q, k_cache, v_cache, block_table, cu_seqlens_q, seq_lens, block_ids, out, lse,
            scale=scale, shard_rank=shard_rank, shard_world=shard_world, keep=keep, token_seq=seq,
        )  # fmt: skip
    else:
        launch(block_t, tiles, 2, crowded, union_max, shared_t, shared_tiles)
    return out, lse


def sparse_attention_triton(
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
    block_t: int | None = None,
    num_splits: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    by_block: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSA attention (see ``msa.kernels.sparse_attention``) as a Triton split-K kernel.

    q ``[T, H, D]``; k_cache, v_cache ``[pages, block, H_kv, D]`` in q's dtype; block_ids
    ``[T, H_kv, K]`` int32 global ids (-1 unused). Returns (out ``[T, H, D]`` q's dtype, lse ``[T, H]``
    fp32, -inf with zeros where a query sees no key on this shard). ``max_q_len`` (the longest query
    run) saves a host sync; ``block_t`` (query tokens per program), ``num_splits`` (split-K
    factor), ``num_warps`` and ``num_stages`` override the heuristics; ``by_block`` True runs every
    token block-major, False none (crowded tiles then go token by token), instead of the rule.
    """
    return launch_paged_attention(
        q,
        k_cache,
        v_cache,
        block_table,
        cu_seqlens_q,
        seq_lens,
        block_ids,
        scale=scale,
        shard_rank=shard_rank,
        shard_world=shard_world,
        max_q_len=max_q_len,
        block_t=block_t,
        num_splits=num_splits,
        name="sparse_attention",
        num_warps=num_warps,
        num_stages=num_stages,
        by_block=by_block,
    )


def select_and_attend_triton(
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
    """An MSA layer's selection and sparse attention (see ``msa.kernels.select_and_attend``):
    (out, lse, block ids). A decode batch whose scoring leaves more candidates than its last
    program selects from hands them to the attention launch, which takes their top-k itself
    (past ``_ATTENTION_SELECT_MAX`` per head, the merge launch's slices' picks): the selection
    then costs no launch of its own on the step's chain."""
    name = "select_and_attend"
    longest = max_query_len(cu_seqlens_q, max_q_len)
    T, B = q.shape[0], seq_lens.shape[0]
    shard = dict(shard_rank=shard_rank, shard_world=shard_world)
    if not (_ATTENTION_SELECT_MAX and longest == 1 and T == B and topk > 0):
        ids, _ = select_blocks_triton(
            index_q, index_k_cache, block_table, cu_seqlens_q, seq_lens, topk=topk, max_q_len=longest, **shard
        )
        out, lse = sparse_attention_triton(
            q,
            k_cache,
            v_cache,
            block_table,
            cu_seqlens_q,
            seq_lens,
            ids,
            scale=scale,
            max_q_len=longest,
            **shard,
        )
        return out, lse, ids
    check_selection_inputs(name, index_q, index_k_cache, block_table, cu_seqlens_q, seq_lens, **shard)
    _check_caches(name, q, k_cache, v_cache)
    cand, selection = launch_chunk_scores(
        index_q, index_k_cache, block_table, cu_seqlens_q, seq_lens, topk=topk, longest=1, block_t=None,
        chunk_blocks=None, num_stages=None, **shard,
    )  # fmt: skip
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    attend = dict(scale=scale, num_splits=None, name=name, num_warps=None, **shard)
    if selection is not None:  # the scoring launch's last programs selected
        ids = selection[0]
        _launch_decode(q, k_cache, v_cache, block_table, seq_lens, ids, out, lse, **attend)
        return out, lse, ids
    G = cand.shape[1]
    if cand.shape[2] * cand.shape[3] > _ATTENTION_SELECT_MAX:
        keys = launch_candidate_picks(cand, topk)
    else:
        keys = cand.view(T, G, -1)
    ids = torch.empty(T, G, topk, dtype=torch.int32, device=q.device)
    scores = torch.empty(T, G, topk, dtype=torch.float32, device=q.device)
    _launch_decode(
        q,
        k_cache,
        v_cache,
        block_table,
        seq_lens,
        None,
        out,
        lse,
        candidates=keys,
        selection=(ids, scores),
        **attend,
    )
    return out, lse, ids
