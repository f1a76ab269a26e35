"""Triton MSA indexer: block-max scores over the paged index-key cache and an exact top-k.

Two kernels. ``_score_chunk_topk_kernel``: one program per (tile of query tokens of one sequence,
chunk of this shard's blocks); its rows are the tile's tokens x index heads (the index key is
shared by the heads, so one ``tl.dot`` scores them all), it keeps each block's max score in
registers and writes the chunk's own top-k as candidates. Splitting the context into chunks lets
one decoding sequence fill the GPU. ``_merge_candidates_kernel``: one program per (token, head)
picks the exact top-k of all chunks' candidates and writes them in ascending block order. In
decode with few candidates the scoring launch's last program per sequence does that itself.

Candidates are ranked by one int64 key, ``(order-preserving int of the fp32 score) << 32 |
(2**31 - 1 - block id)``, so one integer comparison orders two candidates, ties going to the lower
block id, and the top-k of a row is a bitonic top-k of its keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from msa.kernels._checks import check_shard
from msa.kernels._launch import (
    block_descriptor,
    check_int32,
    check_last_dim_contiguous,
    max_query_len,
    next_pow2,
    next_pow4,
    num_sms,
    pdl,
    tickets,
)

_KEY_FLOOR = tl.constexpr(-(2**63))  # below every real key: marks empty candidates
_NEG_INF_ORDER = tl.constexpr(-2139095041)  # order-preserving int of -inf; keys at or under it hold no block
# Decode candidates per head up to which the scoring launch's last program takes the top-k itself.
FUSED_SELECT_MAX = 128
# Candidates per program of the separate merge.
MERGE_SLICE = 512
# Prefill scoring loads its keys by TMA where the cache allows it (``block_descriptor``).
_TMA = True


@triton.jit
def _score_key(score, block_id):
    """int64 key: higher score first, then lower block id."""
    bits = (score + 0.0).to(tl.int32, bitcast=True)  # + 0.0 turns -0 into +0: they tie
    order = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (order.to(tl.int64) << 32) | (2147483647 - block_id).to(tl.int64)


@triton.jit
def _key_score(key):
    order = (key >> 32).to(tl.int32)
    bits = order ^ ((order >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_block(key):
    low = key - ((key >> 32) << 32)  # the low 32 bits, as a non-negative int64
    return 2147483647 - low.to(tl.int32)


@triton.jit
def _take_top(keys, K: tl.constexpr, K_P: tl.constexpr):
    """The ``K`` largest keys of each row of ``keys [R, N]`` (``K <= K_P <= N``, powers of two but
    K): all N unordered when ``K == N``, else the ``K_P`` largest, best first, by a bitonic top-k
    (a few compare-exchange layers over all keys at once, no chain of K reductions)."""
    if keys.shape[1] == K:
        return keys
    return tl.topk(keys, K_P)


@triton.jit(do_not_specialize=["tiles_per_seq", "table_width", "stride_bt", "stride_ct", "stride_cg"])
def _score_chunk_topk_kernel(
    iq_ptr,
    ik_ptr,
    k_desc,
    block_table_ptr,
    cu_q_ptr,
    seq_lens_ptr,
    cand_ptr,
    tickets_ptr,
    ids_ptr,
    scores_ptr,
    score_scale,
    shard_rank,
    shard_world,
    tiles_per_seq,
    table_width,
    stride_qt,
    stride_qg,
    stride_kp,
    stride_ks,
    stride_bt,
    stride_ct,
    stride_cg,
    stride_cc,
    stride_it,
    stride_ig,
    stride_st,
    stride_sg,
    G: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CHUNK: tl.constexpr,
    NB: tl.constexpr,
    KC: tl.constexpr,
    KC_P: tl.constexpr,
    IEEE: tl.constexpr,
    K_FP8: tl.constexpr,
    TMA: tl.constexpr,
    DECODE: tl.constexpr,
    SELECT: tl.constexpr,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    N_CAND_P: tl.constexpr,
    PDL: tl.constexpr,
):
    M: tl.constexpr = BLOCK_T * GP
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    if PDL:
        gdc_wait()  # launched early: the previous kernel's writes are visible from here on
    b = pid // tiles_per_seq
    if DECODE:  # one query per sequence: token b, no offsets to wait for
        q_start = b
        q_end = b + 1
    else:
        q_start = tl.load(cu_q_ptr + b)
        q_end = tl.load(cu_q_ptr + b + 1)
    t0 = q_start + (pid % tiles_per_seq) * BLOCK_T
    if t0 >= q_end:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - (q_end - q_start)

    rows = tl.arange(0, M)
    tok = t0 + rows // GP
    head = rows % GP
    row_ok = (tok < q_end) & (head < G)
    qpos = first_pos + tok - q_start  # [M]
    offs_d = tl.arange(0, D)
    offs_s = tl.arange(0, BLOCK_SIZE)
    q = tl.load(
        iq_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qg + offs_d[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )  # [M, D]
    if K_FP8:
        # e4m3 widens to fp16 in one instruction (bf16 takes several); fp16 also keeps more of q.
        q = q.to(tl.float16)
    first_qpos = first_pos + t0 - q_start

    # This shard's blocks that the tile's last token can see; the chunk's share of them.
    last_qpos = first_pos + tl.minimum(t0 + BLOCK_T, q_end) - 1 - q_start
    n_local = tl.maximum(0, (last_qpos // BLOCK_SIZE + 1 - shard_rank + shard_world - 1) // shard_world)
    lo = chunk * CHUNK
    cols = tl.arange(0, CHUNK)
    # The chunk's pages up front, so no block waits on a block-table read; masked by the table's
    # width, not the sequence's length, so the read need not wait for seq_lens (a page past the
    # sequence only addresses loads that its keys' mask turns off).
    pages = tl.load(block_table_ptr + b * stride_bt + lo + cols, mask=lo + cols < table_width, other=0).to(
        tl.int64
    )
    STEPS: tl.constexpr = CHUNK // NB
    steps = tl.arange(0, STEPS)
    sub = tl.arange(0, NB)
    offs_row = tl.arange(0, NB * BLOCK_SIZE) % BLOCK_SIZE  # token within its block, per tile row
    scores = tl.full([M, STEPS, NB], float("-inf"), tl.float32)
    for j in range(0, tl.cdiv(tl.minimum(CHUNK, n_local - lo), NB)):
        # NB blocks per step: one [NB * BLOCK_SIZE, D] tile keeps more bytes in flight.
        here = j * NB + sub  # [NB] positions in the chunk
        page = tl.sum(tl.where(cols[None, :] == here[:, None], pages[None, :], 0), 1)  # [NB]
        blk = shard_rank + (lo + here) * shard_world
        kpos = blk[:, None] * BLOCK_SIZE + offs_s[None, :]  # [NB, BLOCK_SIZE]
        live = (lo + here < n_local)[:, None] & (kpos < seq_len)
        if TMA:
            # One block per step (NB == 1) in one copy. Keys past the sequence's end come in
            # as whatever the page holds; the causal mask below drops their scores.
            k = tl.reshape(k_desc.load([tl.sum(page).to(tl.int32), 0, 0]), [BLOCK_SIZE, D])
        else:
            # One 2-D tile load (the addresses are flattened, not the loaded tile), so the
            # pipeliner can prefetch the next step's keys while this one is scored.
            row_page = tl.reshape(tl.broadcast_to(page[:, None], [NB, BLOCK_SIZE]), [NB * BLOCK_SIZE])
            row_live = tl.reshape(live, [NB * BLOCK_SIZE])
            k = tl.load(
                ik_ptr + row_page[:, None] * stride_kp + offs_row[:, None] * stride_ks + offs_d[None, :],
                mask=row_live[:, None],
                other=0.0,
            )  # [NB * BLOCK_SIZE, D]
        k = k.to(q.dtype)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.reshape(s, [M, NB, BLOCK_SIZE])
        # Only steps that reach past the tile's first query need the causal mask (prefill: the
        # diagonal); a step wholly before it is live and visible to every row.
        last_key = (shard_rank + (lo + j * NB + NB - 1) * shard_world) * BLOCK_SIZE + BLOCK_SIZE - 1
        if last_key > first_qpos:
            s = tl.where(kpos[None, :, :] <= qpos[:, None, None], s, float("-inf"))
        # Scaling after the max keeps ties exact (rounding is monotone).
        best = tl.max(s, 2) / score_scale  # [M, NB]
        # A query before position 0 (more queries than tokens) has no local block; // truncates
        # toward zero, which would force block 0.
        local = ((qpos // BLOCK_SIZE)[:, None] == blk[None, :]) & (qpos >= 0)[:, None]
        best = tl.where(local, float("inf"), best)  # forced local block
        scores = tl.where(steps[None, :, None] == j, best[:, None, :], scores)
    if PDL:
        gdc_launch_dependents()  # the keys are read: the next kernel may start launching
    scores = tl.reshape(scores, [M, CHUNK])

    ids = shard_rank + (lo + cols) * shard_world
    chosen = _take_top(_score_key(scores, ids[None, :]), KC, KC_P)  # [M, KC_P]
    picks = tl.arange(0, KC_P)
    tl.store(
        cand_ptr + tok[:, None] * stride_ct + head[:, None] * stride_cg + chunk * stride_cc + picks[None, :],
        chosen,
        mask=row_ok[:, None] & (picks[None, :] < KC),
    )
    if SELECT:
        # Decode with few candidates: the sequence's last chunk to finish (atomic ticket) takes
        # every head's top-k of all chunks' candidates, so no second launch waits on this one.
        tl.debug_barrier()  # every thread's candidates are stored before the ticket is taken
        ticket_ptr = tickets_ptr + b
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:
            heads = tl.arange(0, GP)
            every = tl.arange(0, N_CAND_P)
            keys = tl.load(
                cand_ptr + b * stride_ct + heads[:, None] * stride_cg + every[None, :],
                mask=(heads < G)[:, None] & (every < tl.num_programs(1) * KC)[None, :],
                other=_KEY_FLOOR,
                cache_modifier=".cg",
            )  # a sequence's candidates are contiguous per head
            best = _take_top(keys, TOPK, TOPK_P)
            out_ids = ids_ptr + b * stride_it + heads * stride_ig
            out_scores = scores_ptr + b * stride_st + heads * stride_sg
            _store_selection(best, out_ids, out_scores, heads < G, TOPK, TOPK_P)
            tl.store(ticket_ptr, 0)  # ready for the next launch


@triton.jit
def _store_selection(chosen, ids_ptrs, scores_ptrs, row_ok, TOPK: tl.constexpr, TOPK_P: tl.constexpr):
    """Write each row's picks ``chosen [R, TOPK_P]`` (best first) in ascending block order, empty
    last, at ``ids_ptrs``/``scores_ptrs [R]``."""
    picks = tl.arange(0, TOPK_P)
    # Only the first TOPK picks count (TOPK_P > TOPK when TOPK is not a power of two); the rest
    # rank last with the empty ones, so the kept picks take slots 0 ... TOPK - 1.
    valid = ((chosen >> 32) > _NEG_INF_ORDER) & (picks < TOPK)[None, :]
    blk = tl.where(valid, _key_block(chosen), 2147483647)
    score = tl.where(valid, _key_score(chosen), float("-inf"))
    # The rank of each pick among its row's picks.
    before = (blk[:, None, :] < blk[:, :, None]) | (
        (blk[:, None, :] == blk[:, :, None]) & (picks[None, None, :] < picks[None, :, None])
    )
    slot = tl.sum(before.to(tl.int32), 2)  # [R, TOPK_P]
    keep = row_ok[:, None] & (picks < TOPK)[None, :]
    tl.store(ids_ptrs[:, None] + slot, tl.where(valid, blk, -1), mask=keep)
    tl.store(scores_ptrs[:, None] + slot, score, mask=keep)


@triton.jit
def take_selection(
    cand_ptr,
    n_cand,
    slots,
    ids_ptr,
    scores_ptr,
    write,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    CAND_P: tl.constexpr,
):
    """The exact top-``TOPK`` of one (token, head)'s ``n_cand`` (<= ``CAND_P``) candidate keys at
    ``cand_ptr``: the block ids of picks number ``slots`` (best first; -1 past the valid picks).
    Where ``write``, it also stores the whole selection at ``ids_ptr``/``scores_ptr`` as
    ``select_blocks`` returns it (ascending). Lets a kernel that consumes the selection take the
    final top-k itself instead of waiting on a merge launch."""
    every = tl.arange(0, CAND_P)
    keys = tl.load(cand_ptr + every, mask=every < n_cand, other=_KEY_FLOOR)
    best = _take_top(keys[None, :], TOPK, TOPK_P)  # [1, TOPK_P]
    if write:
        one = tl.arange(0, 1)
        _store_selection(best, ids_ptr + one, scores_ptr + one, one == 0, TOPK, TOPK_P)
    picks = tl.arange(0, TOPK_P)
    key = tl.sum(tl.where(picks[None, :] == slots[:, None], best, 0), 1)  # [len(slots)]
    valid = ((key >> 32) > _NEG_INF_ORDER) & (slots < TOPK)
    return tl.where(valid, _key_block(key), -1)


@triton.jit(do_not_specialize=["n_cand", "stride_ct", "stride_cg", "stride_pt", "stride_pg"])
def _merge_candidates_kernel(
    cand_ptr,
    partial_ptr,
    tickets_ptr,
    ids_ptr,
    scores_ptr,
    n_cand,
    stride_ct,
    stride_cg,
    stride_pt,
    stride_pg,
    stride_it,
    stride_ig,
    stride_st,
    stride_sg,
    TOPK: tl.constexpr,
    TOPK_P: tl.constexpr,
    SLICE: tl.constexpr,
    SLICES: tl.constexpr,
    FINAL: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (token, head, slice) takes the top-k of its slice of the candidates. With several
    slices each writes its picks to ``partial`` and the last slice to finish (atomic ticket) takes
    the top-k of all slices' picks, so a long context's thousands of candidates are cut down by
    many programs at once instead of one. Without ``FINAL`` the picks are the output: the kernel
    that reads the selection takes their top-k (``take_selection``)."""
    t = tl.program_id(0)
    g = tl.program_id(1)
    sl = tl.program_id(2)
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = sl * SLICE + tl.arange(0, SLICE)
    keys = tl.load(cand_ptr + t * stride_ct + g * stride_cg + offs, mask=offs < n_cand, other=_KEY_FLOOR)
    chosen = _take_top(keys[None, :], TOPK, TOPK_P)  # [1, TOPK_P]
    one = tl.arange(0, 1)
    out_ids = ids_ptr + t * stride_it + g * stride_ig + one
    out_scores = scores_ptr + t * stride_st + g * stride_sg + one
    part = partial_ptr + t * stride_pt + g * stride_pg
    if SLICES == 1 and FINAL:
        _store_selection(chosen, out_ids, out_scores, one == 0, TOPK, TOPK_P)
    else:
        picks = tl.arange(0, TOPK_P)
        tl.store(part + sl * TOPK_P + picks[None, :] + one[:, None], chosen)
    if SLICES > 1 and FINAL:
        tl.debug_barrier()  # the picks are stored before the ticket is taken
        ticket_ptr = tickets_ptr + t * tl.num_programs(1) + g
        ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
        if ticket == SLICES - 1:
            every = tl.arange(0, SLICES * TOPK_P)
            picked = tl.load(part + every, cache_modifier=".cg")
            best = _take_top(picked[None, :], TOPK, TOPK_P)
            _store_selection(best, out_ids, out_scores, one == 0, TOPK, TOPK_P)
            tl.store(ticket_ptr, 0)  # ready for the next launch


def scoring_tiling(
    n_blocks: int,
    programs_per_chunk: int,
    rows: int,
    block_bytes: int,
    sms: int,
    *,
    chunk_blocks: int | None = None,
    step_blocks: int | None = None,
) -> tuple[int, int, int]:
    """The scoring launch's (blocks per program, blocks per load step, steps in flight) for a
    table of ``n_blocks`` blocks, ``programs_per_chunk`` (sequence, query tile) pairs of ``rows``
    rows each and index-key blocks of ``block_bytes``, on ``sms`` SMs.

    Blocks per program: enough programs to fill the GPU about twice (the loads of several programs
    in flight hide the memory latency), at most ``8192 // rows`` and 128 (registers).

    Decode rows are few, so the loads set the pace: up to 32 KB per step (one bf16 block of M3,
    two fp8 ones), with four bf16 steps in flight (fp8 three); three bf16 steps where the grid's
    blocks fit in two programs per SM, which then all sit in shared memory at once (on an H200:
    72.5 vs 73.3 us at 1M and batch 1, 71.6 vs 72.8 us at 128K and batch 8; at 1M and batch 8,
    512 programs, four steps took 501 us and three 568; `benchmarks/kernels.py --sweep
    index-stages`). That test counts blocks, not programs (a sequence's partial last chunk is
    not a program's worth), so it holds exactly when the chunk is under its cap, and every batch
    size gets a (chunk, steps) pair that a power-of-two batch also gets, which the warm-up runs.
    Prefill is matmul bound: one block per step and the pipeliner overlaps the next load.
    """
    if chunk_blocks:
        chunk = chunk_blocks
    else:
        fill = next_pow2(triton.cdiv(n_blocks * programs_per_chunk, 2 * sms))
        chunk = max(2, min(fill, 128, 8192 // rows))
    few_rows = rows <= 32
    nb = min(chunk, step_blocks or (min(2, max(1, (32 * 1024) // block_bytes)) if few_rows else 1))
    resident = n_blocks * programs_per_chunk <= 2 * sms * chunk
    most_stages = 4 if few_rows and nb == 1 and not resident else 3
    # The copies must fit in shared memory.
    stages = max(1, min(most_stages, (160 * 1024) // (nb * block_bytes)))
    return chunk, nb, stages


def launch_chunk_scores(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    topk: int,
    shard_rank: int,
    shard_world: int,
    longest: int,
    block_t: int | None,
    chunk_blocks: int | None,
    num_stages: int | None,
    step_blocks: int | None = None,
    num_warps: int | None = None,
    fused_select: bool | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Score every chunk of blocks and keep each chunk's best: candidate keys ``[T, G, chunks, kc]``
    int64 with ``kc = min(chunk, topk)``. Decode with at most ``FUSED_SELECT_MAX`` candidates per
    head (``fused_select`` overrides) also takes the final top-k in the same launch and returns
    it as the selection (ids, scores); otherwise the selection is None and the candidates go to
    ``launch_candidate_merge``."""
    T, G, D = index_q.shape
    B = seq_lens.shape[0]
    gp = next_pow2(G)
    if block_t is None:
        # Powers of four (1, 4, 16, 64 tokens ...), up to 256 rows: few tile sizes, so few
        # specializations to compile, at the price of some masked rows for 5-8 or 17-32 queries.
        block_t = min(next_pow4(longest), max(1, 256 // gp))
    block_t = max(block_t, triton.cdiv(16, gp))  # tl.dot needs M >= 16
    tiles = triton.cdiv(longest, block_t)
    n_blocks = max(1, block_table.shape[1])
    rows = block_t * gp
    block_bytes = index_k_cache.shape[1] * D * index_k_cache.element_size()
    chunk, nb, stages = scoring_tiling(
        n_blocks,
        B * tiles,
        rows,
        block_bytes,
        num_sms(index_q.device),
        chunk_blocks=chunk_blocks,
        step_blocks=step_blocks,
    )
    n_chunks = triton.cdiv(n_blocks, chunk)
    kc = min(chunk, topk)
    # Chunks past a sequence's visible blocks still write their (empty) candidates, so no memset.
    cand = torch.empty(T, G, n_chunks, kc, dtype=torch.int64, device=index_q.device)
    decode = longest == 1 and T == B
    n_cand = n_chunks * kc
    select = decode and (fused_select if fused_select is not None else n_cand <= FUSED_SELECT_MAX)
    if select:
        ids = torch.empty(T, G, topk, dtype=torch.int32, device=index_q.device)
        scores = torch.empty(T, G, topk, dtype=torch.float32, device=index_q.device)
        ticket_buf = tickets(index_q.device, B)
    else:  # unused; fixed strides, so their values do not pick a specialization
        ids, scores, ticket_buf = cand, cand, cand
    out_strides = (ids.stride(0), ids.stride(1), scores.stride(0), scores.stride(1)) if select else (0,) * 4
    early = pdl(index_q.device)
    # Prefill tiles score one block per step, bound by the matmuls: keys by TMA, with no address
    # tensors (a 128K prefill's index: 20.8-21.0 against 23.5-23.8 ms with pointer loads on an
    # H200, benchmarks/results/kernels-sweep-index-tma-NVIDIA-H200.txt). Decode and MTP tiles
    # (few rows, bound by bytes) keep their pointer loads.
    k_desc = block_descriptor(index_k_cache) if _TMA and rows > 32 and nb == 1 else None
    _score_chunk_topk_kernel[(B * tiles, n_chunks)](
        index_q,
        index_k_cache,
        k_desc,
        block_table,
        cu_seqlens_q,
        seq_lens,
        cand,
        ticket_buf,
        ids,
        scores,
        float(D) ** 0.5,
        shard_rank,
        shard_world,
        tiles,
        block_table.shape[1],
        index_q.stride(0),
        index_q.stride(1),
        index_k_cache.stride(0),
        index_k_cache.stride(1),
        block_table.stride(0),
        cand.stride(0),
        cand.stride(1),
        cand.stride(2),
        *out_strides,
        G=G,
        GP=gp,
        BLOCK_T=block_t,
        D=D,
        BLOCK_SIZE=index_k_cache.shape[1],
        CHUNK=chunk,
        NB=nb,
        KC=kc,
        KC_P=next_pow2(kc),
        IEEE=index_q.dtype == torch.float32,
        K_FP8=index_k_cache.dtype == torch.float8_e4m3fn,
        TMA=k_desc is not None,
        DECODE=decode,
        SELECT=select,
        TOPK=topk,
        TOPK_P=next_pow2(topk),
        N_CAND_P=max(next_pow2(n_cand), next_pow2(topk)) if select else 1,
        PDL=early,
        num_warps=num_warps or (4 if rows * nb <= 64 else 8),
        num_stages=num_stages or stages,
        launch_pdl=early,
    )
    return cand, (ids, scores) if select else None


def launch_candidate_merge(
    cand: torch.Tensor, topk: int, num_warps: int | None = None, slice_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the candidate keys ``[T, G, chunks, kc]``: (ids, scores) ``[T, G, topk]``."""
    return _launch_merge(cand, topk, num_warps, slice_size, final=True)


def launch_candidate_picks(cand: torch.Tensor, topk: int) -> torch.Tensor:
    """The merge launch's slices' picks of the candidate keys ``[T, G, chunks, kc]``: keys ``[T, G,
    slices * next_pow2(topk)]`` whose top-k is the selection, for a kernel that takes it itself
    (``take_selection``)."""
    return _launch_merge(cand, topk, None, None, final=False)


def _launch_merge(
    cand: torch.Tensor, topk: int, num_warps: int | None, slice_size: int | None, *, final: bool
) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
    T, G = cand.shape[:2]
    n_cand = cand.shape[2] * cand.shape[3]
    topk_p = next_pow2(topk)
    # Slices of MERGE_SLICE candidates, unless that leaves the final merge with more picks than
    # the slices had.
    slice_size = next_pow2(slice_size or max(MERGE_SLICE, topk_p))
    slices = triton.cdiv(n_cand, slice_size)
    if slices * topk_p >= n_cand:
        slice_size, slices = max(next_pow2(n_cand), topk_p), 1
    slices = next_pow2(slices)
    partial = (
        torch.empty(T, G, slices * topk_p, dtype=torch.int64, device=cand.device)
        if slices > 1 or not final
        else cand
    )
    if final:
        ids = torch.empty(T, G, topk, dtype=torch.int32, device=cand.device)
        scores = torch.empty(T, G, topk, dtype=torch.float32, device=cand.device)
    else:  # unused; fixed strides, so their values do not pick a specialization
        ids = scores = partial
    early = pdl(cand.device)
    _merge_candidates_kernel[(T, G, slices)](
        cand,
        partial,
        tickets(cand.device, T * G) if slices > 1 and final else ids,
        ids,
        scores,
        n_cand,
        cand.stride(0),
        cand.stride(1),
        partial.stride(0),
        partial.stride(1),
        ids.stride(0),
        ids.stride(1),
        scores.stride(0),
        scores.stride(1),
        TOPK=topk,
        TOPK_P=topk_p,
        SLICE=slice_size,
        SLICES=slices,
        FINAL=final,
        PDL=early,
        num_warps=num_warps or (1 if slice_size <= 256 else 4),  # one warp: reductions without barriers
        launch_pdl=early,
    )
    return (ids, scores) if final else partial


def check_selection_inputs(
    name: str,
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    shard_rank: int,
    shard_world: int,
) -> None:
    """What the Triton selection needs of its inputs; a ValueError naming the first that fails."""
    if index_q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"{name}: index_q must be fp32, bf16 or fp16, got {index_q.dtype}")
    if index_k_cache.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        raise ValueError(
            f"{name}: index_k_cache must be fp32, bf16, fp16 or float8_e4m3fn, got {index_k_cache.dtype}"
        )
    check_last_dim_contiguous(name, index_q=index_q, index_k_cache=index_k_cache)
    check_int32(name, block_table=block_table, cu_seqlens_q=cu_seqlens_q, seq_lens=seq_lens)
    check_shard(name, shard_rank, shard_world)
    T, G, D = index_q.shape
    bs = index_k_cache.shape[1]
    if D < 16 or D & (D - 1) or bs < 16 or bs & (bs - 1):
        raise ValueError(f"{name}: index dim and block size must be powers of two >= 16, got {D}, {bs}")


def select_blocks_triton(
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
    block_t: int | None = None,
    chunk_blocks: int | None = None,
    num_stages: int | None = None,
    step_blocks: int | None = None,
    merge_slice: int | None = None,
    num_warps: int | None = None,
    fused_select: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSA block selection (see ``msa.kernels.select_blocks``) in Triton.

    index_q ``[T, G, D]`` (fp32/bf16/fp16); index_k_cache ``[pages, block, D]`` (fp32/bf16/fp16, read
    in index_q's dtype, or float8_e4m3fn, read as fp16 with index_q). Returns (ids ``[T, G, topk]``
    int32 ascending, -1 padded; scores ``[T, G, topk]`` fp32, +inf for the forced local block, -inf
    for padding). ``max_q_len`` saves a host sync; ``block_t`` (query tokens per program),
    ``chunk_blocks`` (blocks per program), ``step_blocks`` (blocks per load), ``num_stages``,
    ``num_warps`` (of the scoring kernel), ``fused_select`` (decode: the final top-k in the scoring
    launch) and ``merge_slice`` (candidates per merge program) override the heuristics.
    """
    name = "select_blocks"
    check_selection_inputs(
        name, index_q, index_k_cache, block_table, cu_seqlens_q, seq_lens, shard_rank, shard_world
    )
    T, G, D = index_q.shape
    longest = max_query_len(cu_seqlens_q, max_q_len)
    if T == 0 or longest == 0 or topk == 0:
        return (
            torch.full((T, G, topk), -1, dtype=torch.int32, device=index_q.device),
            torch.full((T, G, topk), float("-inf"), dtype=torch.float32, device=index_q.device),
        )
    cand, selection = launch_chunk_scores(
        index_q,
        index_k_cache,
        block_table,
        cu_seqlens_q,
        seq_lens,
        topk=topk,
        shard_rank=shard_rank,
        shard_world=shard_world,
        longest=longest,
        block_t=block_t,
        chunk_blocks=chunk_blocks,
        num_stages=num_stages,
        step_blocks=step_blocks,
        num_warps=num_warps,
        fused_select=fused_select,
    )
    if selection is not None:
        return selection
    return launch_candidate_merge(cand, topk, slice_size=merge_slice)
