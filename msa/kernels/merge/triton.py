"""Triton merge of partial attention results by their log-sum-exp (sequence shards, split-K)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait

from msa.kernels._launch import check_last_dim_contiguous, next_pow2, pdl

# Parts a latency-bound merge holds at once: with a 128-wide head, 8 warps at 32 values per thread.
MAX_LATENCY_BOUND_PARTS = 64
# The streaming merge (many parts) reads up to this many parts' lse in one load for their max,
# then the parts' rows four at a time, their loads in flight together (block-major prefill
# partials: see "Block-major steps" in benchmarks/results/kernels.md).
STREAM_LSE_AT_ONCE = 64


@triton.jit
def merge_weights(lses):
    """Weights of ``S`` partial results of the same rows by their log-sum-exp ``lses [S, M]``
    (natural log): (w ``[S, M]``, m ``[M]``, total ``[M]``) with ``w = exp(lse - m)``, ``total`` their
    sum. A partial with lse -inf weighs 0; a row whose partials are all -inf gets total 0, not NaN."""
    m = tl.max(lses, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lses - m[None, :])
    return w, m, tl.sum(w, 0)


@triton.jit
def finish_merge(merged, m, total):
    """The merged rows from ``merged [M, D]`` (the partial outputs summed with ``merge_weights``'
    weights) and its ``m``, ``total``: (out ``[M, D]``, lse ``[M]``); zeros and -inf where total is 0."""
    seen = total > 0
    safe = tl.where(seen, total, 1.0)
    return merged * (1.0 / safe)[:, None], tl.where(seen, m + tl.log(safe), float("-inf"))


@triton.jit
def _step_weights(lses_ptr, r0, ru, R, t, offs_h, h_ok, m, stride_lr, stride_lt):
    """Weights ``exp(lse - m)`` ``[BLOCK_H, 4]`` of parts ``r0 + ru``: 0 past ``R``, for heads not
    ``h_ok`` and for empty parts."""
    r = r0 + ru
    lses = tl.load(
        lses_ptr + r[None, :] * stride_lr + t * stride_lt + offs_h[:, None],
        mask=h_ok[:, None] & (r < R)[None, :],
        other=float("-inf"),
    )
    return tl.exp(lses - m[:, None])


@triton.jit(do_not_specialize=["R", "stride_or", "stride_lr"])
def _merge_states_kernel(
    outs_ptr,
    lses_ptr,
    out_ptr,
    lse_ptr,
    keep_ptr,
    R,
    H,
    group,
    stride_or,
    stride_ot,
    stride_oh,
    stride_lr,
    stride_lt,
    stride_mt,
    stride_mh,
    stride_et,
    stride_kt,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_P: tl.constexpr,
    KEEP: tl.constexpr,
    PARTS_P: tl.constexpr,
    LSE_AT_ONCE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (token, block of heads) merges its rows of the ``R`` parts: in one load each when
    ``PARTS_P`` (>= R) is set, else in two passes over the parts (``LSE_AT_ONCE`` parts' lse per
    load, then four parts' rows per step)."""
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    if PDL:
        gdc_wait()  # launched early: the parts are written from here on
    offs_d = tl.arange(0, DIM_P)
    h_ok = offs_h < H
    if KEEP:  # only the heads of the groups marked in keep[t] are merged and written
        h_ok = h_ok & (tl.load(keep_ptr + t * stride_kt + offs_h // group, mask=h_ok, other=0) != 0)
        if tl.max(h_ok.to(tl.int32), 0) == 0:
            return
    hd_ok = h_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    if PARTS_P > 0:
        # A few parts (split-K of a decode step): every part's lse and rows in one load each, so
        # no load waits on another.
        r = tl.arange(0, PARTS_P)
        ok = (r < R)[:, None] & h_ok[None, :]
        lses = tl.load(
            lses_ptr + r[:, None] * stride_lr + t * stride_lt + offs_h[None, :], mask=ok, other=float("-inf")
        )  # [PARTS_P, BLOCK_H]
        outs = tl.load(
            outs_ptr
            + r[:, None, None] * stride_or
            + t * stride_ot
            + offs_h[None, :, None] * stride_oh
            + offs_d[None, None, :],
            mask=ok[:, :, None] & (offs_d < HEAD_DIM)[None, None, :],
            other=0.0,
        ).to(tl.float32)
        w, m, total = merge_weights(lses)
        # An empty part's out is zeros by contract; where() keeps a stray NaN there from leaking.
        acc = tl.sum(tl.where(w[:, :, None] > 0, w[:, :, None] * outs, 0.0), 0)
    else:
        # Pass 1: the max of the parts' lse, per head, LSE_AT_ONCE parts per load.
        m = tl.full([BLOCK_H], float("-inf"), tl.float32)
        rc = tl.arange(0, LSE_AT_ONCE)
        for r0 in range(0, R, LSE_AT_ONCE):
            lses = tl.load(
                lses_ptr + (r0 + rc)[:, None] * stride_lr + t * stride_lt + offs_h[None, :],
                mask=(r0 + rc < R)[:, None] & h_ok[None, :],
                other=float("-inf"),
            )
            m = tl.maximum(m, tl.max(lses, 0))
        # An all -inf head keeps weight 0 for every part instead of exp(-inf - -inf) = NaN.
        m = tl.where(m == float("-inf"), 0.0, m)
        acc = tl.zeros([BLOCK_H, DIM_P], tl.float32)
        total = tl.zeros([BLOCK_H], tl.float32)
        # Pass 2: four parts per step, their loads in flight together. An empty part (weight 0)
        # is not read, so each step's weights come from lse loaded a step ahead: no row load
        # waits on an lse load.
        ru = tl.arange(0, 4)
        w_next = _step_weights(lses_ptr, 0, ru, R, t, offs_h, h_ok, m, stride_lr, stride_lt)
        for r0 in range(0, R, 4):
            w_even, w_odd = tl.split(tl.reshape(w_next, [BLOCK_H, 2, 2]))  # parts (0, 2), (1, 3)
            w_0, w_2 = tl.split(w_even)
            w_1, w_3 = tl.split(w_odd)
            w_next = _step_weights(lses_ptr, r0 + 4, ru, R, t, offs_h, h_ok, m, stride_lr, stride_lt)
            rows = outs_ptr + r0 * stride_or + t * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :]
            # A head that is not h_ok has weight 0, so hd_ok masks by the weight alone.
            o_0 = tl.load(rows, mask=(w_0 > 0)[:, None] & hd_ok, other=0.0).to(tl.float32)
            o_1 = tl.load(rows + stride_or, mask=(w_1 > 0)[:, None] & hd_ok, other=0.0).to(tl.float32)
            o_2 = tl.load(rows + 2 * stride_or, mask=(w_2 > 0)[:, None] & hd_ok, other=0.0).to(tl.float32)
            o_3 = tl.load(rows + 3 * stride_or, mask=(w_3 > 0)[:, None] & hd_ok, other=0.0).to(tl.float32)
            acc += w_0[:, None] * o_0 + w_1[:, None] * o_1 + w_2[:, None] * o_2 + w_3[:, None] * o_3
            total += w_0 + w_1 + w_2 + w_3
    out, lse = finish_merge(acc, m, total)
    tl.store(
        out_ptr + t * stride_mt + offs_h[:, None] * stride_mh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=hd_ok,
    )
    tl.store(lse_ptr + t * stride_et + offs_h, lse, mask=h_ok)


def merge_states_into(
    outs: torch.Tensor,
    lses: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    keep: torch.Tensor | None = None,
    *,
    latency_bound: bool = False,
) -> None:
    """Launch the merge of ``outs [R, T, H, D]``, ``lses [R, T, H]`` into ``out [T, H, D]`` (any float
    dtype) and ``lse [T, H]`` fp32. With ``keep [T, G]`` (nonzero: merge), only the heads of the
    kept groups of G equal head groups are written; the rest of ``out`` and ``lse`` is left as is.
    ``latency_bound`` (the split-K partials of a decode step, R <= ``MAX_LATENCY_BOUND_PARTS``):
    one program per (token, head) reads all its parts at once, launched early after the kernel
    that writes them (programmatic dependent launch)."""
    R, T, H, D = outs.shape
    if lses.shape != (R, T, H) or out.shape != (T, H, D) or lse.shape != (T, H):
        raise ValueError(
            f"merge: shapes disagree: outs {tuple(outs.shape)}, lses {tuple(lses.shape)}, "
            f"out {tuple(out.shape)}, lse {tuple(lse.shape)}"
        )
    if lses.dtype != torch.float32 or lse.dtype != torch.float32:
        raise ValueError(f"merge: lses and lse must be float32, got {lses.dtype}, {lse.dtype}")
    check_last_dim_contiguous("merge", outs=outs, lses=lses, out=out, lse=lse)
    if keep is not None and (keep.dim() != 2 or keep.shape[0] != T or H % keep.shape[1]):
        raise ValueError(f"merge: keep must be [T={T}, G] with G dividing H={H}, got {tuple(keep.shape)}")
    if latency_bound and R > MAX_LATENCY_BOUND_PARTS:
        raise ValueError(
            f"merge: a latency-bound merge takes at most {MAX_LATENCY_BOUND_PARTS} parts, got {R}"
        )
    if T == 0 or H == 0:
        return
    block_h = 1 if latency_bound else min(16, next_pow2(H))
    parts_p = next_pow2(R) if latency_bound else 0
    early = latency_bound and pdl(out.device)
    _merge_states_kernel[(T, triton.cdiv(H, block_h))](
        outs,
        lses,
        out,
        lse,
        lse if keep is None else keep,
        R,
        H,
        1 if keep is None else H // keep.shape[1],
        outs.stride(0),
        outs.stride(1),
        outs.stride(2),
        lses.stride(0),
        lses.stride(1),
        out.stride(0),
        out.stride(1),
        lse.stride(0),
        0 if keep is None else keep.stride(0),
        BLOCK_H=block_h,
        HEAD_DIM=D,
        DIM_P=next_pow2(D),
        KEEP=keep is not None,
        PARTS_P=parts_p,
        LSE_AT_ONCE=1 if latency_bound else min(next_pow2(R), STREAM_LSE_AT_ONCE),
        PDL=early,
        # One program's parts at 32 values per thread.
        num_warps=min(8, max(1, parts_p * next_pow2(D) // 1024)) if latency_bound else 4,
        launch_pdl=early,
    )


def merge_attention_states_triton(
    outs: torch.Tensor, lses: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge R partial attention results ``outs [R, T, H, D]`` (any float dtype) with ``lses [R, T, H]``
    (natural log) into (out ``[T, H, D]`` in outs' dtype, lse ``[T, H]`` fp32). A part with lse -inf
    weighs 0; a row whose parts are all -inf gets zeros and lse -inf (never NaN)."""
    R, T, H, D = outs.shape
    out = torch.empty(T, H, D, dtype=outs.dtype, device=outs.device)
    lse = torch.empty(T, H, dtype=torch.float32, device=outs.device)
    merge_states_into(
        outs.contiguous() if outs.stride(-1) != 1 else outs, lses.float().contiguous(), out, lse
    )
    return out, lse
