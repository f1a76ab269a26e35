"""MSA kernels on one GPU at the MiniMax-M3 attention shape, against dense torch SDPA.

Decode (index + top-k + sparse attention over a paged cache) for context lengths up to 1M and
batches 1/4/8, the same step of dense SDPA decode over a contiguous cache (fastest of the cuDNN,
flash and efficient backends), the byte floor (bytes that must be read / device-to-device copy
bandwidth measured in this run); prefill of one MSA layer over 128K (and 1M) tokens in chunks vs
dense causal SDPA. Every kernel is checked against its reference at a smaller shape first, and a
kernel that fails its check gets no speed. Writes ``benchmarks/results/kernels-<gpu>.json``.

    python benchmarks/kernels.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from msa.kernels import _launch, selection_needed  # noqa: E402
from msa.kernels.dense_attention.triton import paged_attention_triton  # noqa: E402
from msa.kernels.indexer.reference import select_blocks_reference  # noqa: E402
from msa.kernels.indexer.triton import launch_chunk_scores, select_blocks_triton  # noqa: E402
from msa.kernels.merge.reference import merge_attention_states_reference  # noqa: E402
from msa.kernels.merge.triton import merge_attention_states_triton  # noqa: E402
from msa.kernels.sparse_attention import triton as sparse_triton  # noqa: E402
from msa.kernels.sparse_attention.block_major import block_major_attention, plan_block_major  # noqa: E402
from msa.kernels.sparse_attention.reference import paged_attention_reference  # noqa: E402
from msa.kernels.sparse_attention.triton import select_and_attend_triton, sparse_attention_triton  # noqa: E402

HEADS, KV_HEADS, DIM, BLOCK, TOPK = 64, 4, 128, 128, 16
SCALE = 1 / math.sqrt(DIM)
DEV = "cuda"
BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


# ---------------------------------------------------------------- timing and bandwidth


_FLUSH: list[torch.Tensor] = []


def cold_l2() -> None:
    """Evict L2 by reading 256 MB (reading, not writing: a written buffer would leave ~50 MB of
    dirty lines whose write-back the next kernel pays for)."""
    if not _FLUSH:
        _FLUSH.extend([torch.ones(2**26, device=DEV), torch.empty((), device=DEV)])
    torch.sum(_FLUSH[0], dim=0, out=_FLUSH[1])


def capture_graph(fn) -> torch.cuda.CUDAGraph:
    """``fn``'s launches captured in a CUDA graph, after running it once on the current stream and
    once on a side stream (compiles and allocations happen outside the capture)."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


@contextlib.contextmanager
def restoring(module, *names: str):
    """A sweep sets these settings of ``module`` per variant; they get their values back after it,
    also when it fails."""
    saved = {name: getattr(module, name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def graph_time_us(fn, reps: int = 100) -> float:
    """Median time of ``fn`` replayed from a CUDA graph, with a cold L2 before each replay."""
    graph = capture_graph(fn)
    for _ in range(10):
        graph.replay()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
    ]
    for start, end in events:
        cold_l2()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return times[len(times) // 2] * 1e3


def alternating(variants, measure, rounds: int) -> dict:
    """``measure(variant)`` for each of ``variants`` in turn, ``rounds`` times over: {variant: the
    times in round order}. Alternating spreads a drift of the GPU's clocks over every variant."""
    times: dict = {v: [] for v in variants}
    for _ in range(rounds):
        for v, ts in times.items():
            ts.append(measure(v))
    return times


def event_time_ms(fn, reps: int = 3) -> float:
    """Median of ``reps`` event-timed calls after one warm-up (for long, multi-launch runs)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(2**30, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


# ---------------------------------------------------------------- problem construction


def smooth_queries(T: int, heads: int, gen: torch.Generator, window: int = 256) -> torch.Tensor:
    """Index queries that drift along the sequence: each token's query is the mean of ``window``
    consecutive noise vectors (scaled to unit variance), so neighbouring tokens share most of
    their window and select nearly the same blocks, as queries about one topic do."""
    noise = torch.randn(T + window, heads, DIM, device=DEV, generator=gen)
    csum = torch.cumsum(noise, 0)
    return ((csum[window:] - csum[:-window]) / math.sqrt(window)).to(torch.bfloat16)


def paged_problem(
    B: int, L: int, q_len: int, index_dtype: torch.dtype, seed: int = 0, smooth: bool = False
) -> dict:
    """Random decode/prefill inputs over shuffled pages: B sequences of L tokens, the last q_len
    of each being queries. Index queries are independent per token, or ``smooth`` (see
    ``smooth_queries``)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    nb = triton.cdiv(L, BLOCK)
    pages = B * nb
    table = torch.randperm(pages, device=DEV, generator=gen).view(B, nb).int()
    k = torch.randn(pages, BLOCK, KV_HEADS, DIM, device=DEV, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(pages, BLOCK, KV_HEADS, DIM, device=DEV, dtype=torch.bfloat16, generator=gen)
    ik = torch.randn(pages, BLOCK, DIM, device=DEV, dtype=torch.bfloat16, generator=gen).to(index_dtype)
    T = B * q_len
    return dict(
        q=torch.randn(T, HEADS, DIM, device=DEV, dtype=torch.bfloat16, generator=gen),
        iq=smooth_queries(T, KV_HEADS, gen)
        if smooth
        else torch.randn(T, KV_HEADS, DIM, device=DEV, dtype=torch.bfloat16, generator=gen),
        k=k,
        v=v,
        ik=ik,
        table=table,
        cu=torch.arange(0, T + 1, q_len, device=DEV, dtype=torch.int32),
        seq_lens=torch.full((B,), L, device=DEV, dtype=torch.int32),
        q_len=q_len,
        L=L,
    )


def index_args(p: dict) -> tuple:
    """The index's leading arguments for ``p``: index queries, index keys, block table, query
    offsets and sequence lengths."""
    return (p["iq"], p["ik"], p["table"], p["cu"], p["seq_lens"])


def attention_args(p: dict) -> tuple:
    """The attention's leading arguments for ``p``: queries, K/V caches, block table, query offsets
    and sequence lengths."""
    return (p["q"], p["k"], p["v"], p["table"], p["cu"], p["seq_lens"])


def msa_step(p: dict):
    """What an MSA layer runs: the selection and sparse attention (``select_and_attend``), or,
    while every visible block would be selected, dense attention (the same result). Returns (out,
    lse, block ids or None)."""
    if not selection_needed(p["L"], BLOCK, TOPK):
        out, lse = paged_attention_triton(*attention_args(p), scale=SCALE, max_q_len=p["q_len"])
        return out, lse, None
    return select_and_attend_triton(
        p["q"], p["k"], p["v"], *index_args(p), topk=TOPK, scale=SCALE, max_q_len=p["q_len"]
    )


# ---------------------------------------------------------------- correctness gates


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def attention_close(o, lse, ro, rlse) -> bool:
    """An attention output and lse against their reference: within the checks' tolerances, no NaN."""
    return rel_err(o, ro) < 1e-2 and not o.isnan().any() and rel_err(lse, rlse) < 1e-3


def check_kernels() -> dict:
    """Each kernel against its reference at a smaller shape: mixed batch, decode + MTP rows."""
    out = {}
    for name, idx_dtype in (("index_bf16", torch.bfloat16), ("index_fp8", torch.float8_e4m3fn)):
        p = paged_problem(2, 20000, 3, idx_dtype, seed=1)
        p["seq_lens"][1] = 12345
        ids, sc = select_blocks_triton(*index_args(p), topk=TOPK)
        rids, rsc = select_blocks_reference(*index_args(p), topk=TOPK)
        a, r = torch.sort(sc, -1).values, torch.sort(rsc, -1).values
        fin = torch.isfinite(r)
        score_err = float((a[fin] - r[fin]).abs().max()) if fin.any() else 0.0
        same = float((ids == rids).float().mean())
        ok = torch.equal(fin, torch.isfinite(a)) and score_err < 3e-2 and same > 0.95
        out[name] = dict(ok=ok, id_agreement=same, max_score_err=score_err)
    p = paged_problem(2, 20000, 3, torch.bfloat16, seed=2)
    p["seq_lens"][1] = 12345
    ids, _ = select_blocks_reference(*index_args(p), topk=TOPK)
    args = attention_args(p)
    for name, sparse in (("sparse_attention", True), ("dense_attention", False)):
        if sparse:
            o, lse = sparse_attention_triton(*args, ids, scale=SCALE)
        else:
            o, lse = paged_attention_triton(*args, scale=SCALE)
        ro, rlse = paged_attention_reference(*args, ids if sparse else None, scale=SCALE)
        out[name] = dict(ok=attention_close(o, lse, ro, rlse), rel_err=rel_err(o, ro))
    # A decode step as an MSA layer runs it (the attention launch takes the final top-k): a sequence
    # of 200K tokens beside one of 3K.
    p = paged_problem(2, 200000, 1, torch.bfloat16, seed=3)
    p["seq_lens"][1] = 3001
    o, lse, ids = msa_step(p)
    rids, _ = select_blocks_reference(*index_args(p), topk=TOPK)
    args = attention_args(p)
    ro, rlse = paged_attention_reference(*args, ids, scale=SCALE)
    same = float((ids == rids).float().mean())
    ok = same > 0.95 and attention_close(o, lse, ro, rlse)
    out["msa_decode"] = dict(ok=ok, id_agreement=same, rel_err=rel_err(o, ro))
    outs = torch.randn(4, 64, HEADS, DIM, device=DEV, dtype=torch.bfloat16)
    lses = torch.randn(4, 64, HEADS, device=DEV)
    lses[1] = float("-inf")
    o, lse = merge_attention_states_triton(outs, lses)
    ro, rlse = merge_attention_states_reference(outs, lses)
    out["merge"] = dict(ok=rel_err(o, ro) < 1e-2 and rel_err(lse, rlse) < 1e-5, rel_err=rel_err(o, ro))
    return out


# ---------------------------------------------------------------- dense baselines


def sdpa_decode_fn(B: int, L: int, q_len: int, backend: str):
    q = torch.randn(B, HEADS, q_len, DIM, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(B, KV_HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(B, KV_HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)

    def fn():
        with sdpa_kernel(BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)

    return fn


def fastest_sdpa(make, time_fn) -> tuple[float | None, str | None, dict]:
    """Time every SDPA backend that accepts the problem; return the fastest."""
    times = {}
    for name in BACKENDS:
        try:
            times[name] = time_fn(make(name))
        except Exception as e:  # a backend that rejects the shape or GQA
            times[name] = f"unsupported: {type(e).__name__}: {str(e).splitlines()[0][:120]}"
        torch.cuda.empty_cache()
    good = {k: t for k, t in times.items() if isinstance(t, float)}
    if not good:
        return None, None, times
    best = min(good, key=good.get)
    return good[best], best, times


# ---------------------------------------------------------------- decode and prefill


def decode_row(B: int, L: int, bw: float, checks: dict, fp8: bool) -> dict:
    idx_dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    p = paged_problem(B, L, 1, idx_dtype)
    row = dict(batch=B, context=L, index_keys="fp8" if fp8 else "bf16")
    index_ok = checks["index_fp8" if fp8 else "index_bf16"]["ok"]
    attn_ok = checks["sparse_attention"]["ok"] and checks["merge"]["ok"]
    ids, _ = select_blocks_triton(*index_args(p), topk=TOPK, max_q_len=1)
    if index_ok:
        row["index_us"] = graph_time_us(lambda: select_blocks_triton(*index_args(p), topk=TOPK, max_q_len=1))
    if attn_ok:
        row["sparse_attention_us"] = graph_time_us(
            lambda: sparse_attention_triton(*attention_args(p), ids, scale=SCALE, max_q_len=1)
        )
    if index_ok and attn_ok and checks["msa_decode"]["ok"]:
        row["msa_us"] = graph_time_us(lambda: msa_step(p))
    n_blocks = min(TOPK, triton.cdiv(L, BLOCK))
    floor_bytes = B * (L * DIM * p["ik"].element_size() + KV_HEADS * n_blocks * BLOCK * DIM * 2 * 2)
    row["floor_us"] = floor_bytes / bw * 1e6
    if "msa_us" in row:
        row["fraction_of_floor"] = row["floor_us"] / row["msa_us"]
    if checks["dense_attention"]["ok"] and not fp8:
        row["triton_dense_paged_us"] = graph_time_us(
            lambda: paged_attention_triton(*attention_args(p), scale=SCALE, max_q_len=1)
        )
    return row


def dense_decode(B: int, L: int, bw: float) -> dict:
    t, best, all_times = fastest_sdpa(lambda name: sdpa_decode_fn(B, L, 1, name), graph_time_us)
    torch.cuda.empty_cache()
    return dict(
        sdpa_us=t,
        sdpa_backend=best,
        sdpa_all_us=all_times,
        dense_floor_us=B * L * KV_HEADS * DIM * 2 * 2 / bw * 1e6,
    )


def chunked_prefill(p: dict, chunk: int, block_t: int | None = None):
    """One MSA layer's prefill of the one sequence of ``p`` in ``chunk``-token chunks: each chunk
    selects blocks over its prefix (causal inside the chunk) and attends to them. Returns callables
    (index_only, attention_only, both); attention_only attends to the selections the index made
    once, here. ``block_t``: query tokens per attention program (None: the kernel's choice)."""
    L = p["L"]
    cus = torch.tensor([0, chunk], device=DEV, dtype=torch.int32)
    steps = []
    for s in range(0, L, chunk):
        n = min(chunk, L - s)
        cu = cus if n == chunk else torch.tensor([0, n], device=DEV, dtype=torch.int32)
        sl = torch.tensor([s + n], device=DEV, dtype=torch.int32)
        steps.append((slice(s, s + n), cu, sl, n))

    def index_only():
        return [
            select_blocks_triton(p["iq"][r], p["ik"], p["table"], cu, sl, topk=TOPK, max_q_len=n)[0]
            for r, cu, sl, n in steps
        ]

    all_ids = index_only()

    def attention_only():
        for (r, cu, sl, n), ids in zip(steps, all_ids, strict=True):
            sparse_attention_triton(
                p["q"][r], p["k"], p["v"], p["table"], cu, sl, ids, scale=SCALE, max_q_len=n, block_t=block_t
            )

    def both():
        for r, cu, sl, n in steps:
            ids, _ = select_blocks_triton(p["iq"][r], p["ik"], p["table"], cu, sl, topk=TOPK, max_q_len=n)
            sparse_attention_triton(
                p["q"][r], p["k"], p["v"], p["table"], cu, sl, ids, scale=SCALE, max_q_len=n, block_t=block_t
            )

    return index_only, attention_only, both


def msa_prefill_ms(
    L: int, chunk: int, index_dtype=torch.bfloat16, smooth: bool = False, block_t: int | None = None
) -> dict:
    """One MSA layer over L tokens of one sequence, in chunks (``chunked_prefill``): index, attention
    and both, timed."""
    index_only, attention_only, both = chunked_prefill(
        paged_problem(1, L, L, index_dtype, smooth=smooth), chunk, block_t
    )
    reps = 3 if L <= 2**17 else 1
    res = dict(
        context=L,
        chunk=chunk,
        queries="smooth" if smooth else "independent",
        block_t=block_t,
        index_ms=event_time_ms(index_only, reps),
        sparse_attention_ms=event_time_ms(attention_only, reps),
        msa_ms=event_time_ms(both, reps),
    )
    # Floors: the index and attention matmul FLOPs over the measured bf16 matmul rate.
    res["index_tflop"] = KV_HEADS * 2 * DIM * L * (L + 1) / 2 / 1e12
    n_keys = sum(min(TOPK * BLOCK, (t // BLOCK) * BLOCK + t % BLOCK + 1) for t in range(0, L, 64)) * 64
    res["attention_tflop"] = HEADS * 4 * DIM * n_keys / 1e12
    return res


def dense_prefill_ms(L: int) -> dict:
    def make(name):
        q = torch.randn(1, HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(1, KV_HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(1, KV_HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)

        def fn():
            with sdpa_kernel(BACKENDS[name]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)

        return fn

    t, best, all_times = fastest_sdpa(make, lambda fn: event_time_ms(fn, 2))
    return dict(
        sdpa_ms=t,
        sdpa_backend=best,
        sdpa_all_ms=all_times,
        dense_tflop=HEADS * 4 * DIM * L * (L + 1) / 2 / 1e12,
    )


def dense_prefill_once_ms(L: int, backend: str) -> dict:
    """One timed run of the given SDPA backend (at 1M one run takes tens of seconds)."""
    q = torch.randn(1, HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, KV_HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(1, KV_HEADS, L, DIM, device=DEV, dtype=torch.bfloat16)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with sdpa_kernel(BACKENDS[backend]):
        start.record()
        F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE, enable_gqa=True)
        end.record()
    torch.cuda.synchronize()
    del q, k, v
    torch.cuda.empty_cache()
    return dict(
        sdpa_ms=start.elapsed_time(end),
        sdpa_backend=backend,
        sdpa_runs=1,
        dense_tflop=HEADS * 4 * DIM * L * (L + 1) / 2 / 1e12,
    )


def matmul_rate() -> float:
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


# ---------------------------------------------------------------- report


def fits(B: int, L: int) -> bool:
    need = B * L * (KV_HEADS * DIM * 2 * 2 * 2 + DIM * 2) * 1.2  # paged + contiguous K/V, index keys
    return need < torch.cuda.get_device_properties(0).total_memory * 0.8


def print_table(res: dict) -> None:
    print(f"\n{res['gpu']}  torch {res['torch']}  triton {res['triton']}  copy {res['copy_bw_gbs']:.0f} GB/s")
    print(
        f"{'B':>2} {'L':>8} {'idx':>4} {'index':>8} {'attn':>8} {'MSA':>8} {'floor':>8} {'%floor':>6} "
        f"{'SDPA':>9} {'backend':>9} {'speedup':>7}"
    )
    for r in res["decode"]:
        msa, sd = r.get("msa_us"), r.get("sdpa_us")
        f = lambda x: f"{x:8.1f}" if isinstance(x, float) else f"{'-':>8}"
        print(
            f"{r['batch']:>2} {r['context']:>8} {r['index_keys']:>4} {f(r.get('index_us'))} "
            f"{f(r.get('sparse_attention_us'))} {f(msa)} {f(r['floor_us'])} "
            f"{100 * r.get('fraction_of_floor', 0):5.0f}% {f(sd)} {str(r.get('sdpa_backend')):>9} "
            f"{(sd / msa if msa and sd else 0):6.1f}x"
        )
    for r in res["prefill"]:
        print(
            f"prefill L={r['context']} ({r['queries']} queries): MSA {r['msa_ms']:.1f} ms "
            f"(index {r['index_ms']:.1f}, attention "
            f"{r['sparse_attention_ms']:.1f}), dense SDPA {r.get('sdpa_ms')} ms ({r.get('sdpa_backend')}), "
            f"speedup {r.get('speedup', float('nan')):.1f}x"
        )
    print(f"decode crossover (batch 1, bf16 index keys): {res.get('decode_crossover')}")


def sweep(part: str) -> None:
    """Tuning sweep (not part of the report): per-kernel times over the launch parameters, and the
    cost of a kernel launch inside a graph. ``part``: one of the ``--sweep`` choices."""
    x = torch.zeros(16, device=DEV)
    for n in (1, 2):
        print(f"graph of {n} tiny kernels: {graph_time_us(lambda n=n: [x.add_(1) for _ in range(n)]):.1f} us")
    shapes = ((2048, 1), (8192, 1), (32768, 1), (131072, 1), (1048576, 1), (131072, 8))
    for L, B in shapes if part in ("all", "decode", "select") else ():
        if part == "select" and L < 8192:
            continue
        for dt in (torch.bfloat16, torch.float8_e4m3fn):
            if dt != torch.bfloat16 and L < 131072:
                continue
            sweep_decode(L, B, dt)
            torch.cuda.empty_cache()
    prefill_tiles = part in ("all", "prefill", "select")
    for smooth in (False, True) if prefill_tiles else ():
        sweep_prefill(smooth)
        torch.cuda.empty_cache()
    if part in ("all", "prefill", "prefill-index"):
        sweep_prefill_index()
    if part in ("all", "dense-decode"):
        for L, B in ((8192, 1), (16384, 1), (65536, 1), (131072, 1), (8192, 4), (8192, 8), (1048576, 1)):
            sweep_dense_decode(L, B)
            torch.cuda.empty_cache()
    if part in ("all", "prefill", "block-major"):
        for L in (131072, 1048576):
            for smooth in (False, True):
                sweep_block_major(L, smooth)
                torch.cuda.empty_cache()
    if part in ("all", "index-stages"):
        sweep_index_stages()
    if part in ("all", "read-floor"):
        sweep_read_floor()
    if part in ("all", "profile"):
        sweep_profile()
    if part in ("all", "shared-tile"):
        for L in (131072, 1048576):
            for smooth in (False, True):
                sweep_shared_tile(L, smooth)
                torch.cuda.empty_cache()
    if part in ("all", "tma"):
        for smooth in (False, True):
            sweep_tma(smooth)
    if part in ("all", "whole-steps"):
        sweep_whole_steps()
    if part in ("all", "index-tma"):
        sweep_index_tma()
    if part in ("all", "decode-select"):
        for L, B in (
            (32768, 1),
            (131072, 1),
            (524288, 1),
            (1048576, 1),
            (131072, 4),
            (131072, 8),
            (1048576, 8),
        ):
            sweep_decode_select(L, B)
            torch.cuda.empty_cache()
    if part in ("all", "merge"):
        for L, B in ((2048, 1), (2048, 4), (2048, 8), (8192, 1), (8192, 8), (131072, 1), (131072, 4)):
            sweep_merge(L, B)
            torch.cuda.empty_cache()


def kernel_breakdown(tag: str, fn, reps: int = 20) -> None:
    """Device time of each kernel ``fn`` launches (profiler records, cold L2 before each call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            cold_l2()
            fn()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        us = getattr(ev, "device_time", None) or getattr(ev, "cuda_time", 0.0)
        if ev.count >= reps and "reduce" not in ev.key and us > 0:
            print(f"{tag} kernel {ev.key[:70]}: {ev.count // reps} x {us:.1f} us", flush=True)


def tile_unions(ids: torch.Tensor, tile: int) -> torch.Tensor:
    """Distinct blocks selected by each tile of ``tile`` consecutive tokens, per KV group."""
    T, G, K = ids.shape
    x = ids[: T // tile * tile].view(T // tile, tile, G, K).permute(0, 2, 1, 3).reshape(-1, tile * K)
    x = x.sort(1).values
    return ((x[:, 1:] != x[:, :-1]) & (x[:, 1:] >= 0)).sum(1) + (x[:, 0] >= 0)


# The shared first pass of sparse prefill: (tokens per tile, crowded share, pipeline stages, K/V
# loaded by TMA), the default first.
SHARED_TILE_SETTINGS = (
    (4, 1 / 2, 1, True),
    (4, 1 / 2, 1, False),
    (4, 1 / 3, 1, True),
    (4, 2 / 3, 1, True),
    (4, 1 / 2, 2, True),
    (2, 1 / 2, 1, True),
    (8, 1 / 2, 1, True),
    (8, 1 / 3, 1, True),
    (8, 1 / 3, 2, True),
)


def sweep_shared_tile(L: int, smooth: bool) -> None:
    """The attention of a whole chunked prefill (``chunked_prefill``, 8K-token chunks) per shared
    first-pass setting (``SHARED_TILE_SETTINGS``), the settings alternating, a few rounds each."""
    p = paged_problem(1, L, L, torch.bfloat16, smooth=smooth)
    _, attention_only, _ = chunked_prefill(p, 8192)

    def measure(setting):
        sparse_triton._SHARED_TILE, sparse_triton._CROWDED_SHARE = setting[:2]
        sparse_triton._SHARED_STAGES, sparse_triton._TMA = setting[2:]
        return event_time_ms(attention_only, 3 if L <= 2**17 else 1)

    with restoring(sparse_triton, "_SHARED_TILE", "_CROWDED_SHARE", "_SHARED_STAGES", "_TMA"):
        times = alternating(SHARED_TILE_SETTINGS, measure, 3 if L <= 2**17 else 2)
    for (tile, share, stages, tma), ts in times.items():
        print(
            f"L={L} smooth={smooth} attention, shared tile={tile} crowded share={share:.2f} "
            f"stages={stages} {'TMA' if tma else 'pointer loads'}: "
            + " ".join(f"{t:.1f}" for t in ts)
            + " ms",
            flush=True,
        )


def sweep_tma(smooth: bool) -> None:
    """K/V by TMA against pointer loads, alternating, outside the shared first pass: the last 8K
    chunk of a 128K prefill with its crowded tiles token by token (no block-major), and in one
    token-by-token pass at the default, 2 and 3 stages; a dense 8K-token chunk over 32K and 128K; dense
    decode over long block tables."""
    L, n = 131072, 8192
    p = paged_problem(1, L, L, torch.bfloat16, smooth=smooth)
    r = slice(L - n, L)
    cu = torch.tensor([0, n], device=DEV, dtype=torch.int32)
    sl = torch.tensor([L], device=DEV, dtype=torch.int32)
    ids, _ = select_blocks_triton(p["iq"][r], p["ik"], p["table"], cu, sl, topk=TOPK, max_q_len=n)
    args = (p["q"][r], p["k"], p["v"], p["table"], cu, sl, ids)
    tag = f"L={L} last chunk smooth={smooth}"
    # Crowded tiles: the first pass keeps its stages (a count given would also set them).
    for what, kw, counts in (
        ("crowded tiles token by token", dict(by_block=False), (None,)),
        ("one token-by-token pass", dict(block_t=1), (None, 2, 3)),
    ):
        _tma_ab(
            f"{tag} {what}",
            lambda stages, kw=kw, a=args: sparse_attention_triton(
                *a, scale=SCALE, max_q_len=n, num_stages=stages, **kw
            ),
            event_time_ms,
            "ms",
            stage_counts=counts,
        )
    del p, args, ids
    if smooth:
        return
    for L in (32768, 131072):
        p = paged_problem(1, L, n, torch.bfloat16)
        _tma_ab(
            f"dense chunk of {n} over L={L}",
            lambda stages, p=p: dense_chunk(p, n, stages),
            event_time_ms,
            "ms",
        )
        del p
    for L, B in ((131072, 1), (131072, 4), (32768, 8)):
        p = paged_problem(B, L, 1, torch.bfloat16)
        kv = attention_args(p)
        _tma_ab(
            f"dense decode L={L} B={B}",
            lambda stages, kv=kv: paged_attention_triton(*kv, scale=SCALE, max_q_len=1),
            graph_time_us,
            "us",
            stage_counts=(None,),
        )
        del p, kv
    torch.cuda.empty_cache()


def dense_chunk(p: dict, n: int, stages: int | None = None):
    """Dense causal attention of the last ``n`` tokens of ``p``'s one sequence (a prefill chunk of
    a dense layer), in the paged kernel."""
    cu = torch.tensor([0, n], device=DEV, dtype=torch.int32)
    return sparse_triton.launch_paged_attention(
        p["q"],
        p["k"],
        p["v"],
        p["table"],
        cu,
        p["seq_lens"],
        None,
        scale=SCALE,
        shard_rank=0,
        shard_world=1,
        max_q_len=n,
        block_t=None,
        num_splits=None,
        name="paged_attention",
        num_stages=stages,
    )


def sweep_whole_steps() -> None:
    """Prefill tiles walking their whole blocks first with rows masked (``_WHOLE_STEPS``) against
    every step masked score by score, alternating: the 128K prefill's attention with both kinds of
    query, and a dense 8K-token chunk over 32K and 128K."""
    how = ("whole blocks first", "every step masked by score")
    L, n = 131072, 8192
    for smooth in (True, False):
        _, attention_only, _ = chunked_prefill(paged_problem(1, L, L, torch.bfloat16, smooth=smooth), n)
        _flag_ab(f"L={L} smooth={smooth} attention", "_WHOLE_STEPS", how, attention_only, event_time_ms, "ms")
        del attention_only
        torch.cuda.empty_cache()
    for L in (32768, 131072):
        p = paged_problem(1, L, n, torch.bfloat16)
        _flag_ab(
            f"dense chunk of {n} over L={L}",
            "_WHOLE_STEPS",
            how,
            lambda p=p: dense_chunk(p, n),
            event_time_ms,
            "ms",
        )
        del p
        torch.cuda.empty_cache()


def _tma_ab(tag: str, fn, time_fn, unit: str, stage_counts=(None, 2, 3)) -> None:
    """``fn(stages)`` timed with K/V by TMA and by pointer loads at each of ``stage_counts`` (None:
    the launcher's choice), the variants alternating over three rounds."""
    _flag_ab(tag, "_TMA", ("TMA", "pointer loads"), fn, time_fn, unit, stage_counts)


def _flag_ab(
    tag: str, flag: str, how: tuple[str, str], fn, time_fn, unit: str, stage_counts=None, module=sparse_triton
) -> None:
    """``fn`` timed with the kernel switch ``module.<flag>`` on and off (``how``: what each
    means), the variants alternating over three rounds. With ``stage_counts``, ``fn(stages)`` at
    each count (None: the launcher's choice)."""

    def measure(variant):
        on, stages = variant
        setattr(module, flag, on)
        return time_fn(fn if stage_counts is None else lambda: fn(stages))

    with restoring(module, flag):
        times = alternating([(on, st) for st in stage_counts or (None,) for on in (True, False)], measure, 3)
    for (on, st), ts in times.items():
        label = how[0] if on else how[1]
        if stage_counts is not None:
            label += f", stages={st or 'default'}"
        print(f"{tag}, {label}: " + " ".join(f"{t:.2f}" for t in ts) + f" {unit}", flush=True)


def sweep_prefill(smooth: bool) -> None:
    p = paged_problem(1, 131072, 8192, torch.bfloat16, smooth=smooth)
    a = index_args(p)
    ids, _ = select_blocks_triton(*a, topk=TOPK, max_q_len=8192)
    kv = (*attention_args(p), ids)
    tag = f"prefill chunk smooth={smooth}"
    for tile in (4, 8, 16):
        u = tile_unions(ids, tile).float()
        print(f"{tag} union of {tile}-token tiles: mean {u.mean():.1f}, median {u.median():.0f} blocks")
    for bt in (1, 2, 4, 8):
        t = event_time_ms(
            lambda bt=bt: sparse_attention_triton(*kv, scale=SCALE, max_q_len=8192, block_t=bt), 3
        )
        print(f"{tag} attention block_t={bt}: {t:.2f} ms", flush=True)
    with restoring(sparse_triton, "_SHARED_TILE", "_CROWDED_SHARE", "_SHARED_STAGES"):
        for tile, share, stages, warps in SHARED_TILE_SETTINGS + ((8, 1 / 3, 2, 4), (4, 1 / 2, 1, 8)):
            sparse_triton._SHARED_TILE, sparse_triton._CROWDED_SHARE = tile, share
            sparse_triton._SHARED_STAGES = stages
            try:
                t = event_time_ms(
                    lambda w=warps: sparse_attention_triton(*kv, scale=SCALE, max_q_len=8192, num_warps=w), 3
                )
            except Exception as e:  # e.g. out of shared memory
                t = float("nan")
                print(f"{tag} {type(e).__name__}: {str(e)[:100]}")
            print(
                f"{tag} attention shared tile={tile} crowded share={share:.2f} stages={stages} "
                f"warps={warps}: {t:.2f} ms",
                flush=True,
            )
    for bt, cb, nw in (
        (None, None, None),
        (32, None, None),
        (128, None, None),
        (64, 64, None),
        (64, 16, None),
        (64, None, 4),
    ):
        t = event_time_ms(
            lambda bt=bt, cb=cb, nw=nw: select_blocks_triton(
                *a, topk=TOPK, max_q_len=8192, block_t=bt, chunk_blocks=cb, num_warps=nw
            ),
            3,
        )
        print(f"{tag} index block_t={bt} chunk={cb} warps={nw}: {t:.2f} ms", flush=True)


def sweep_block_major(L: int, smooth: bool) -> None:
    """The last 8K-token chunk of L tokens: the query-tile prefill kernel against the block-major
    one per tile shape, and what the block-major plan (the inverted selection) costs alone."""
    p = paged_problem(1, L, 8192, torch.bfloat16, smooth=smooth)
    a = index_args(p)
    ids, _ = select_blocks_triton(*a, topk=TOPK, max_q_len=8192)
    kv = (*attention_args(p), ids)
    tag = f"block-major L={L} smooth={smooth}"
    ref = sparse_attention_triton(*kv, scale=SCALE, max_q_len=8192, by_block=False)
    for by_block, what in ((False, "query tiles only"), (None, "default"), (True, "block-major only")):
        t = event_time_ms(
            lambda b=by_block: sparse_attention_triton(*kv, scale=SCALE, max_q_len=8192, by_block=b)
        )
        err = rel_err(sparse_attention_triton(*kv, scale=SCALE, max_q_len=8192, by_block=by_block)[0], ref[0])
        print(f"{tag} attention, {what}: {t:.2f} ms (rel err {err:.1e})", flush=True)
    kernel_breakdown(f"{tag} default", lambda: sparse_attention_triton(*kv, scale=SCALE, max_q_len=8192), 3)
    token_seq = torch.zeros(8192, dtype=torch.int32, device=DEV)
    for tile in (8, 32):
        t = event_time_ms(
            lambda tile=tile: plan_block_major(
                ids, token_seq, n_seqs=1, table_width=p["table"].shape[1], shard_rank=0, shard_world=1,
                tile_tokens=tile,
            )
        )  # fmt: skip
        print(f"{tag} plan tile={tile}: {t:.2f} ms", flush=True)
    out, lse = torch.empty_like(ref[0]), torch.empty_like(ref[1])
    for bt, tile, warps, stages in (
        (4, 32, None, None),
        (4, 128, None, None),
        (8, 64, None, None),
        (8, 128, None, None),
        (4, 64, 8, None),
        (4, 64, None, 3),
        (2, 64, None, None),
    ):
        try:
            t = event_time_ms(
                lambda bt=bt, tile=tile, w=warps, st=stages: block_major_attention(
                    *kv, out, lse, scale=SCALE, shard_rank=0, shard_world=1, block_t=bt, tile_tokens=tile,
                    num_warps=w, num_stages=st,
                )
            )  # fmt: skip
            err = rel_err(out, ref[0])
        except Exception as e:  # e.g. out of shared memory
            t, err = float("nan"), float("nan")
            print(f"{tag} {type(e).__name__}: {str(e)[:100]}")
        print(
            f"{tag} block_t={bt} tile={tile} warps={warps} stages={stages}: {t:.2f} ms (rel err {err:.1e})",
            flush=True,
        )


def sweep_prefill_index() -> None:
    """The prefill index over the last 8K-token chunk of 16K, 128K and 1M tokens, per chunk size
    (blocks per program), pipeline depth, and tokens per program with warps (the default: 64 tokens,
    8 warps, one program per SM; 32 tokens on 4 warps fit two programs per SM, more without a
    pipeline)."""
    for L in (16384, 131072, 1048576):
        p = paged_problem(1, L, 8192, torch.bfloat16)
        a = index_args(p)
        for cb, ns, bt, nw in (
            (None, None, None, None),
            (32, None, None, None),
            (16, None, None, None),
            (8, None, None, None),
            (16, 3, None, None),
            (16, 4, None, None),
            (16, 2, None, None),
            (None, 2, 32, 4),
            (None, 3, 32, 8),
            (None, 3, 64, 8),
            (None, 1, 32, 4),
            (None, 1, 16, 4),
            (None, 2, 16, 4),
        ):
            try:
                t = event_time_ms(
                    lambda a=a, cb=cb, ns=ns, bt=bt, nw=nw: select_blocks_triton(
                        *a,
                        topk=TOPK,
                        max_q_len=8192,
                        chunk_blocks=cb,
                        num_stages=ns,
                        block_t=bt,
                        num_warps=nw,
                    ),
                    3,
                )
            except Exception as e:  # e.g. out of shared memory
                t = float("nan")
                print(f"{type(e).__name__}: {str(e)[:100]}")
            print(
                f"prefill index L={L} chunk={cb} stages={ns} tokens={bt} warps={nw}: {t:.2f} ms", flush=True
            )
        del p
        torch.cuda.empty_cache()


def sweep_index_tma() -> None:
    """The prefill index with its keys by TMA against pointer loads, alternating: the last 8K-token
    chunk of 128K and 1M tokens (bf16 and fp8 keys), and the whole 128K prefill's index."""
    from msa.kernels.indexer import triton as indexer_triton

    how = ("TMA", "pointer loads")
    for L in (131072, 1048576):
        for dt in (torch.bfloat16, torch.float8_e4m3fn):
            p = paged_problem(1, L, 8192, dt)
            a = index_args(p)
            fn = lambda a=a: select_blocks_triton(*a, topk=TOPK, max_q_len=8192)  # noqa: E731
            tag = f"index of the last 8K chunk of L={L} {str(dt)[6:]}"
            _flag_ab(tag, "_TMA", how, fn, event_time_ms, "ms", module=indexer_triton)
            del p, a, fn
            torch.cuda.empty_cache()
    index_only, _, _ = chunked_prefill(paged_problem(1, 131072, 131072, torch.bfloat16), 8192)
    _flag_ab("index of a 128K prefill", "_TMA", how, index_only, event_time_ms, "ms", module=indexer_triton)


def sweep_decode(L: int, B: int, dt: torch.dtype) -> None:
    p = paged_problem(B, L, 1, dt)
    a = index_args(p)
    tag = f"L={L} B={B} {str(dt)[6:]}"
    for kw in (
        {},
        dict(fused_select=True),
        dict(fused_select=False),
        dict(fused_select=False, merge_slice=512),
        dict(fused_select=False, merge_slice=4096),
        dict(step_blocks=1, num_warps=4, num_stages=4),
        dict(chunk_blocks=64, step_blocks=2, num_warps=4, num_stages=3),
    ):
        if kw.get("chunk_blocks", 0) > triton.cdiv(L, BLOCK):
            continue
        try:
            t = graph_time_us(lambda kw=kw: select_blocks_triton(*a, topk=TOPK, max_q_len=1, **kw))
        except Exception as e:  # e.g. out of shared memory
            t = float("nan")
            print(f"{tag} {type(e).__name__}: {str(e)[:100]}")
        print(f"{tag} select {kw or 'defaults'}: {t:.1f} us", flush=True)
    kernel_breakdown(tag, lambda: msa_step(p))
    with restoring(_launch, "PDL"):
        for on in (True, False):
            _launch.PDL = on
            t = graph_time_us(lambda: msa_step(p))
            print(f"{tag} MSA step, programmatic dependent launch {on}: {t:.1f} us", flush=True)
    if dt != torch.bfloat16:
        return
    ids, _ = select_blocks_triton(*a, topk=TOPK, max_q_len=1)
    kv = attention_args(p)
    for ns, nw in ((None, None), (16, 4), (8, 4), (8, 8), (4, 8), (16, 2)):
        t = graph_time_us(
            lambda ns=ns, nw=nw: sparse_attention_triton(
                *kv, ids, scale=SCALE, max_q_len=1, num_splits=ns, num_warps=nw
            )
        )
        print(f"{tag} sparse attention splits={ns} warps={nw}: {t:.1f} us", flush=True)
    if L <= 8192:
        t = graph_time_us(lambda: paged_attention_triton(*kv, scale=SCALE, max_q_len=1))
        print(f"{tag} dense paged attention: {t:.1f} us", flush=True)
        t = graph_time_us(lambda: msa_step(p))
        print(f"{tag} MSA step: {t:.1f} us", flush=True)
        d, best, _ = fastest_sdpa(lambda name: sdpa_decode_fn(B, L, 1, name), graph_time_us)
        print(f"{tag} SDPA {best}: {d:.1f} us", flush=True)


SELECT_LIMITS = (0, 256, 1024, 4096)


def sweep_decode_select(L: int, B: int) -> None:
    """The MSA decode step with its final top-k taken by the attention launch (from the scoring's
    candidates up to a limit per head, past it from the merge launch's slices' picks) against the
    merge launch taking it (limit 0), the variants alternating over three rounds."""
    p = paged_problem(B, L, 1, torch.bfloat16)
    ref = msa_step(p)
    with restoring(sparse_triton, "_ATTENTION_SELECT_MAX"):
        for limit in SELECT_LIMITS:
            sparse_triton._ATTENTION_SELECT_MAX = limit
            ids = msa_step(p)[2]
            assert torch.equal(ids, ref[2]), f"selection changed with limit {limit}"

        def measure(limit):
            sparse_triton._ATTENTION_SELECT_MAX = limit
            return graph_time_us(lambda: msa_step(p))

        times = alternating(SELECT_LIMITS, measure, 3)
    for limit, ts in times.items():
        how = f"attention launch from up to {limit} candidates" if limit else "merge launch"
        print(
            f"L={L} B={B} final top-k by the {how}: " + " ".join(f"{t:.1f}" for t in ts) + " us", flush=True
        )


def sweep_dense_decode(L: int, B: int) -> None:
    """Dense paged decode (the dense layers): the split-per-block kernel where its grid allows,
    and the loop kernel over split counts, warps and stages, beside the fastest SDPA."""
    p = paged_problem(B, L, 1, torch.bfloat16)
    kv = attention_args(p)
    tag = f"L={L} B={B} dense"
    d, best, _ = fastest_sdpa(lambda name: sdpa_decode_fn(B, L, 1, name), graph_time_us)
    floor = B * L * KV_HEADS * DIM * 4 / copy_bandwidth() * 1e6
    print(f"{tag} SDPA {best}: {d:.1f} us, floor {floor:.1f} us")
    t = graph_time_us(lambda: paged_attention_triton(*kv, scale=SCALE, max_q_len=1))
    print(f"{tag} default: {t:.1f} us")
    n_blocks = triton.cdiv(L, BLOCK)
    variants = []
    if n_blocks <= 128:
        variants += [("split-per-block", ns, nw, None) for ns in (None, n_blocks) for nw in (4, 8)]
    one_per_sm = triton.cdiv(torch.cuda.get_device_properties(0).multi_processor_count, B * KV_HEADS)
    counts = (None, one_per_sm, 8, 16, 32, 64)
    variants += [("loop", ns, nw, st) for ns in counts for nw in (4, 8) for st in (2, 3)]
    with restoring(sparse_triton, "_DENSE_DECODE_BLOCKS"):
        for kernel, ns, nw, st in variants:
            sparse_triton._DENSE_DECODE_BLOCKS = 1 << 30 if kernel == "split-per-block" else 0
            try:
                t = graph_time_us(
                    lambda ns=ns, nw=nw, st=st: sparse_triton.launch_paged_attention(
                        *kv,
                        None,
                        scale=SCALE,
                        shard_rank=0,
                        shard_world=1,
                        max_q_len=1,
                        block_t=None,
                        num_splits=ns,
                        name="paged_attention",
                        num_warps=nw,
                        num_stages=st,
                    )  # fmt: skip
                )
            except Exception as e:  # e.g. out of shared memory
                t = float("nan")
                print(f"{tag} {type(e).__name__}: {str(e)[:100]}")
            print(f"{tag} {kernel} splits={ns} warps={nw} stages={st}: {t:.1f} us", flush=True)


def sweep_index_stages() -> None:
    """Decode index: three steps in flight against four (bf16; fp8 runs three), alternating, three
    times each; the first of a row pays the warm-up."""
    for B, L, dt in (
        (8, 1048576, torch.bfloat16),
        (8, 1048576, torch.float8_e4m3fn),
        (4, 1048576, torch.bfloat16),
        (1, 1048576, torch.bfloat16),
        (8, 131072, torch.bfloat16),
    ):
        p = paged_problem(B, L, 1, dt)
        a = index_args(p)
        res = []
        for _ in range(3):
            for st in (3, 4) if dt == torch.bfloat16 else (3,):

                def index(st=st, a=a):
                    return select_blocks_triton(*a, topk=TOPK, max_q_len=1, num_stages=st)

                t = graph_time_us(index, reps=50)
                res.append(f"st{st} {t:.1f}")
        print(f"B={B} L={L} {str(dt)[6:]}: " + ", ".join(res), flush=True)
        del p, a
        torch.cuda.empty_cache()


def sweep_merge(L: int, B: int) -> None:
    """Decode with split-K partials merged by a launch of their own for grids of up to 0 (never),
    1 or 2 waves of programs: dense attention, sparse attention and the MSA step."""
    p = paged_problem(B, L, 1, torch.bfloat16)
    kv = attention_args(p)
    ids, _ = select_blocks_triton(*index_args(p), topk=TOPK, max_q_len=1)
    with restoring(sparse_triton, "_MERGE_WAVES"):
        for waves in (0, 1, 2):
            sparse_triton._MERGE_WAVES = waves
            t = graph_time_us(lambda: paged_attention_triton(*kv, scale=SCALE, max_q_len=1))
            line = f"L={L} B={B} merge launch up to {waves} waves: dense {t:.1f} us"
            if selection_needed(L, BLOCK, TOPK):
                t = graph_time_us(lambda: sparse_attention_triton(*kv, ids, scale=SCALE, max_q_len=1))
                line += f", sparse attention {t:.1f} us, MSA step {graph_time_us(lambda: msa_step(p)):.1f} us"
            print(line, flush=True)


@triton.jit
def _read_stream_kernel(x_ptr, q_ptr, out_ptr, TILES: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr):
    """Program p reads tiles p * TILES ... of ``[ROWS, D]`` keys (contiguous) and keeps each of 16
    query rows' max score over them: the index's loads and matmul, without pages, masks or top-k."""
    pid = tl.program_id(0)
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + tl.arange(0, 16)[:, None] * D + offs_d[None, :])
    best = tl.full([16], float("-inf"), tl.float32)
    for i in range(TILES):
        tile = (pid * TILES + i).to(tl.int64)
        k = tl.load(x_ptr + tile * ROWS * D + offs_r[:, None] * D + offs_d[None, :])
        best = tl.maximum(best, tl.max(tl.dot(q, tl.trans(k)), 1))
    tl.store(out_ptr + pid * 16 + tl.arange(0, 16), best)


def sweep_read_floor(L: int = 1048576) -> None:
    """Batch-1 decode at ``L`` (bf16 index keys) against what reading its index keys can cost: a
    kernel that only streams the same bytes (every grid size and pipeline depth tried), the
    scoring launch alone, the selection (scoring + candidate merge), the MSA step, each kernel's
    device time, and dense SDPA."""
    p = paged_problem(1, L, 1, torch.bfloat16)
    a = index_args(p)
    keys = p["ik"].view(-1, DIM)
    tiles = keys.shape[0] // BLOCK
    q = torch.randn(16, DIM, device=DEV, dtype=torch.bfloat16)
    gbytes = keys.numel() * keys.element_size() / 1e9
    print(f"L={L}: {gbytes * 1e3:.0f} MB of index keys", flush=True)
    for programs in (128, 256, 512, 1024):
        out = torch.empty(programs * 16, device=DEV)
        for stages in (2, 3, 4):
            for warps in (4, 8):

                def stream(programs=programs, out=out, stages=stages, warps=warps):
                    _read_stream_kernel[(programs,)](
                        keys, q, out, tiles // programs, BLOCK, DIM, num_stages=stages, num_warps=warps
                    )

                t = graph_time_us(stream)
                print(
                    f"read stream programs={programs} stages={stages} warps={warps}: {t:.1f} us "
                    f"({gbytes / t * 1e3:.2f} TB/s)",
                    flush=True,
                )

    def scoring():
        return launch_chunk_scores(
            *a,
            topk=TOPK,
            shard_rank=0,
            shard_world=1,
            longest=1,
            block_t=None,
            chunk_blocks=None,
            num_stages=None,
            fused_select=False,
        )

    print(f"scoring launch alone: {graph_time_us(scoring):.1f} us", flush=True)
    t = graph_time_us(lambda: select_blocks_triton(*a, topk=TOPK, max_q_len=1))
    print(f"selection (scoring + candidate merge): {t:.1f} us", flush=True)
    print(f"MSA step: {graph_time_us(lambda: msa_step(p)):.1f} us", flush=True)
    kernel_breakdown(f"L={L} MSA step", lambda: msa_step(p))
    d, best, _ = fastest_sdpa(lambda name: sdpa_decode_fn(1, L, 1, name), graph_time_us)
    print(f"dense SDPA ({best}): {d:.1f} us", flush=True)


def decode_timeline(L: int, steps: int = 20) -> None:
    """Where a batch-1 decode step's time goes: ``steps`` steps replayed from one CUDA graph, each
    after a cold L2, and each kernel's start and end (profiler records) relative to the end of the
    L2 eviction before it, median over the steps."""
    from torch.profiler import ProfilerActivity, profile

    p = paged_problem(1, L, 1, torch.bfloat16)

    def cold_steps():
        for _ in range(steps):
            cold_l2()
            msa_step(p)

    graph = capture_graph(cold_steps)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(
        (e for e in prof.events() if e.device_type.name == "CUDA" and "mem" not in e.name.lower()),
        key=lambda e: e.time_range.start,
    )
    spans: dict[str, list[tuple[float, float]]] = {}
    flush_end = None
    for e in kernels:
        if "reduce" in e.name:  # the L2 eviction (a sum) that starts each step
            flush_end = e.time_range.end
        elif flush_end is not None:
            span = (e.time_range.start - flush_end, e.time_range.end - flush_end)
            spans.setdefault(e.name, []).append(span)
    step = graph_time_us(lambda: msa_step(p))
    print(f"decode timeline L={L} batch 1 (graph step {step:.1f} us):", flush=True)
    for name, v in spans.items():
        start = sorted(a for a, _ in v)[len(v) // 2]
        end = sorted(b for _, b in v)[len(v) // 2]
        print(f"  {name[:40]:40s} starts {start:6.2f} us, ends {end:6.2f} us ({len(v)} steps)", flush=True)


def kernel_resources(*kernels) -> None:
    """Registers, spills and shared memory of every compiled variant of each Triton kernel, and how
    many of its programs an SM holds by each (warps, registers, shared memory)."""
    props = torch.cuda.get_device_properties(0)
    smem = getattr(props, "shared_memory_per_multiprocessor", 233472)
    regs = getattr(props, "regs_per_multiprocessor", 65536)
    for fn in kernels:
        for cache in fn.device_caches.values():
            compiled = next(c for c in cache if isinstance(c, dict))
            for k in compiled.values():
                warps, shared = k.metadata.num_warps, k.metadata.shared
                if getattr(k, "n_regs", None) is None:  # compiled, but its launch found it too large
                    print(f"  {fn.__name__}: {warps} warps, {shared / 1024:.0f} KB shared: never loaded")
                    continue
                by_regs = regs // max(1, k.n_regs * 32 * warps)
                per_sm = min(64 // warps, by_regs, smem // (shared + 1024))  # 1 KB reserved per program
                print(
                    f"  {fn.__name__}: {warps} warps, {k.n_regs} registers/thread, {k.n_spills} spilled, "
                    f"{shared / 1024:.0f} KB shared -> {per_sm} program(s) per SM",
                    flush=True,
                )


def prefill_profile(L: int, smooth: bool, chunk: int = 8192) -> None:
    """Device time of each kernel of one MSA layer's prefill (``chunked_prefill``: the index, then
    the attention) over ``L`` tokens, with independent or ``smooth`` queries."""
    from torch.profiler import ProfilerActivity, profile

    index_only, attention_only, _ = chunked_prefill(
        paged_problem(1, L, L, torch.bfloat16, smooth=smooth), chunk
    )
    queries = "smooth" if smooth else "independent"
    for part, fn in (("index", index_only), ("attention", attention_only)):
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = sorted(
            ((ev.key, ev.count, getattr(ev, "device_time_total", 0.0)) for ev in prof.key_averages()),
            key=lambda r: -r[2],
        )
        total = sum(us for _, _, us in rows)
        print(f"prefill L={L} {queries} queries, {part}: {total / 1e3:.1f} ms of kernels", flush=True)
        for key, count, us in rows:
            if us >= 0.01 * total:
                print(f"  {key[:60]:60s} {us / 1e3:7.2f} ms in {count} launches", flush=True)


def sweep_profile() -> None:
    """Where the time goes: the batch-1 decode chain's timeline, the 128K prefill's kernels, and
    the resources (hence programs per SM) of each Triton kernel they compiled."""
    from msa.kernels.indexer import triton as indexer_triton
    from msa.kernels.merge import triton as merge_triton
    from msa.kernels.sparse_attention import block_major

    for L in (131072, 1048576):
        decode_timeline(L)
        torch.cuda.empty_cache()
    for smooth in (False, True):
        prefill_profile(131072, smooth)
        torch.cuda.empty_cache()
    print("compiled variants:")
    kernel_resources(
        indexer_triton._score_chunk_topk_kernel,
        indexer_triton._merge_candidates_kernel,
        sparse_triton._decode_kernel,
        sparse_triton._tile_plan_kernel,
        sparse_triton._paged_attention_kernel,
        block_major._block_major_kernel,
        merge_triton._merge_states_kernel,
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a few lengths only")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--no-1m-prefill", action="store_true")
    ap.add_argument(
        "--sweep",
        nargs="?",
        const="all",
        choices=[
            "all",
            "decode",
            "prefill",
            "prefill-index",
            "select",
            "block-major",
            "dense-decode",
            "merge",
            "decode-select",
            "shared-tile",
            "tma",
            "whole-steps",
            "index-tma",
            "index-stages",
            "read-floor",
            "profile",
        ],
        help="tuning sweep only (select: block selection, decode and prefill; prefill-index: the "
        "prefill index alone; block-major: the block-major prefill kernel; dense-decode: the dense "
        "layers' decode kernels; merge: split-K partials merged by a launch of their own or by the last "
        "split; decode-select: the decode step's final top-k taken by the attention launch against the "
        "merge launch; shared-tile: the chunked prefill's attention per setting of its shared first "
        "pass; tma: K/V by TMA against pointer loads in the other prefill passes and dense layers; "
        "whole-steps: prefill tiles walking whole blocks first with rows masked, against every step "
        "masked by score; index-tma: the prefill index's keys by TMA against pointer loads; "
        "index-stages: the decode index's steps in flight; read-floor: batch-1 decode at 1M against "
        "a kernel that only reads its index keys; profile: the batch-1 decode chain's timeline, the 128K "
        "prefill's kernels and each kernel's registers and shared memory)",
    )
    args = ap.parse_args()
    if args.sweep:
        sweep(args.sweep)
        return
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    res = dict(
        gpu=props.name,
        sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        shape=dict(heads=HEADS, kv_heads=KV_HEADS, head_dim=DIM, block=BLOCK, topk=TOPK),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
    )
    bw = copy_bandwidth()
    res["copy_bw_gbs"] = bw / 1e9
    res["matmul_tflops"] = matmul_rate() / 1e12
    res["checks"] = checks = check_kernels()
    print(json.dumps(checks, indent=1), flush=True)

    os.makedirs(args.out, exist_ok=True)
    name = props.name.replace(" ", "-").replace("/", "-")
    path = os.path.join(args.out, f"kernels-{name}{'-quick' if args.quick else ''}.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    lengths = [2048, 8192, 16384, 32768, 131072, 524288, 1048576] if not args.quick else [32768, 1048576]
    batches = [1, 4, 8] if not args.quick else [1]
    res["decode"] = []
    for L in lengths:
        for B in batches:
            if not fits(B, L):
                continue
            dense = dense_decode(B, L, bw)
            for fp8 in (False, True):
                if fp8 and B != 1 and L not in (131072, 1048576):
                    continue
                row = decode_row(B, L, bw, checks, fp8)
                torch.cuda.empty_cache()
                row.update(dense)
                if row.get("msa_us") and row.get("sdpa_us"):
                    row["speedup_vs_sdpa"] = row["sdpa_us"] / row["msa_us"]
                res["decode"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "sdpa_all_us"}), flush=True)
    slower = [
        r["context"]
        for r in res["decode"]
        if r["batch"] == 1 and r["index_keys"] == "bf16" and r.get("speedup_vs_sdpa", 0) < 1
    ]
    res["decode_crossover"] = (
        f"dense faster up to L={max(slower)}"
        if slower
        else f"MSA faster at every measured length (from L={lengths[0]})"
    )

    save()
    res["prefill"] = []
    best = None
    if checks["index_bf16"]["ok"] and checks["sparse_attention"]["ok"]:
        lengths = [131072] if args.no_1m_prefill or args.quick else [131072, 1048576]
        dense = {}
        for L, smooth in [(L, sm) for L in lengths for sm in (False, True)]:
            r = msa_prefill_ms(L, 8192, smooth=smooth)
            torch.cuda.empty_cache()
            if L not in dense:
                dense[L] = dense_prefill_ms(L) if L <= 131072 else dense_prefill_once_ms(L, best)
                best = dense[L].get("sdpa_backend") or best
            r.update(dense[L])
            if r.get("sdpa_ms"):
                r["speedup"] = r["sdpa_ms"] / r["msa_ms"]
            r["index_floor_ms"] = r["index_tflop"] / res["matmul_tflops"] * 1e3
            r["attention_floor_ms"] = r["attention_tflop"] / res["matmul_tflops"] * 1e3
            res["prefill"].append(r)
            print(json.dumps(r), flush=True)
            save()
    save()
    print_table(res)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
