"""Triton paged attention (sparse MSA and dense causal) against the PyTorch reference, and the
reference against torch SDPA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from msa.kernels import (
    merge_attention_states,
    paged_attention,
    select_and_attend,
    select_blocks,
    sparse_attention,
)
from msa.kernels.indexer import triton as indexer_triton
from msa.kernels.indexer.reference import select_blocks_reference
from msa.kernels.sparse_attention import triton as sparse_triton
from msa.kernels.sparse_attention.reference import paged_attention_reference
from tests.kernels.paged_cases import index_values, make_batch, paginate

# (seq_lens, q_lens): awkward lengths, one block, batch 1 and mixed, decode, MTP and chunked prefill.
CASES = {
    "decode_b1_one_block": ([9], [1]),
    "decode_mixed": ([37, 100, 16, 64], [1, 1, 1, 1]),
    "decode_few_blocks": ([40], [1]),
    "mtp": ([70, 45], [3, 4]),
    "prefill_chunk": ([90], [37]),
    "prefill_mixed": ([33, 20, 75], [33, 20, 6]),
}
CPU = dict(heads=8, kv_heads=2, dim=32, block=16, topk=3)


def build(
    seq_lens, q_lens, *, heads, kv_heads, dim, block, topk, dtype=torch.float32, device="cpu", world=1, seed=0
):
    """Random q, per-shard paged K/V, and a valid MSA selection per (token, kv head)."""
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(seq_lens, q_lens, device)
    T = batch.total_q
    q = torch.randn(T, heads, dim, generator=g).to(device, dtype)
    ks = [torch.randn(n, kv_heads, dim, generator=g).to(device, dtype) for n in seq_lens]
    vs = [torch.randn(n, kv_heads, dim, generator=g).to(device, dtype) for n in seq_lens]
    shards = []
    for rank in range(world):
        gs = torch.Generator().manual_seed(seed + 1 + rank)
        k_cache, table = paginate(ks, block, rank, world, generator=gs)
        gs = torch.Generator().manual_seed(seed + 1 + rank)
        v_cache, table_v = paginate(vs, block, rank, world, generator=gs)
        assert torch.equal(table, table_v)
        shards.append((k_cache, v_cache, table))
    iq = torch.randn(T, kv_heads, dim, generator=g)
    ik = [torch.randn(n, dim, generator=g) for n in seq_lens]
    ik_cache, ik_table = paginate(ik, block, poison=False)
    ids, _ = select_blocks_reference(
        iq, ik_cache, ik_table, batch.cu_seqlens_q.cpu(), batch.seq_lens.cpu(), topk=topk
    )
    return batch, q, shards, ids.to(device)


def attend(q, shard, batch, ids, rank, world, scale, sparse, backend):
    k_cache, v_cache, table = shard
    args = (q, k_cache, v_cache, table, batch.cu_seqlens_q, batch.seq_lens)
    if backend == "reference":
        return paged_attention_reference(
            *args, ids if sparse else None, scale=scale, shard_rank=rank, shard_world=world
        )
    if sparse:
        return sparse_attention(*args, ids, scale=scale, shard_rank=rank, shard_world=world)
    return paged_attention(*args, scale=scale, shard_rank=rank, shard_world=world)


def check_close(out, lse, ref_out, ref_lse, tol):
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)


def run_case(case, sparse, world, cfg, dtype, device, tol, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    seq_lens, q_lens = CASES[case]
    batch, q, shards, ids = build(seq_lens, q_lens, **cfg, dtype=dtype, device=device, world=world)
    scale = 1 / math.sqrt(cfg["dim"])
    outs, lses = [], []
    for rank in range(world):
        out, lse = attend(q, shards[rank], batch, ids, rank, world, scale, sparse, "triton")
        ref_out, ref_lse = attend(q, shards[rank], batch, ids, rank, world, scale, sparse, "reference")
        check_close(out, lse, ref_out, ref_lse, tol)
        outs.append(out)
        lses.append(lse)
    if world > 1:
        merged, merged_lse = merge_attention_states(torch.stack(outs), torch.stack(lses))
        full_batch, _, full_shards, _ = build(seq_lens, q_lens, **cfg, dtype=dtype, device=device, world=1)
        ref_out, ref_lse = attend(q, full_shards[0], full_batch, ids, 0, 1, scale, sparse, "reference")
        check_close(merged, merged_lse, ref_out, ref_lse, tol)


@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_reference(case, sparse, world, monkeypatch):
    run_case(case, sparse, world, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", ["mtp", "prefill_chunk", "prefill_mixed"])
def test_prefill_tiles_with_pointer_loads(case, sparse, world, monkeypatch):
    """Where TMA is off (before Hopper, or caches it cannot describe) the query-tile kernel loads
    K/V by pointers, masked past each sequence's end: the same results."""
    monkeypatch.setattr(sparse_triton, "_TMA", False)
    run_case(case, sparse, world, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


def test_tma_descriptors_only_for_caches_tma_can_read(monkeypatch):
    """Descriptors of one (page, KV head) block for aligned caches; none for a cache whose base is
    not 16-byte aligned or whose blocks are longer than a TMA box (256), nor with TMA switched off."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # descriptors without a Hopper GPU
    buf = torch.zeros(4 * 16 * 2 * 32 + 1)
    aligned = buf[:-1].view(4, 16, 2, 32)
    k_desc, v_desc = sparse_triton._tma_descriptors(aligned, aligned)
    assert k_desc.block_shape == [1, 16, 1, 32] and list(k_desc.shape) == [4, 16, 2, 32]
    assert list(v_desc.strides) == list(aligned.stride())
    shifted = buf[1:].view(4, 16, 2, 32)  # 4 bytes past an aligned base
    assert sparse_triton._tma_descriptors(shifted, aligned) == (None, None)
    long_blocks = torch.zeros(2, 512, 2, 32)
    assert sparse_triton._tma_descriptors(long_blocks, long_blocks) == (None, None)
    monkeypatch.setattr(sparse_triton, "_TMA", False)
    assert sparse_triton._tma_descriptors(aligned, aligned) == (None, None)


@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", ["decode_b1_one_block", "decode_mixed", "decode_few_blocks"])
def test_sparse_decode_with_a_wide_block_table(case, world, monkeypatch):
    """Past ``_WHOLE_TABLE_BLOCKS`` the decode kernel reads each selected block's page after the
    selection instead of the whole table beside it: the same results."""
    monkeypatch.setattr(sparse_triton, "_WHOLE_TABLE_BLOCKS", 0)
    run_case(case, True, world, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


def _long_dense_walk(monkeypatch):
    """Dense decode in the loop kernel with two programs per SM (the split count of a long walk)
    at a toy length."""
    monkeypatch.setattr(sparse_triton, "_DENSE_DECODE_BLOCKS", 0)
    monkeypatch.setattr(sparse_triton, "_DENSE_SPLIT_BLOCKS", 1)


@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", ["decode_b1_one_block", "decode_mixed", "decode_few_blocks"])
def test_dense_decode_split_two_programs_per_sm(case, world, monkeypatch):
    _long_dense_walk(monkeypatch)
    run_case(case, False, world, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


@pytest.mark.parametrize("passes", ["one_pass", "passes_of_5"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", ["mtp", "prefill_chunk", "prefill_mixed"])
def test_block_major_prefill_matches_reference(case, world, passes, monkeypatch):
    """Every token goes block-major (the selection inverted per block), in one pass or in passes
    of 5 tokens (a scratch budget that small): the reference's results."""
    _block_major(monkeypatch, CPU, torch.float32, passes)
    run_case(case, True, world, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


def _block_major(monkeypatch, cfg, dtype, passes):
    from msa.kernels.sparse_attention import block_major

    every_token = sparse_triton.sparse_attention_triton
    monkeypatch.setattr(
        sparse_triton, "sparse_attention_triton", lambda *a, **kw: every_token(*a, **kw, by_block=True)
    )
    if passes == "passes_of_5":
        per_token = cfg["topk"] * cfg["heads"] * (cfg["dim"] * dtype.itemsize + 4)
        monkeypatch.setattr(block_major, "MAX_PARTIAL_BYTES", 5 * per_token)


@pytest.mark.parametrize("kept", [False, True], ids=["every_pair", "kept_pairs"])
def test_block_major_plan_inverts_the_selection(kept, monkeypatch):
    """The plan lists every on-shard (token, group, slot) entry once (of kept pairs only, given
    ``keep``), grouped by (sequence, group, local block), segments ascending, in tiles of at most
    ``tile_tokens`` entries of one block; the tile count is ``tile_end[-1]``."""
    from msa.kernels.sparse_attention.block_major import plan_block_major

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(3)
    T, G, K, W, world, rank, tile = 23, 2, 3, 6, 2, 1, 4
    ids = torch.randint(-1, 2 * W, (T, G, K), generator=g, dtype=torch.int32)
    ids[:12, 0, 0] = 3  # one block chosen by many tokens: a segment of several tiles
    token_seq = torch.tensor([0] * 9 + [1] * 14, dtype=torch.int32)
    keep = torch.rand(T, G, generator=g) < 0.6 if kept else None
    order, tile_seg, tile_first, seg_end, tile_end = plan_block_major(
        ids, token_seq, n_seqs=2, table_width=W, shard_rank=rank, shard_world=world, tile_tokens=tile,
        keep=keep,
    )  # fmt: skip
    expect = {}
    for t in range(T):
        for gr in range(G):
            for s in range(K):
                blk = int(ids[t, gr, s])
                if blk >= 0 and blk % world == rank and (keep is None or keep[t, gr]):
                    seg = (int(token_seq[t]) * G + gr) * W + (blk - rank) // world
                    expect.setdefault(seg, []).append((t * G + gr) * K + s)
    assert max(len(v) for v in expect.values()) > tile  # a segment of several tiles
    n_tiles = int(tile_end[-1])
    assert n_tiles == sum(-(-len(v) // tile) for v in expect.values()) and n_tiles <= tile_seg.numel()
    got, segs = {}, []
    for i in range(n_tiles):
        seg = int(tile_seg[i])
        first, end = int(tile_first[i]), min(int(seg_end[seg]), int(tile_first[i]) + tile)
        assert 0 < end - first <= tile
        got.setdefault(seg, []).extend(order[first:end].tolist())
        segs.append(seg)
    assert segs == sorted(segs)
    assert {seg: sorted(v) for seg, v in got.items()} == expect
    placed = order[: int(seg_end[-1])]
    assert sorted(placed.tolist()) == sorted(e for v in expect.values() for e in v)


@pytest.mark.parametrize("crowding", [False, True], ids=["one_pass", "first_of_two"])
def test_tile_plan_lists_each_tiles_union(crowding):
    """Each (tile, group) plan holds the distinct on-shard block ids of its tokens' selections
    that its last token can see, ascending, with their pages and which of the tile's tokens chose
    each (bit t for its token t); with crowding, a union over the
    limit is flagged and left unplanned (count -1), one at or under it flagged 0 and planned, and
    each token gets its tile's flag per group (``keep``) and its sequence (``token_seq``). A
    tile past its sequence's end (a launch sized by the longest) plans nothing (count 0)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    T, G, K, W, world, rank, tile_t, union_max = 30, 2, 3, 40, 2, 1, 4, 4
    q_lens, seq_lens, bs = [13, 17], torch.tensor([600, 1000], dtype=torch.int32), 16
    # Ids up to 79, past what some tiles can see (the last queries sit in blocks 37 and 62).
    ids = torch.randint(-1, 2 * W, (T, G, K), generator=g, dtype=torch.int32)
    ids[13:21] = ids[13]  # tiles of repeated selections: small unions
    cu = torch.tensor([0, 13, 30], dtype=torch.int32)
    block_table = torch.randperm(2 * W, generator=g).to(torch.int32).view(2, W)
    tiles = -(-max(q_lens) // tile_t)
    units, n = 2 * tiles * G, tile_t * 4
    plan = torch.full((units, 3 * n), -7, dtype=torch.int32)
    count = torch.full((units,), -7, dtype=torch.int32)
    crowded = torch.full((units,), -7, dtype=torch.int8)
    keep = torch.full((T, G), -7, dtype=torch.int8)
    token_seq = torch.full((T,), -7, dtype=torch.int32)
    args = [x.to(device) for x in (ids, block_table, cu, seq_lens, plan, count, crowded, keep, token_seq)]
    sparse_triton._tile_plan_kernel[(2 * tiles, G)](
        *args, rank, world, tiles, union_max, W, ids.stride(0), ids.stride(1),
        BLOCK_T=tile_t, BLOCK_SIZE=bs, TOPK=K, TOPK_P=4, CROWDING=crowding,
    )  # fmt: skip
    plan, count, crowded, keep, token_seq = (x.cpu() for x in args[4:])
    if crowding:
        assert token_seq.tolist() == [0] * 13 + [1] * 17
    else:  # written by the first of two passes only
        assert (keep == -7).all() and (token_seq == -7).all()
    seen_small = seen_crowded = seen_past_end = seen_unseeable = seen_shared = False
    for b in range(2):
        for tile in range(tiles):
            t0 = int(cu[b]) + tile * tile_t
            for gr in range(G):
                unit = (b * tiles + tile) * G + gr
                if t0 >= int(cu[b + 1]):
                    seen_past_end = True
                    assert int(count[unit]) == 0
                    continue
                end = min(t0 + tile_t, int(cu[b + 1]))
                last_block = (int(seq_lens[b]) - int(cu[b + 1]) + end - 1) // bs
                chosen = ids[t0:end, gr].flatten().tolist()
                seen_unseeable = seen_unseeable or max(chosen) > last_block
                union = sorted({x for x in chosen if 0 <= x <= last_block and x % world == rank})
                if crowding and len(union) > union_max:
                    seen_crowded = True
                    assert (int(crowded[unit]), int(count[unit])) == (1, -1)
                    assert keep[t0:end, gr].tolist() == [1] * (end - t0)
                    continue
                seen_small = seen_small or crowding
                if crowding:
                    assert int(crowded[unit]) == 0
                    assert keep[t0:end, gr].tolist() == [0] * (end - t0)
                assert int(count[unit]) == len(union)
                assert plan[unit, : len(union)].tolist() == union
                pages = [int(block_table[b, (x - rank) // world]) for x in union]
                assert plan[unit, n : n + len(union)].tolist() == pages
                chosen_by = [
                    sum(1 << t for t in range(end - t0) if x in ids[t0 + t, gr].tolist()) for x in union
                ]
                assert plan[unit, 2 * n : 2 * n + len(union)].tolist() == chosen_by
                seen_shared = seen_shared or any(m & (m - 1) for m in chosen_by)
    assert seen_small == seen_crowded == crowding
    assert seen_past_end and seen_unseeable and seen_shared


GPU = dict(heads=64, kv_heads=4, dim=128, block=128, topk=16)
GPU_CASES = {
    "decode_b1_one_block": ([77], [1]),
    "decode_mixed": ([5000, 130, 128, 3001], [1, 1, 1, 1]),
    "decode_few_blocks": ([1500], [1]),
    "mtp": ([4100, 2900], [4, 16]),
    "prefill_chunk": ([5000], [700]),
    "prefill_mixed": ([300, 2049], [300, 1000]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_attention_matches_reference_gpu(case, sparse, world, monkeypatch):
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    run_case(case, sparse, world, GPU, torch.bfloat16, "cuda", 2e-2, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["decode_mixed", "decode_few_blocks"])
def test_sparse_decode_with_a_wide_block_table_gpu(case, monkeypatch):
    monkeypatch.setattr(sparse_triton, "_WHOLE_TABLE_BLOCKS", 0)
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    run_case(case, True, 1, GPU, torch.bfloat16, "cuda", 2e-2, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
def test_decode_step_over_wide_block_tables_gpu(world, monkeypatch):
    """A layer's decode step: the selection and the sparse attention launched back to back (on
    Hopper the attention starts while the selection runs and waits on the device for it), over
    block tables hundreds of blocks wide: the reference's attention over the blocks the
    selection chose."""
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    seq_lens = [100_001, 37_000, 300]
    batch, q, shards, _ = build(seq_lens, [1, 1, 1], **GPU, dtype=torch.bfloat16, device="cuda", world=world)
    g = torch.Generator().manual_seed(7)
    iq = torch.randn(len(seq_lens), GPU["kv_heads"], GPU["dim"], generator=g).to("cuda", torch.bfloat16)
    index_keys = [torch.randn(n, GPU["dim"], generator=g).to("cuda", torch.bfloat16) for n in seq_lens]
    scale = 1 / math.sqrt(GPU["dim"])
    for rank in range(world):
        k_cache, v_cache, table = shards[rank]
        ik_cache, ik_table = paginate(index_keys, GPU["block"], rank, world, generator=g, poison=False)
        tables = (batch.cu_seqlens_q, batch.seq_lens)
        shard = dict(shard_rank=rank, shard_world=world)
        ids, _ = select_blocks(iq, ik_cache, ik_table, *tables, topk=GPU["topk"], max_q_len=1, **shard)
        out, lse = sparse_attention(
            q, k_cache, v_cache, table, *tables, ids, scale=scale, max_q_len=1, **shard
        )
        assert (ids[:2] >= 0).all()  # the long sequences have more blocks on each shard than the top-k
        ref_out, ref_lse = paged_attention_reference(
            q, k_cache, v_cache, table, *tables, ids, scale=scale, **shard
        )
        check_close(out, lse, ref_out, ref_lse, 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["decode_mixed", "decode_few_blocks"])
def test_dense_decode_split_two_programs_per_sm_gpu(case, monkeypatch):
    _long_dense_walk(monkeypatch)
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    run_case(case, False, 1, GPU, torch.bfloat16, "cuda", 2e-2, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("passes", ["one_pass", "passes_of_5"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", ["mtp", "prefill_chunk", "prefill_mixed"])
def test_block_major_prefill_matches_reference_gpu(case, world, passes, monkeypatch):
    _block_major(monkeypatch, GPU, torch.bfloat16, passes)
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    run_case(case, True, world, GPU, torch.bfloat16, "cuda", 2e-2, monkeypatch)


@pytest.mark.parametrize("case", ["decode_mixed", "prefill_mixed"])
def test_reference_with_all_blocks_is_dense_sdpa(case):
    """Selecting every block turns MSA into dense causal attention: compare with torch SDPA."""
    seq_lens, q_lens = CASES[case]
    cfg = dict(CPU, topk=8)  # >= the blocks of the longest sequence
    batch, q, shards, ids = build(seq_lens, q_lens, **cfg)
    k_cache, v_cache, table = shards[0]
    scale = 1 / math.sqrt(cfg["dim"])
    out, lse = paged_attention_reference(
        q, k_cache, v_cache, table, batch.cu_seqlens_q, batch.seq_lens, ids, scale=scale
    )
    group = cfg["heads"] // cfg["kv_heads"]
    for b, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        s, e = int(batch.cu_seqlens_q[b]), int(batch.cu_seqlens_q[b + 1])
        pages = table[b, : -(-n // cfg["block"])].long()
        k = k_cache[pages].flatten(0, 1)[:n].transpose(0, 1)  # [H_kv, n, D]
        v = v_cache[pages].flatten(0, 1)[:n].transpose(0, 1)
        mask = torch.arange(n)[None, :] <= (n - ql + torch.arange(ql))[:, None]
        ref = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1),
            k.repeat_interleave(group, 0),
            v.repeat_interleave(group, 0),
            attn_mask=mask,
            scale=scale,
        )
        torch.testing.assert_close(out[s:e], ref.transpose(0, 1), atol=1e-5, rtol=1e-5)
        logits = torch.einsum("qhd,hnd->qhn", q[s:e], k.repeat_interleave(group, 0)) * scale
        ref_lse = torch.logsumexp(logits.masked_fill(~mask[:, None, :], float("-inf")), -1)
        torch.testing.assert_close(lse[s:e], ref_lse, atol=1e-5, rtol=1e-5)


def shared_and_crowded(cfg, device, dtype, world):
    """A long prefill chunk whose first half of queries repeat one token's selection (tiles that
    share their blocks) and whose second half keeps independent selections over many blocks
    (crowded tiles): the two-pass sparse prefill must give the reference either way."""
    seq_lens, q_lens = [cfg["block"] * 70 + 5], [160]
    batch, q, shards, ids = build(seq_lens, q_lens, **cfg, dtype=dtype, device=device, world=world)
    ids[1:80] = ids[0]  # token 0's blocks are visible to every later token
    return batch, q, shards, ids


@pytest.mark.parametrize("crowded", ["token_by_token", "block_major"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
def test_sparse_prefill_shared_and_crowded_tiles(world, crowded, monkeypatch):
    _check_two_pass(dict(CPU, topk=6), "cpu", torch.float32, world, 2e-5, crowded, monkeypatch)


def test_sparse_prefill_one_head_per_group(monkeypatch):
    """One query head per KV group: the shared tiles take 32 tokens (16-token minimum tiles,
    capped at the 32 bits of a plan's token masks), so the last token's bit is the sign bit."""
    cfg = dict(CPU, heads=2, kv_heads=2)
    _check_two_pass(cfg, "cpu", torch.float32, 1, 2e-5, "token_by_token", monkeypatch)


def test_sparse_tiles_hold_at_most_32_tokens():
    batch, q, shards, ids = build([40], [40], **CPU)
    k_cache, v_cache, table = shards[0]
    with pytest.raises(ValueError, match="block_t=64"):
        sparse_triton.sparse_attention_triton(
            q, k_cache, v_cache, table, batch.cu_seqlens_q, batch.seq_lens, ids, scale=0.2, block_t=64
        )


@pytest.mark.gpu
@pytest.mark.parametrize("crowded", ["token_by_token", "block_major"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
def test_sparse_prefill_shared_and_crowded_tiles_gpu(world, crowded, monkeypatch):
    _check_two_pass(GPU, "cuda", torch.bfloat16, world, 2e-2, crowded, monkeypatch)


def _check_two_pass(cfg, device, dtype, world, tol, crowded, monkeypatch):
    """The second pass (the crowded tiles' tokens) token by token, or block-major: only those
    tokens' rows are written by it, the shared tiles' rows stay the first pass's."""
    from msa.kernels.sparse_attention import triton as kernel

    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    monkeypatch.setattr(kernel, "_BLOCK_MAJOR_MIN_TOKENS", 2 if crowded == "block_major" else 1 << 30)
    batch, q, shards, ids = shared_and_crowded(cfg, device, dtype, world)
    # Both kinds of first-pass tile occur (on shard 0): the rule of the launcher.
    heads_p = cfg["heads"] // cfg["kv_heads"]
    tile = min(kernel._SHARED_TILE * max(1, -(-16 // heads_p)), kernel._PLAN_TOKENS)
    union_max = int(tile * cfg["topk"] * kernel._CROWDED_SHARE) // world
    unions = [
        len({int(b) for b in ids[s : s + tile, 0].flatten() if b >= 0 and b % world == 0})
        for s in range(0, ids.shape[0], tile)
    ]
    assert min(unions) <= union_max < max(unions), unions
    scale = 1 / math.sqrt(cfg["dim"])
    for rank in range(world):
        out, lse = attend(q, shards[rank], batch, ids, rank, world, scale, True, "triton")
        ref_out, ref_lse = attend(q, shards[rank], batch, ids, rank, world, scale, True, "reference")
        check_close(out, lse, ref_out, ref_lse, tol)


@pytest.mark.gpu
def test_block_major_prefill_never_syncs_the_host(monkeypatch):
    """The block-major plan (sort, searches, tile bounds) stays on the device: a sparse prefill
    that takes it, given ``max_q_len``, waits on the GPU nowhere (CUDA's sync check set to error)."""
    monkeypatch.setattr(sparse_triton, "_BLOCK_MAJOR_MIN_TOKENS", 2)
    batch, q, shards, ids = shared_and_crowded(GPU, "cuda", torch.bfloat16, 1)
    k_cache, v_cache, table = shards[0]
    args = (q, k_cache, v_cache, table, batch.cu_seqlens_q, batch.seq_lens, ids)
    longest = int((batch.cu_seqlens_q[1:] - batch.cu_seqlens_q[:-1]).max())
    for by_block in (None, True):  # compiled before the check
        sparse_triton.sparse_attention_triton(*args, scale=0.1, max_q_len=longest, by_block=by_block)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for by_block in (None, True):
            sparse_triton.sparse_attention_triton(*args, scale=0.1, max_q_len=longest, by_block=by_block)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_block_major_prefill_is_deterministic_gpu():
    """The block-major plan places a segment's entries in the order its atomics ran, which varies
    from run to run on a GPU; each row's partial is its own, so the results do not: repeated runs
    over segments that many tokens share are bit-identical."""
    batch, q, shards, ids = shared_and_crowded(GPU, "cuda", torch.bfloat16, 1)
    k_cache, v_cache, table = shards[0]
    args = (q, k_cache, v_cache, table, batch.cu_seqlens_q, batch.seq_lens, ids)
    first_out, first_lse = sparse_triton.sparse_attention_triton(*args, scale=0.1, by_block=True)
    for _ in range(5):
        out, lse = sparse_triton.sparse_attention_triton(*args, scale=0.1, by_block=True)
        assert torch.equal(out, first_out) and torch.equal(lse, first_lse)


SPLIT_CASES = ["decode_b1_one_block", "decode_mixed", "decode_few_blocks", "prefill_chunk"]


# (seq_lens, q_lens) of whole MSA layers: decode over one block, mixed lengths, a table long enough
# for the merge launch to cut its candidates into several slices; MTP takes the two calls apart.
LAYER_CASES = {
    "decode_b1_one_block": ([9], [1]),
    "decode_mixed": ([37, 100, 16, 64], [1, 1, 1, 1]),
    "decode_long": ([500, 37], [1, 1]),
    "mtp": ([70, 45], [3, 4]),
}
GPU_LAYER_CASES = {
    "decode_b1_one_block": ([77], [1]),
    "decode_mixed": ([5000, 130, 128, 3001], [1, 1, 1, 1]),
    "decode_long": ([70000, 3001], [1, 1]),
    "mtp": ([4100, 2900], [4, 16]),
}


def layer_inputs(seq_lens, q_lens, cfg, dtype, device, world, seed=0, ties=False):
    """``build``'s batch, q and K/V shards plus index queries and index keys paged like K/V (one
    block table per shard serves both, as in the model's cache); ``ties`` as ``index_values``."""
    batch, q, shards, _ = build(seq_lens, q_lens, **cfg, dtype=dtype, device=device, world=world, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    iq, ik = index_values(batch.total_q, cfg["kv_heads"], cfg["dim"], cfg["block"], seq_lens, g, ties)
    iq = iq.to(device, dtype)
    ik = [x.to(device, dtype) for x in ik]
    layers = []
    for rank, (k_cache, v_cache, table) in enumerate(shards):
        gen = torch.Generator().manual_seed(seed + 1 + rank)
        ik_cache, ik_table = paginate(ik, cfg["block"], rank, world, generator=gen)
        assert torch.equal(ik_table, table)
        layers.append((k_cache, v_cache, ik_cache, table))
    return batch, q, iq, layers


def check_select_and_attend(seq_lens, q_lens, cfg, dtype, device, world, tol, exact, ties=False):
    """select_and_attend on each shard (twice: nothing is left behind for the next call) against
    the reference selection of that shard (``exact``: the same ids; else, rounding apart, nearly
    all) and the reference attention over the blocks it selected."""
    batch, q, iq, layers = layer_inputs(seq_lens, q_lens, cfg, dtype, device, world, ties=ties)
    scale = 1 / math.sqrt(cfg["dim"])
    tables = (batch.cu_seqlens_q, batch.seq_lens)
    for rank, (k_cache, v_cache, ik_cache, table) in enumerate(layers):
        shard = dict(shard_rank=rank, shard_world=world)
        ref_ids, _ = select_blocks_reference(
            iq.float().cpu(),
            ik_cache.float().cpu(),
            table.cpu(),
            *(t.cpu() for t in tables),
            topk=cfg["topk"],
            **shard,
        )
        for _ in range(2):
            out, lse, ids = select_and_attend(
                q, k_cache, v_cache, iq, ik_cache, table, *tables, topk=cfg["topk"], scale=scale, **shard
            )
            if exact:
                assert torch.equal(ids.cpu(), ref_ids)
            else:
                assert torch.equal(ids.cpu() < 0, ref_ids < 0)
                assert (ids.cpu() == ref_ids).float().mean() > 0.95
            ref_out, ref_lse = paged_attention_reference(
                q, k_cache, v_cache, table, *tables, ids, scale=scale, **shard
            )
            check_close(out, lse, ref_out, ref_lse, tol)


@pytest.fixture(params=["scoring_launch", "attention_launch", "slices_then_attention"])
def decode_selection(request, monkeypatch):
    """Where a decode step's final top-k is taken: by the scoring launch's last programs, by the
    attention launch from the scoring's candidates, or by the attention launch from the picks of
    the merge launch's slices."""
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    if request.param != "scoring_launch":
        monkeypatch.setattr(indexer_triton, "FUSED_SELECT_MAX", 0)
    if request.param == "slices_then_attention":
        monkeypatch.setattr(sparse_triton, "_ATTENTION_SELECT_MAX", 2)
        monkeypatch.setattr(indexer_triton, "MERGE_SLICE", 8)
    return request.param


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_select_and_attend_matches_reference(case, world, ties, decode_selection):
    """Every place the final top-k can be taken keeps the reference's selection, equal block scores
    going to the lower block id."""
    check_select_and_attend(*LAYER_CASES[case], CPU, torch.float32, "cpu", world, 2e-5, True, ties)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", list(GPU_LAYER_CASES))
def test_select_and_attend_matches_reference_gpu(case, world, decode_selection):
    check_select_and_attend(*GPU_LAYER_CASES[case], GPU, torch.bfloat16, "cuda", world, 2e-2, False)


@pytest.fixture(params=["merge_launch", "last_split"])
def split_merge(request, monkeypatch):
    """Split-K partials merged by a launch of their own, or by the last split in the kernel."""
    monkeypatch.setattr(sparse_triton, "_MERGE_WAVES", 1 << 20 if request.param == "merge_launch" else 0)
    return request.param


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_k_merges_agree_with_reference(case, sparse, split_merge, monkeypatch):
    run_case(case, sparse, 1, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


@pytest.mark.parametrize("case", ["decode_mixed", "decode_few_blocks"])
def test_split_k_merges_over_a_long_dense_walk(case, split_merge, monkeypatch):
    _long_dense_walk(monkeypatch)
    run_case(case, False, 2, CPU, torch.float32, "cpu", 2e-5, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("case", SPLIT_CASES)
def test_split_k_merges_agree_with_reference_gpu(case, sparse, split_merge, monkeypatch):
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    run_case(case, sparse, 1, GPU, torch.bfloat16, "cuda", 2e-2, monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["decode_mixed", "decode_few_blocks"])
def test_split_k_merges_over_a_long_dense_walk_gpu(case, split_merge, monkeypatch):
    _long_dense_walk(monkeypatch)
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    run_case(case, False, 2, GPU, torch.bfloat16, "cuda", 2e-2, monkeypatch)


# (table blocks, sequence x KV group units, split count) on 132 SMs.
SPLIT_COUNTS = [(64, 4, 32), (128, 4, 32), (256, 4, 64), (8192, 4, 64), (128, 8, 32), (64, 16, 16)]
SPLIT_COUNTS += [(64, 32, 8), (2, 4, 2), (64, 256, 1), (100, 12, 16), (3, 1, 2)]


@pytest.mark.parametrize("blocks, units, splits", SPLIT_COUNTS)
def test_dense_decode_split_count(blocks, units, splits):
    """A power of two within two programs per SM (132 SMs), halved while a split would walk fewer
    than four blocks and the grid is over one wave."""
    assert sparse_triton._dense_decode_splits(blocks, units, 132) == splits
