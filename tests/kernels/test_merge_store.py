"""Triton merge of partial attention states and the cache store, against their references."""

from __future__ import annotations

import warnings

import pytest
import torch

from msa.kernels import merge_attention_states, store_tokens
from msa.kernels.merge.reference import merge_attention_states_reference


def partial_states(R, T, H, D, dtype, device, empty_shard=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(R, T, H, D, generator=g).to(device, dtype)
    lses = (torch.randn(R, T, H, generator=g) * 3).to(device)
    if empty_shard is not None:
        outs[empty_shard] = 0.0
        lses[empty_shard] = float("-inf")
    lses[0, 0, 0] = float("-inf")  # one part of one row is empty in every case
    outs[0, 0, 0] = 0.0
    return outs, lses


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 4, 16), (2, 5, 8, 32), (4, 2, 20, 64), (7, 3, 4, 16), (70, 2, 4, 16)],
    ids=["one", "two", "four", "seven", "seventy"],  # seven, seventy: partial steps of the streaming loops
)
@pytest.mark.parametrize("empty", [None, 1, "all"], ids=["full", "empty_shard", "all_empty"])
def test_merge_matches_reference(shape, empty, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    R, T, H, D = shape
    outs, lses = partial_states(
        R, T, H, D, torch.float32, "cpu", empty_shard=1 if empty == 1 and R > 1 else None
    )
    if empty == "all":
        outs[:, 1] = 0.0
        lses[:, 1] = float("-inf")
    out, lse = merge_attention_states(outs, lses)
    ref_out, ref_lse = merge_attention_states_reference(outs, lses)
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    if empty == "all":
        assert torch.isneginf(lse[1]).all() and (out[1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("empty", [None, 1], ids=["full", "empty_shard"])
def test_merge_matches_reference_gpu(empty, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    outs, lses = partial_states(4, 33, 64, 128, torch.bfloat16, "cuda", empty_shard=empty)
    out, lse = merge_attention_states(outs, lses)
    ref_out, ref_lse = merge_attention_states_reference(outs, lses)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref_out.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def store_case(device, cache_dtype, backend, monkeypatch):
    monkeypatch.setenv("MSA_KERNEL_BACKEND", backend)
    g = torch.Generator().manual_seed(0)
    cache = torch.full((5, 16, 2, 8), float("nan")).to(device, cache_dtype)
    values = torch.randn(7, 2, 8, generator=g).to(device)
    slots = torch.tensor([3, -1, 17, 79, -1, 40, 0], dtype=torch.int64, device=device)
    store_tokens(cache, values, slots)
    return cache


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_store_tokens_skips_other_shards(cache_dtype, monkeypatch):
    ref = store_case("cpu", cache_dtype, "reference", monkeypatch)
    out = store_case("cpu", cache_dtype, "triton", monkeypatch)
    assert torch.equal(ref.isnan(), out.isnan())
    # The interpreter truncates to bf16 where the GPU rounds: allow one bf16 step.
    torch.testing.assert_close(
        out[~out.isnan()], ref[~ref.isnan()], atol=0, rtol=0 if cache_dtype == torch.float32 else 8e-3
    )
    assert (~ref.isnan()).flatten(0, 1).all(-1).all(-1).sum() == 5  # the five kept rows, nothing else


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_store_tokens_gpu(cache_dtype, monkeypatch):
    ref = store_case("cpu", torch.float32, "reference", monkeypatch)
    out = store_case("cuda", cache_dtype, "triton", monkeypatch).float().cpu()
    assert torch.equal(ref.isnan(), out.isnan())
    torch.testing.assert_close(out[~out.isnan()], ref[~ref.isnan()].to(cache_dtype).float())


# The latency-bound merge loads every part at once and weighs an empty one's rows by 0 before
# discarding them: the interpreter warns about NaN * 0 there, which the result does not see.
@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("latency_bound", [False, True], ids=["streaming", "latency_bound"])
def test_merge_ignores_what_an_empty_part_holds(latency_bound, monkeypatch):
    """A part with lse -inf weighs 0 whatever its rows hold: scratch that no kernel wrote (NaN or
    inf here) does not reach the output; the streaming merge does not read those rows at all."""
    from msa.kernels.merge.triton import merge_states_into

    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    R, T, H, D = 6, 3, 8, 16
    outs, lses = partial_states(R, T, H, D, torch.float32, "cpu", empty_shard=2, seed=8)
    lses[4, 1] = float("-inf")
    ref_out, ref_lse = merge_attention_states_reference(outs, lses)
    outs[2], outs[4, 1] = float("nan"), float("inf")
    out, lse = torch.empty(T, H, D), torch.empty(T, H)
    with warnings.catch_warnings():
        if not latency_bound:  # rows it never loads cannot meet a multiply (the interpreter would warn)
            warnings.simplefilter("error", RuntimeWarning)
        merge_states_into(outs, lses, out, lse, latency_bound=latency_bound)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_merge_with_keep_writes_only_the_kept_groups(monkeypatch):
    """``keep [T, G]`` limits the merge to the heads of the kept groups; every other row of the
    outputs keeps what it held."""
    from msa.kernels.merge.triton import merge_states_into

    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    g = torch.Generator().manual_seed(5)
    R, T, H, D, G = 3, 5, 8, 16, 4
    outs = torch.randn(R, T, H, D, generator=g)
    lses = torch.randn(R, T, H, generator=g)
    keep = torch.rand(T, G, generator=g) < 0.5
    keep[0] = False  # a token with nothing to merge
    keep[1] = True
    out = torch.full((T, H, D), 7.0)
    lse = torch.full((T, H), 7.0)
    merge_states_into(outs, lses, out, lse, keep)
    ref_out, ref_lse = merge_attention_states_reference(outs, lses)
    kept = keep.repeat_interleave(H // G, 1)  # [T, H]
    torch.testing.assert_close(out[kept], ref_out[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[kept], ref_lse[kept], atol=1e-5, rtol=1e-5)
    assert bool((out[~kept] == 7.0).all()) and bool((lse[~kept] == 7.0).all())


@pytest.mark.parametrize("with_keep", [False, True], ids=["all_groups", "keep"])
@pytest.mark.parametrize(
    "shape", [(3, 2, 4, 16), (16, 3, 8, 32), (5, 2, 20, 24)], ids=["three", "sixteen", "odd"]
)
def test_latency_bound_merge_reads_all_parts_at_once(shape, with_keep, monkeypatch):
    """The split-K merge of a decode step (one program per token and head, every part in one
    load) against the reference, with an empty part, an all-empty row and a kept subset."""
    from msa.kernels.merge.triton import merge_states_into

    monkeypatch.setenv("MSA_KERNEL_BACKEND", "triton")
    R, T, H, D = shape
    outs, lses = partial_states(R, T, H, D, torch.float32, "cpu", empty_shard=1)
    outs[:, -1, 1], lses[:, -1, 1] = 0.0, float("-inf")
    keep = torch.rand(T, 2, generator=torch.Generator().manual_seed(1)) < 0.5 if with_keep else None
    out, lse = torch.full((T, H, D), 7.0), torch.full((T, H), 7.0)
    merge_states_into(outs, lses, out, lse, keep, latency_bound=True)
    ref_out, ref_lse = merge_attention_states_reference(outs, lses)
    kept = torch.ones(T, H, dtype=torch.bool) if keep is None else keep.repeat_interleave(H // 2, 1)
    torch.testing.assert_close(out[kept], ref_out[kept], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[kept], ref_lse[kept], atol=1e-5, rtol=1e-5)
    assert bool((out[~kept] == 7.0).all()) and bool((lse[~kept] == 7.0).all())
    assert torch.isneginf(lse[-1, 1]) == bool(kept[-1, 1]) and not out.isnan().any()


def test_latency_bound_merge_refuses_too_many_parts():
    from msa.kernels.merge.triton import MAX_LATENCY_BOUND_PARTS, merge_states_into

    R = MAX_LATENCY_BOUND_PARTS + 1
    outs, lses = torch.zeros(R, 1, 2, 16), torch.zeros(R, 1, 2)
    with pytest.raises(ValueError, match=f"at most {MAX_LATENCY_BOUND_PARTS} parts, got {R}"):
        merge_states_into(outs, lses, torch.empty(1, 2, 16), torch.empty(1, 2), latency_bound=True)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_merge_entry_point_ignores_what_an_empty_part_holds(backend, monkeypatch):
    """Through ``merge_attention_states`` on either backend, NaN or inf in the rows of parts with
    lse -inf does not reach the output: a plain sum over the non-empty parts."""
    monkeypatch.setenv("MSA_KERNEL_BACKEND", backend)
    R, T, H, D = 3, 4, 8, 16
    outs, lses = partial_states(R, T, H, D, torch.float32, "cpu", seed=3)
    lses[1, 0], lses[:, 2, 3] = float("-inf"), float("-inf")
    outs[1, 0], outs[0, 0, 0], outs[:, 2, 3] = float("nan"), float("inf"), float("nan")
    out, lse = merge_attention_states(outs, lses)
    live = ~torch.isneginf(lses)
    want_lse = torch.logsumexp(lses, 0)
    w = torch.where(live, torch.exp(lses - want_lse.nan_to_num(neginf=0.0)), 0.0)
    want_out = (w[..., None] * torch.where(live[..., None], outs, 0.0)).sum(0)
    assert not out.isnan().any() and torch.equal(out[2, 3], torch.zeros(D))
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_store_kernel_drops_slots_past_the_cache():
    """The Triton store given a slot past its cache (unchecked: the entry point refuses it first)
    writes nothing there, not even into memory after the cache, and still writes the other rows."""
    from msa.kernels.store.triton import store_tokens_triton

    buffer = torch.zeros(10, 16, 2, 8)
    cache, values = buffer[:5], torch.randn(4, 2, 8, generator=torch.Generator().manual_seed(0))
    store_tokens_triton(cache, values, torch.tensor([0, 80, 3, 1000]))
    assert torch.equal(cache[0, 0], values[0]) and torch.equal(cache[0, 3], values[2])
    assert int((cache != 0).flatten(0, 1).any(-1).any(-1).sum()) == 2
    assert (buffer[5:] == 0).all()
