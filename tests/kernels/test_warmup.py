"""Attention-kernel warm-up: which shapes it runs, that it runs them through the Triton kernels,
and (GPU) that afterwards no decode step or short query run of any batch size or context length
compiles a kernel."""

from __future__ import annotations

import pytest
import torch

from msa.kernels import (
    paged_attention,
    select_and_attend,
    select_blocks,
    selection_needed,
    sparse_attention,
)
from msa.kernels.indexer import triton as indexer_triton
from msa.kernels.merge import triton as merge_triton
from msa.kernels.sparse_attention import triton as sparse_triton
from msa.kernels.store import triton as store_triton
from msa.kernels.warmup import QUERY_LENS, warm_up_attention, warmup_shapes

KERNELS = (
    indexer_triton._score_chunk_topk_kernel,
    indexer_triton._merge_candidates_kernel,
    sparse_triton._decode_kernel,
    sparse_triton._paged_attention_kernel,
    merge_triton._merge_states_kernel,
    store_triton._store_tokens_kernel,
)


def test_shapes_cover_every_narrow_width_and_each_batch_size():
    shapes = warmup_shapes(48, 5000, torch.device("cpu"))
    batches = {b for b, _ in shapes}
    assert batches == {1, 2, 4, 8, 16, 32, 48}
    for b in batches:
        assert {w for bb, w in shapes if bb == b} >= set(range(1, 65))
    one = sorted(w for b, w in shapes if b == 1)
    assert one[-1] == 5000 and len(one) == len(set(one))
    # Beyond 64 blocks: eight steps per doubling, each with the width after it.
    assert {64, 65, 72, 73, 120, 121, 128, 129, 4096, 4097, 4608, 4609} <= set(one)
    assert all(w <= 5000 for w in one)
    # Large batches stop where batch x width passes the CPU's nominal 8 SMs x 512.
    assert (48, 80) in shapes and (48, 88) not in shapes and (2, 2048) in shapes and (2, 4096) not in shapes


@pytest.mark.parametrize("sms", [8, 132], ids=["cpu", "h100"])
def test_every_batch_size_meets_a_warmed_index_tiling(sms, monkeypatch):
    """The scoring launch's (chunk, step, steps in flight) for decode at every batch size 1..8 and
    table width 1..1100 is one that the warm-up's batch sizes (powers of two) also reach, for
    bf16 and fp8 index keys of M3's shape: so a batch of 5 or 7 compiles nothing new (the
    pipeline depth used to follow the exact program count, which only such batches changed)."""
    import msa.kernels.warmup as warmup

    monkeypatch.setattr(warmup, "num_sms", lambda device: sms)
    rows = 16  # one decode token x 4 index heads, padded to the 16 rows of a tl.dot
    for block_bytes in (128 * 128 * 2, 128 * 128):
        warmed = {
            indexer_triton.scoring_tiling(w, b, rows, block_bytes, sms)
            for b, w in warmup_shapes(8, 1100, torch.device("cpu"))
        }
        reached = {
            (b, w): indexer_triton.scoring_tiling(w, b, rows, block_bytes, sms)
            for b in range(1, 9)
            for w in range(1, 1101)
        }
        missed = {shape: t for shape, t in reached.items() if t not in warmed}
        assert not missed, list(missed.items())[:10]
        # With 8 SMs both bf16 pipeline depths occur within these widths (with 132 the chunk
        # never reaches its cap here, and a batch of 5 at 105 blocks is one program over two per SM).
        depths = {t[2] for t in reached.values()}
        assert depths == ({3, 4} if sms == 8 and block_bytes == 128 * 128 * 2 else {3})


def _cache(pages, block, kv_heads, dim, index_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(pages, block, kv_heads, dim, generator=g).to(device, dtype)
    v = torch.randn(pages, block, kv_heads, dim, generator=g).to(device, dtype)
    ik = torch.randn(pages, block, index_dim, generator=g).to(device, dtype)
    return k, v, ik


@pytest.mark.parametrize("world, max_blocks", [(1, 5), (2, 3)], ids=["unsharded", "world2"])
def test_warm_up_runs_the_triton_kernels(world, max_blocks, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    calls = {"select": 0, "sparse": 0, "dense": 0, "select_and_attend": 0}
    import msa.kernels.warmup as warmup

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(warmup, "select_blocks", counted("select", select_blocks))
    monkeypatch.setattr(warmup, "sparse_attention", counted("sparse", sparse_attention))
    monkeypatch.setattr(warmup, "paged_attention", counted("dense", paged_attention))
    monkeypatch.setattr(warmup, "select_and_attend", counted("select_and_attend", select_and_attend))
    k, v, ik = _cache(2, 16, 2, 16, 16, torch.float32, "cpu")
    n = warm_up_attention(
        k,
        v,
        ik,
        num_heads=4,
        index_heads=2,
        topk=2,
        max_seqs=2,
        max_blocks=max_blocks,
        shard_rank=world - 1,
        shard_world=world,
        query_lens=(1, 17),
    )
    shapes = warmup_shapes(2, max_blocks, torch.device("cpu"))
    assert len(shapes) == 2 * max_blocks
    # 17 queries need 17 tokens: unsharded, one 16-token block is too short for them.
    lens = {w: ((w - 1) * world + world) * 16 for _, w in shapes}
    runs = [(q, w) for q in (1, 17) for _, w in shapes if lens[w] >= q]
    assert n == calls["dense"] == len(runs) == (18 if world == 1 else 12)
    # Selection runs where more blocks are visible than top-k keeps: global blocks > 2. One shard
    # selects and attends in one call (as the model does); sequence shards call the two apart
    # (their candidates are merged in between).
    selecting = sum(selection_needed(lens[w], 16, 2) for _, w in runs)
    assert selecting > 0
    if world == 1:
        assert calls["select_and_attend"] == selecting and calls["select"] == calls["sparse"] == 0
    else:
        assert calls["select"] == calls["sparse"] == selecting and calls["select_and_attend"] == 0
    # Page 0 of the cache is only read.
    k2, v2, ik2 = _cache(2, 16, 2, 16, 16, torch.float32, "cpu")
    assert torch.equal(k, k2) and torch.equal(v, v2) and torch.equal(ik, ik2)


def record_launches(monkeypatch, sms: int) -> tuple[dict, list[str]]:
    """Record the attention kernels' launches instead of running them, with ``sms`` SMs for the
    launch decisions (which follow shapes alone): returns ``(seen, phase)``, where ``seen`` maps
    each launch variant (kernel, compile-time parameters, warps, stages) to the phases it was
    launched in and ``phase[0]`` names the current one (initially "warm-up")."""
    import importlib

    import triton.runtime.interpreter

    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    # Compiled, or run by the interpreter (TRITON_INTERPRET=1).
    kernel_types = (triton.runtime.jit.JITFunction, triton.runtime.interpreter.InterpretedFunction)
    seen, phase = {}, ["warm-up"]
    for name in (
        "msa.kernels.indexer.triton",
        "msa.kernels.sparse_attention.triton",
        "msa.kernels.sparse_attention.block_major",
        "msa.kernels.merge.triton",
        "msa.kernels.store.triton",
        "msa.kernels.dense_attention.triton",
        "msa.kernels.warmup",
    ):
        module = importlib.import_module(name)
        if hasattr(module, "num_sms"):
            monkeypatch.setattr(module, "num_sms", lambda device: sms)
        for attr, fn in vars(module).items():
            if isinstance(fn, kernel_types):

                def run(*args, _name=attr, **kw):
                    key = tuple(sorted((k, v) for k, v in kw.items() if k.isupper() or k.startswith("num_")))
                    seen.setdefault((_name, key), set()).add(phase[0])

                monkeypatch.setattr(fn, "run", run)
    return seen, phase


def test_every_prefill_chunk_beside_decodes_meets_a_warmed_launch(monkeypatch):
    """M3's attention shape on 132 SMs, warmed up for 8 sequences of up to 600 blocks and a
    2048-token step: steps of one chunk of 100-2041 queries beside decodes of the other sequences,
    at batch sizes 1, 3 and 8 and widths across the range, launch only variants the warm-up launched
    (kernels recorded, not run: their parameters follow the shapes)."""
    seen, phase = record_launches(monkeypatch, sms=132)
    k = torch.zeros(600, 128, 4, 128, dtype=torch.bfloat16)
    ik = torch.zeros(600, 128, 128, dtype=torch.bfloat16)
    warm_up_attention(
        k, k, ik, num_heads=64, index_heads=4, topk=16, max_seqs=8, max_blocks=600, step_tokens=2048
    )
    phase[0] = "steps"
    for width in range(1, 601, 11):
        for b in (1, 3, 8):
            for q_len in (100, 200, 700, 1500, 2041):
                if q_len + b - 1 > 2048 or width * 128 < q_len:
                    continue
                q_lens = [q_len] + [1] * (b - 1)
                cu = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0, dtype=torch.int32)
                tables = (
                    torch.zeros(b, width, dtype=torch.int32),
                    cu,
                    torch.full((b,), width * 128, dtype=torch.int32),
                )
                q = torch.zeros(sum(q_lens), 64, 128, dtype=torch.bfloat16)
                paged_attention(q, k, k, *tables, scale=1.0, max_q_len=q_len)
                if selection_needed(width * 128, 128, 16):
                    iq = torch.zeros(sum(q_lens), 4, 128, dtype=torch.bfloat16)
                    select_and_attend(q, k, k, iq, ik, *tables, topk=16, scale=1.0, max_q_len=q_len)
    stepped = {key for key, phases in seen.items() if "steps" in phases}
    assert {name for name, _ in stepped} >= {"_score_chunk_topk_kernel", "_merge_candidates_kernel"}
    assert not {key for key in stepped if "warm-up" not in seen[key]}


def compiled_specializations() -> dict[str, int]:
    """Specializations compiled so far, per kernel of KERNELS (every device)."""
    return {fn.__name__: sum(len(c[0]) for c in fn.device_caches.values()) for fn in KERNELS}


def _step(k, v, ik, b, q_len, width, world, rank):
    """One layer's attention over ``b`` sequences of ``width`` blocks here, ``q_len`` queries each."""
    dev = k.device
    shard = {"shard_rank": rank, "shard_world": world}
    seq_len = ((width - 1) * world + rank + 1) * 128 - 7  # not a whole block
    table = torch.zeros(b, width, dtype=torch.int32, device=dev)
    cu = torch.arange(b + 1, dtype=torch.int32, device=dev) * q_len
    lens = torch.full((b,), seq_len, dtype=torch.int32, device=dev)
    q = torch.zeros(b * q_len, 64, 128, dtype=torch.bfloat16, device=dev)
    paged_attention(q, k, v, table, cu, lens, scale=1.0, max_q_len=q_len, **shard)
    if not selection_needed(seq_len, 128, 16):
        return
    iq = torch.zeros(b * q_len, 4, 128, dtype=torch.bfloat16, device=dev)
    if world == 1:  # as the model calls them: see test_warm_up_runs_the_triton_kernels
        select_and_attend(q, k, v, iq, ik, table, cu, lens, topk=16, scale=1.0, max_q_len=q_len, **shard)
        return
    ids, _ = select_blocks(iq, ik, table, cu, lens, topk=16, max_q_len=q_len, **shard)
    sparse_attention(q, k, v, table, cu, lens, ids, scale=1.0, max_q_len=q_len, **shard)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [1, 2], ids=["unsharded", "world2"])
def test_no_step_compiles_after_warm_up_gpu(world):
    """M3's attention shape: after warming up for 8 sequences of up to 1100 blocks, decode at
    every batch size 1..8 and every table width 1..1100, and runs of 2..100 queries at batch
    sizes 1..3 and widths across that range, find their kernels compiled."""
    dev = torch.device("cuda")
    k, v, ik = _cache(1, 128, 4, 128, 128, torch.bfloat16, dev)
    rank = world - 1
    warm_up_attention(
        k,
        v,
        ik,
        num_heads=64,
        index_heads=4,
        topk=16,
        max_seqs=8,
        max_blocks=1100,
        shard_rank=rank,
        shard_world=world,
    )
    before = compiled_specializations()
    grid = [(b, 1, w) for b in range(1, 9) for w in range(1, 1101)]
    grid += [
        (b, q, w)
        for q in (2, 3, 4, 5, 6, 8, 12, 16, 24, 40, 64, 100)
        for b in (1, 2, 3)
        for w in range(1, 1101, 7)
    ]
    assert set(QUERY_LENS) <= {q for _, q, _ in grid}
    missed = []
    for b, q_len, width in grid:
        _step(k, v, ik, b, q_len, width, world, rank)
        now = compiled_specializations()
        if now != before:
            missed.append(((b, q_len, width), {n: now[n] - before[n] for n in now if now[n] != before[n]}))
            before = now
    assert not missed, f"{len(missed)} steps compiled (batch, queries, width): {missed[:20]}"
