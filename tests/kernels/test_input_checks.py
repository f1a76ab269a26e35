"""The kernel entry points' input checks (metadata on every call, values on the host or with
MSA_CHECK_INPUTS=1) and the results of calls that select no block, on both backends."""

from __future__ import annotations

import math

import pytest
import torch

from msa.kernels import (
    merge_attention_states,
    paged_attention,
    select_and_attend,
    select_blocks,
    sparse_attention,
    store_tokens,
)
from msa.kernels._checks import values_checked
from tests.kernels.test_attention_kernels import CPU, layer_inputs

BACKENDS = ["reference", "triton"]
SCALE = 1 / math.sqrt(CPU["dim"])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", request.param)
    return request.param


def layer(seq_lens=(37, 100), q_lens=(1, 1)):
    """A batch and one shard's q, K/V, index queries, index keys, block table and selection."""
    batch, q, iq, layers = layer_inputs(list(seq_lens), list(q_lens), CPU, torch.float32, "cpu", 1)
    k_cache, v_cache, ik_cache, table = layers[0]
    ids, _ = select_blocks(iq, ik_cache, table, batch.cu_seqlens_q, batch.seq_lens, topk=CPU["topk"])
    return dict(
        q=q, k_cache=k_cache, v_cache=v_cache, index_q=iq, index_k_cache=ik_cache, block_table=table,
        cu_seqlens_q=batch.cu_seqlens_q, seq_lens=batch.seq_lens, block_ids=ids,
    )  # fmt: skip


def call(entry, a, **kw):
    """``entry`` ("select", "sparse", "dense", "layer") on the arguments ``a`` of ``layer()``."""
    tables = (a["block_table"], a["cu_seqlens_q"], a["seq_lens"])
    kv = (a["q"], a["k_cache"], a["v_cache"])
    topk = kw.pop("topk", CPU["topk"])
    if entry == "select":
        return select_blocks(a["index_q"], a["index_k_cache"], *tables, topk=topk, **kw)
    if entry == "sparse":
        return sparse_attention(*kv, *tables, a["block_ids"], scale=SCALE, **kw)
    if entry == "dense":
        return paged_attention(*kv, *tables, scale=SCALE, **kw)
    return select_and_attend(*kv, a["index_q"], a["index_k_cache"], *tables, topk=topk, scale=SCALE, **kw)


# The arguments each entry point checks against the device of its first (q, or index_q).
ARGS = {
    "select": ["index_k_cache", "block_table", "cu_seqlens_q", "seq_lens"],  # beside index_q
    "sparse": ["k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens", "block_ids"],
    "dense": ["k_cache", "v_cache", "block_table", "cu_seqlens_q", "seq_lens"],
    "layer": ["k_cache", "v_cache", "index_q", "index_k_cache", "block_table", "seq_lens"],
}


@pytest.mark.parametrize(
    "entry, arg", [(e, a) for e, args in ARGS.items() for a in args], ids=lambda x: str(x)
)
def test_arguments_on_another_device_are_refused(entry, arg, backend):
    """A tensor on another device than q (here meta beside cpu) is named, not read as if empty."""
    a = layer()
    a[arg] = a[arg].to("meta")
    with pytest.raises(ValueError, match=f"{arg} is on meta"):
        call(entry, a)


def test_merge_and_store_arguments_on_another_device_are_refused(backend):
    with pytest.raises(ValueError, match="lses is on meta"):
        merge_attention_states(torch.zeros(2, 3, 4, 16), torch.zeros(2, 3, 4, device="meta"))
    cache, values, slots = torch.zeros(5, 16, 2, 8), torch.zeros(3, 2, 8), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="slots is on meta"):
        store_tokens(cache, values, slots.to("meta"))
    with pytest.raises(ValueError, match="values is on meta"):
        store_tokens(cache, values.to("meta"), slots)


def test_block_ids_must_be_three_dimensional(backend):
    """A 2-D selection ``[T, H_kv]`` is refused instead of broadcast over the blocks."""
    a = layer()
    a["block_ids"] = a["block_ids"][:, :, 0].contiguous()
    with pytest.raises(ValueError, match=r"block_ids must be 3-D \[T=2, H_kv=2, K\], got \(2, 2\)"):
        call("sparse", a)


@pytest.mark.parametrize("entry", ["select", "layer"])
def test_negative_topk_is_refused(entry, backend):
    with pytest.raises(ValueError, match="topk must be >= 0, got -1"):
        call(entry, layer(), topk=-1)


@pytest.mark.parametrize("entry", ["sparse", "dense"])
def test_no_kv_heads_is_refused(entry, backend):
    a = layer()
    a["k_cache"], a["v_cache"] = a["k_cache"][:, :, :0], a["v_cache"][:, :, :0]
    with pytest.raises(ValueError, match=r"H_kv \(k_cache.shape\[2\]\) must be >= 1, got 0"):
        call(entry, a)


@pytest.mark.parametrize("rank, world", [(2, 2), (0, 0), (-1, 2)])
@pytest.mark.parametrize("entry", list(ARGS))
def test_shard_coordinates_are_checked(entry, rank, world, backend):
    with pytest.raises(ValueError, match=f"shard_rank={rank}, shard_world={world}"):
        call(entry, layer(), shard_rank=rank, shard_world=world)


def test_index_keys_and_kv_share_a_block_size(backend):
    """The index keys' pages are addressed by the K/V block table and block ids: pages of 32
    index keys beside pages of 16 K/V tokens are refused."""
    a = layer()
    a["index_k_cache"] = torch.zeros(a["k_cache"].shape[0], 32, CPU["dim"])
    with pytest.raises(ValueError, match="must share a block size, got 32 and 16"):
        call("layer", a)


def test_triton_names_the_strides_it_needs(monkeypatch):
    """A block table that is a column slice of a wider one: the error says contiguous, with the
    strides needed and those given."""
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    a = layer()
    wide = torch.zeros(a["block_table"].shape[0], 2 * a["block_table"].shape[1], dtype=torch.int32)
    wide[:, : a["block_table"].shape[1]] = a["block_table"]
    a["block_table"] = wide[:, : a["block_table"].shape[1]]
    with pytest.raises(
        ValueError, match=r"block_table must be contiguous .*strides \(7, 1\).*got strides \(14, 1\)"
    ):
        call("dense", a)


def _bad(case, a):
    """Break one value of the layer's arguments; returns the message expected."""
    if case == "cu_seqlens_start":
        a["cu_seqlens_q"] = torch.tensor([1, 1, 2], dtype=torch.int32)
        return r"cu_seqlens_q\[0\] must be 0, got 1"
    if case == "cu_seqlens_decreasing":
        a["cu_seqlens_q"] = torch.tensor([0, 3, 2], dtype=torch.int32)
        return r"cu_seqlens_q\[2\] = 2 after 3"
    if case == "more_queries_than_tokens":
        a["seq_lens"] = torch.tensor([37, 0], dtype=torch.int32)
        return r"sequence 1 has 1 queries \(cu_seqlens_q\) but seq_lens\[1\] is 0"
    if case == "narrow_table":
        a["block_table"] = a["block_table"][:, :3].contiguous()
        return r"block_table has 3 columns but sequence 1 \(seq_lens\[1\] = 100\) needs 7 blocks"
    if case == "unset_page":
        a["block_table"][1, 1] = -1
        return r"block_table\[1, 1\] = -1 is not a page"
    if case == "page_past_cache":
        a["block_table"][1, 6] = a["k_cache"].shape[0]
        return rf"block_table\[1, 6\] = {a['k_cache'].shape[0]} is not a page"
    a["block_ids"][1, 1, 0] = a["block_ids"][1, 1, 1]
    return rf"block_ids\[1, 1\] holds block {int(a['block_ids'][1, 1, 1])} more than once"


BATCH_CASES = [
    "cu_seqlens_start",
    "cu_seqlens_decreasing",
    "more_queries_than_tokens",
    "narrow_table",
    "unset_page",
    "page_past_cache",
]


@pytest.mark.parametrize(
    "case, entry", [(c, e) for c in BATCH_CASES for e in ARGS] + [("duplicate_block_id", "sparse")]
)
def test_bad_values_are_refused_on_the_host(case, entry, backend):
    """CPU tensors are always value-checked (both backends): the error names the argument and
    the offending index and value."""
    a = layer()
    expected = _bad(case, a)
    with pytest.raises(ValueError, match=expected):
        call(entry, a)


def test_table_padding_past_the_used_blocks_is_accepted(backend):
    """Entries past a sequence's blocks are never read: -1 there passes and changes nothing."""
    a = layer()
    full = call("sparse", a)
    a["block_table"][0, 3:] = -1  # sequence 0 (37 tokens) uses 3 blocks
    for got, want in zip(call("sparse", a), full, strict=True):
        torch.testing.assert_close(got, want)


def test_slots_past_the_cache_are_refused(backend):
    cache, values = torch.zeros(5, 16, 2, 8), torch.randn(3, 2, 8)
    with pytest.raises(ValueError, match=r"slots\[1\] = 80 is past the cache's 80 slots"):
        store_tokens(cache, values, torch.tensor([0, 80, 3]))
    assert (cache == 0).all()


def test_values_are_checked_on_the_host_only_by_default(monkeypatch):
    monkeypatch.delenv("MSA_CHECK_INPUTS", raising=False)
    assert values_checked(torch.zeros(1))
    assert not values_checked(torch.zeros(1, device="meta"))


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` of a float dtype filled with NaN: outputs a kernel never writes show up."""
    empty = torch.empty

    def poisoned(*shape, **kw):
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("q_lens", [(1, 1), (37, 5)], ids=["decode", "prefill"])
def test_no_selected_block_gives_zeros_and_lse_minus_inf(q_lens, backend, poisoned_empty):
    """Block ids ``[T, H_kv, 0]`` or top-0: no query sees a key, so out is zeros and lse -inf (a
    decode grid of no splits would leave them unwritten)."""
    a = layer((90, 40), q_lens)
    a["block_ids"] = a["block_ids"][:, :, :0].contiguous()
    T, H = a["q"].shape[:2]
    out, lse = call("sparse", a)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    out, lse, ids = call("layer", a, topk=0)
    assert ids.shape == (T, CPU["kv_heads"], 0)
    assert torch.equal(out, torch.zeros(T, H, CPU["dim"])) and torch.isneginf(lse).all()


@pytest.mark.gpu
def test_value_checks_on_the_gpu_only_with_the_flag(monkeypatch):
    """On CUDA tensors the value checks run with MSA_CHECK_INPUTS=1 only; without it a decode step
    reads no value on the host (CUDA's sync check set to error)."""
    a = {k: v.cuda() for k, v in layer().items()}
    monkeypatch.delenv("MSA_CHECK_INPUTS", raising=False)
    for entry in ("sparse", "dense"):  # compiled before the check
        call(entry, a, max_q_len=1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call("sparse", a, max_q_len=1)
        call("dense", a, max_q_len=1)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    monkeypatch.setenv("MSA_CHECK_INPUTS", "1")
    for case in [*BATCH_CASES, "duplicate_block_id"]:
        bad = {k: v.clone() for k, v in a.items()}
        expected = _bad(case, bad)
        bad = {k: v.cuda() for k, v in bad.items()}
        with pytest.raises(ValueError, match=expected):
            call("sparse", bad)
