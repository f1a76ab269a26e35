"""Softmax pieces shared by the paged attention kernels (query-tile, split-K decode and block-major):
scores are kept in log2 units, so ``qk_scale`` carries ``LOG2E`` and the lse comes back in natural log."""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """``a @ b``, in full fp32 precision where ``IEEE`` (fp32 inputs), else on the tensor cores' own."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def softmax_tile(q, k, v, allowed, qk_scale, IEEE: tl.constexpr):
    """Attention of the rows of ``q [M, D]`` over one tile of keys ``k, v [N, D]`` where
    ``allowed [M, N]`` (None: everywhere): (out ``[M, D]`` fp32, lse ``[M]`` natural log; zeros and
    -inf for a row that sees no key). ``qk_scale`` includes log2(e)."""
    s = _dot(q, tl.trans(k), IEEE)
    if allowed is not None:
        s = tl.where(allowed, s, float("-inf"))
    m = tl.max(s, 1) * qk_scale  # log2 units; the scale (positive) goes into one multiply-add below
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = tl.sum(p, 1)
    acc = _dot(p.to(v.dtype), v, IEEE)
    return normalize_softmax(acc, m_safe, l_i)


@triton.jit
def online_softmax_step(
    q, k, v, allowed, m_i, l_i, acc, qk_scale, IEEE: tl.constexpr, WHOLE: tl.constexpr = False
):
    """One key tile of an online softmax: the running max ``m_i [M]``, sum ``l_i [M]`` and output
    ``acc [M, D]`` (log2 units) after the rows of ``q`` attend to ``k, v [N, D]`` where ``allowed
    [M, N]``. ``WHOLE``: ``allowed [M]`` instead, for rows that see every key of the tile or none
    of them; no score is then masked one by one (a row that sees none subtracts +inf)."""
    s = _dot(q, tl.trans(k), IEEE)
    # The scale goes into the max (it is positive) and into one multiply-add with the max.
    if WHOLE:
        m_new = tl.maximum(m_i, tl.where(allowed, tl.max(s, 1) * qk_scale, float("-inf")))
    else:
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    if WHOLE:
        p = tl.exp2(s * qk_scale - tl.where(allowed, m_safe, float("inf"))[:, None])
    else:
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    pv = _dot(p.to(v.dtype), v, IEEE)
    return m_new, l_i, acc * alpha[:, None] + pv


@triton.jit
def normalize_softmax(acc, m, l_i):
    """Finish an online softmax: (out ``acc / l``, lse in natural log from the running max ``m``
    and sum ``l_i`` in log2 units); zeros and -inf for a row that saw no key (``l_i`` 0)."""
    seen = l_i > 0
    out = acc * (1.0 / tl.where(seen, l_i, 1.0))[:, None]  # one division per row, not per value
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse
