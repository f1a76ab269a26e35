"""Triton MSA indexer against the reference, and the reference against a plain loop over positions."""

from __future__ import annotations

import math

import pytest
import torch

from msa.kernels import merge_block_candidates, select_blocks
from msa.kernels.indexer.reference import select_blocks_reference
from tests.kernels.paged_cases import index_values, make_batch, paginate

CASES = {
    "decode_b1_one_block": ([9], [1]),
    "decode_mixed": ([37, 100, 16, 250], [1, 1, 1, 1]),
    "decode_few_blocks": ([40], [1]),
    "mtp": ([170, 45], [3, 7]),
    "prefill_chunk": ([130], [50]),
    "prefill_mixed": ([33, 20, 75], [33, 20, 6]),
}
CPU = dict(groups=2, dim=32, block=16, topk=4)


def build(
    seq_lens,
    q_lens,
    *,
    groups,
    dim,
    block,
    topk,
    dtype=torch.float32,
    device="cpu",
    world=1,
    ties=False,
    seed=0,
):
    """Index queries and per-shard paged index keys. With ``ties`` the values are small integers and
    whole blocks repeat, so many block scores are exactly equal."""
    g = torch.Generator().manual_seed(seed)
    batch = make_batch(seq_lens, q_lens, device)
    iq, ik = index_values(batch.total_q, groups, dim, block, seq_lens, g, ties)
    iq = iq.to(device, dtype)
    shards = [
        paginate(
            [k.to(device, dtype) for k in ik], block, r, world, generator=torch.Generator().manual_seed(r)
        )
        for r in range(world)
    ]
    return batch, iq, shards


def select(iq, shard, batch, topk, rank, world, backend, **tuning):
    """``backend``: "reference", "triton" (the public entry point, dispatched) or "tuned" (the
    Triton launcher itself, with tuning arguments such as chunk_blocks, merge_slice, fused_select)."""
    from msa.kernels.indexer.triton import select_blocks_triton

    backends = {"reference": select_blocks_reference, "triton": select_blocks, "tuned": select_blocks_triton}
    fn = backends[backend]
    cache, table = shard
    return fn(
        iq,
        cache,
        table,
        batch.cu_seqlens_q,
        batch.seq_lens,
        topk=topk,
        shard_rank=rank,
        shard_world=world,
        **tuning,
    )


def check_same_selection(ids, scores, ref_ids, ref_scores, exact):
    """Exact: identical ids. Otherwise (bf16 on GPU, other summation order) a differing pick must
    score within rounding of the pick it replaced."""
    assert not scores.isnan().any()
    if exact:
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=1e-5)
        return
    assert torch.equal(ids < 0, ref_ids < 0)
    a = torch.sort(scores, -1, descending=True).values
    r = torch.sort(ref_scores, -1, descending=True).values
    fin = torch.isfinite(r)
    assert torch.equal(fin, torch.isfinite(a))
    torch.testing.assert_close(a[fin], r[fin], atol=3e-2, rtol=3e-2)
    assert (ids == ref_ids).float().mean() > 0.95


def run_case(case, world, ties, cfg, dtype, device, exact, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    seq_lens, q_lens = CASES[case]
    batch, iq, shards = build(seq_lens, q_lens, **cfg, dtype=dtype, device=device, world=world, ties=ties)
    topk = cfg["topk"]
    all_ids, all_scores = [], []
    for rank in range(world):
        ids, scores = select(iq, shards[rank], batch, topk, rank, world, "triton")
        ref_ids, ref_scores = select(iq, shards[rank], batch, topk, rank, world, "reference")
        check_same_selection(ids, scores, ref_ids, ref_scores, exact)
        all_ids.append(ids)
        all_scores.append(scores)
    if world > 1:
        merged = merge_block_candidates(torch.stack(all_ids), torch.stack(all_scores), topk)
        _, _, full = build(seq_lens, q_lens, **cfg, dtype=dtype, device=device, world=1, ties=ties)
        ref_ids, _ = select(iq, full[0], batch, topk, 0, 1, "reference")
        if exact:
            assert torch.equal(merged, ref_ids)
        else:
            assert (merged == ref_ids).float().mean() > 0.95


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", list(CASES))
def test_select_blocks_matches_reference(case, world, ties, monkeypatch):
    run_case(case, world, ties, CPU, torch.float32, "cpu", True, monkeypatch)


@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", ["prefill_chunk", "prefill_mixed"])
def test_prefill_scoring_with_pointer_loads(case, world, monkeypatch):
    """Where TMA is off (before Hopper, or a cache it cannot describe) prefill tiles load their
    index keys by pointers, masked past each sequence's end: the same selection."""
    from msa.kernels.indexer import triton as indexer_triton

    monkeypatch.setattr(indexer_triton, "_TMA", False)
    run_case(case, world, False, CPU, torch.float32, "cpu", True, monkeypatch)


def test_index_cache_descriptor_covers_one_block(monkeypatch):
    """The index-key cache ``[pages, block, D]`` is described one (page) block at a time; a
    cache whose rows are not 16-byte aligned gets no descriptor."""
    from msa.kernels._launch import block_descriptor

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # descriptors without a Hopper GPU
    cache = torch.zeros(5, 16, 32)
    desc = block_descriptor(cache)
    assert desc.block_shape == [1, 16, 32] and list(desc.shape) == [5, 16, 32]
    assert block_descriptor(torch.zeros(5, 16, 33)[..., :32]) is None  # rows of 132 bytes


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("merge_slice", [None, 8], ids=["one_merge", "sliced_merge"])
@pytest.mark.parametrize("chunk", [2, 16])
def test_select_blocks_chunks_merge_candidates(chunk, merge_slice, ties):
    """Chunks of fewer blocks than topk (each keeps all its blocks) and of more (each keeps its
    topk): the merge sees many chunks' candidates, in one program or cut down by several slices
    whose picks the last one to finish merges."""
    batch, iq, shards = build([700, 300], [2, 1], **CPU, ties=ties)
    ids, scores = select(iq, shards[0], batch, 4, 0, 1, "tuned", chunk_blocks=chunk, merge_slice=merge_slice)
    ref_ids, ref_scores = select(iq, shards[0], batch, 4, 0, 1, "reference")
    check_same_selection(ids, scores, ref_ids, ref_scores, True)


@pytest.mark.parametrize("fused", [True, False], ids=["fused_select", "merge_launch"])
@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("case", ["decode_b1_one_block", "decode_mixed", "decode_few_blocks"])
def test_decode_selection_in_the_scoring_launch_matches_reference(case, ties, fused):
    """Decode's final top-k taken by the last scoring program of each sequence (atomic ticket)
    equals the reference and the separate merge, per shard, and twice in a row (the tickets are
    left at zero for the next launch)."""
    seq_lens, q_lens = CASES[case]
    batch, iq, shards = build(seq_lens, q_lens, **CPU, world=2, ties=ties)
    for rank, shard in enumerate(shards):
        ref_ids, ref_scores = select(iq, shard, batch, 4, rank, 2, "reference")
        for _ in range(2 if fused else 1):
            ids, scores = select(iq, shard, batch, 4, rank, 2, "tuned", chunk_blocks=2, fused_select=fused)
            check_same_selection(ids, scores, ref_ids, ref_scores, True)


@pytest.mark.parametrize("topk", [3, 5])
@pytest.mark.parametrize("fused", [True, False], ids=["fused_select", "merge_launch"])
@pytest.mark.parametrize("case", ["decode_mixed", "mtp", "prefill_chunk"])
def test_select_blocks_with_a_top_k_not_a_power_of_two(case, fused, topk):
    """The kernels keep top-k picks in a power-of-two row: only the first ``topk`` are written
    and they take the first ``topk`` slots in ascending order."""
    seq_lens, q_lens = CASES[case]
    batch, iq, shards = build(seq_lens, q_lens, **CPU)
    ref_ids, ref_scores = select(iq, shards[0], batch, topk, 0, 1, "reference")
    ids, scores = select(iq, shards[0], batch, topk, 0, 1, "tuned", chunk_blocks=2, fused_select=fused)
    check_same_selection(ids, scores, ref_ids, ref_scores, True)


GPU = dict(groups=4, dim=128, block=128, topk=16)
GPU_CASES = {
    "decode_b1_one_block": ([77], [1]),
    "decode_mixed": ([70000, 130, 128, 3001], [1, 1, 1, 1]),
    "decode_few_blocks": ([1500], [1]),
    "mtp": ([41000, 2900], [4, 16]),
    "prefill_chunk": ([9000], [700]),
    "prefill_mixed": ([300, 2049], [300, 1000]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("key_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_select_blocks_matches_reference_gpu(case, world, key_dtype, monkeypatch):
    monkeypatch.setitem(CASES, case, GPU_CASES[case])
    if key_dtype == "bf16":
        run_case(case, world, False, GPU, torch.bfloat16, "cuda", False, monkeypatch)
        return
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    seq_lens, q_lens = GPU_CASES[case]
    batch, iq, shards = build(seq_lens, q_lens, **GPU, dtype=torch.bfloat16, device="cuda", world=world)
    for rank in range(world):
        cache, table = shards[rank]
        cache8 = cache.to(torch.float8_e4m3fn)
        ids, scores = select(iq, (cache8, table), batch, 16, rank, world, "triton")
        ref_ids, ref_scores = select(iq, (cache8, table), batch, 16, rank, world, "reference")
        check_same_selection(ids, scores, ref_ids, ref_scores, False)


@pytest.mark.gpu
def test_select_blocks_ties_gpu(monkeypatch):
    monkeypatch.setitem(CASES, "mtp", ([41000, 2900], [4, 16]))
    run_case("mtp", 2, True, GPU, torch.bfloat16, "cuda", True, monkeypatch)


@pytest.mark.parametrize("case", ["mtp", "prefill_mixed"])
def test_reference_matches_loop_over_positions(case):
    """select_blocks_reference vs the definition written as loops: score every key position, take
    each block's max, force the local block, keep the best topk (ties to the lower id)."""
    seq_lens, q_lens = CASES[case]
    batch, iq, shards = build(seq_lens, q_lens, **CPU, ties=True)
    cache, table = shards[0]
    block, topk = CPU["block"], CPU["topk"]
    ids, scores = select_blocks_reference(iq, cache, table, batch.cu_seqlens_q, batch.seq_lens, topk=topk)
    for b, (n, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        for j in range(ql):
            t = int(batch.cu_seqlens_q[b]) + j
            pos = n - ql + j
            for g in range(CPU["groups"]):
                best = {}
                for p in range(pos + 1):
                    key = cache[table[b, p // block], p % block]
                    s = float(iq[t, g] @ key) / math.sqrt(CPU["dim"])
                    best[p // block] = max(best.get(p // block, -math.inf), s)
                best[pos // block] = math.inf
                ranked = sorted(best, key=lambda blk: (-best[blk], blk))[:topk]
                want = sorted(ranked) + [-1] * (topk - len(ranked))
                assert ids[t, g].tolist() == want
                for blk, s in zip(ids[t, g].tolist(), scores[t, g].tolist(), strict=True):
                    if blk >= 0:
                        assert s == pytest.approx(best[blk], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("seq_lens, q_lens", [([8], [8]), ([40, 8], [3, 8])], ids=["one", "mixed"])
def test_queries_before_position_zero_select_nothing(seq_lens, q_lens):
    """The last sequence cut to 5 tokens under its 8 queries (refused by ``select_blocks``, so the
    launcher is called itself): its first 3 queries sit before position 0, have no local block and
    see no key, so they select nothing (-1, -inf) on both backends, not block 0 forced in by a
    division truncating toward zero; the other 5 keep block 0."""
    from msa.kernels.indexer.triton import select_blocks_triton

    batch, iq, shards = build(seq_lens, q_lens, **CPU)
    cache, table = shards[0]
    cut = torch.tensor([*seq_lens[:-1], 5], dtype=torch.int32)
    args = (iq, cache, table, batch.cu_seqlens_q, cut)
    ids, scores = select_blocks_triton(*args, topk=CPU["topk"])
    ref_ids, ref_scores = select_blocks_reference(*args, topk=CPU["topk"])
    check_same_selection(ids, scores, ref_ids, ref_scores, exact=True)
    T = batch.total_q
    assert (ids[T - 8 : T - 5] == -1).all() and torch.isneginf(scores[T - 8 : T - 5]).all()
    assert (ids[T - 5 :, :, 0] == 0).all() and (ids[T - 5 :, :, 1:] == -1).all()
