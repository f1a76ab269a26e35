"""Triton scatter of new tokens into a paged cache that skips rows of other shards (slot -1)
without a host sync."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_tokens_kernel(
    cache_ptr, values_ptr, slots_ptr, row_elems, num_slots, stride_v, BLOCK: tl.constexpr
):
    row = tl.program_id(0)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    # A slot past the cache is refused by the entry point where values are checked; here it is
    # dropped so it cannot write past the cache.
    if (slot < 0) | (slot >= num_slots):
        return
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < row_elems
    x = tl.load(values_ptr + row.to(tl.int64) * stride_v + offs, mask=ok)
    tl.store(cache_ptr + slot * row_elems + offs, x.to(cache_ptr.dtype.element_ty), mask=ok)


def store_tokens_triton(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``values [N, ...]`` into the contiguous ``cache [pages, block, ...]`` at flat slots
    ``slots [N]`` (int32/int64; -1 skips the row, as does a slot past the cache), converting to the
    cache's dtype."""
    if not cache.is_contiguous():
        raise ValueError("store_tokens: the cache must be contiguous")
    N = values.shape[0]
    if N == 0:
        return
    rows = values.reshape(N, -1)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    row_elems = rows.shape[1]
    block = min(1024, triton.next_power_of_2(row_elems))
    num_slots = cache.shape[0] * cache.shape[1]
    _store_tokens_kernel[(N, triton.cdiv(row_elems, block))](
        cache, rows, slots.contiguous(), row_elems, num_slots, rows.stride(0), BLOCK=block
    )
