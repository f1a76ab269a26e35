"""Launch-time helpers shared by the Triton launchers (no kernels here)."""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))


def next_pow4(n: int) -> int:
    """The smallest power of four >= ``n`` (1 for n <= 1)."""
    p = 1
    while p < n:
        p *= 4
    return p


def splits_bucket(n: int) -> int:
    """The unrolled width of a split-K combine over ``n`` splits: a power of two, at least 8 once
    there is anything to combine, so few split counts each compile their own kernel."""
    return 1 if n <= 1 else max(8, next_pow2(n))


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a nominal 8 for CPU (the interpreter)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def max_query_len(cu_seqlens_q: torch.Tensor, max_q_len: int | None) -> int:
    """The longest query run of the batch: ``max_q_len`` if the caller knows it (no host sync),
    else read from ``cu_seqlens_q`` (one device-to-host copy)."""
    if max_q_len is not None:
        return int(max_q_len)
    if cu_seqlens_q.numel() < 2:
        return 0
    return int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())


# Programmatic dependent launch (Hopper and later): a kernel launched with it may start while the
# kernel before it on the stream finishes, and waits (``gdc_wait``) before its first memory access,
# so consecutive kernels of a decode step do not each pay the full launch gap. MSA_PDL=0 (or
# setting PDL, as the benchmark does to measure what it saves) switches it off.
PDL = os.environ.get("MSA_PDL", "1") != "0"


def pdl(device: torch.device) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch: compiled for Hopper or
    later (the interpreter has no grid dependency control)."""
    return PDL and compiled_hopper(device)


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET=1``), as CI runs them."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=8)
def compiled_hopper(device: torch.device) -> bool:
    """Whether kernels on ``device`` are compiled for a GPU of compute capability 9.0 or later."""
    if device.type != "cuda" or interpreting():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index) >= (9, 0)


def block_descriptor(cache: torch.Tensor) -> TensorDescriptor | None:
    """TMA descriptor of one block of a paged cache ``[pages, block, D]`` or ``[pages, block,
    H_kv, D]`` (box ``[1, block, D]``, ``[1, block, 1, D]``), or None where TMA cannot read it:
    before Hopper, a base not 16-byte aligned, a stride not a multiple of 16 bytes, or a block or
    head dim over 256 (a TMA box's limit). The interpreter takes them too (CI runs that path)."""
    if not (interpreting() or compiled_hopper(cache.device)):
        return None
    item = cache.element_size()
    bs, d = cache.shape[1], cache.shape[-1]
    if cache.data_ptr() % 16 or any(st * item % 16 for st in cache.stride()[:-1]) or max(bs, d) > 256:
        return None
    box = [1, bs] + [1] * (cache.dim() - 3) + [d]
    return TensorDescriptor(cache, list(cache.shape), list(cache.stride()), box)


_TICKETS: dict[torch.device, torch.Tensor] = {}


def tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 counters for kernels whose last program to finish a unit of work (known by an
    atomic ticket) does the unit's final step and zeroes its counter again. Kept per device so
    decode steps reuse them (and CUDA graphs capture no memset); launches sharing them must be
    ordered on one stream."""
    t = _TICKETS.get(device)
    if t is None or t.numel() < n:
        t = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
        _TICKETS[device] = t
    return t


def paged_input_strides(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor
) -> tuple:
    """stride_qt, stride_qh, stride_k{p,s,h}, stride_v{p,s,h}, stride_bt: the input strides of the
    paged attention kernels, in their argument order."""
    return (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], table.stride(0))


def check_int32(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.dtype != torch.int32:
            raise ValueError(f"{name}: {arg} must be int32, got {t.dtype}")
        if not t.is_contiguous():
            raise ValueError(
                f"{name}: {arg} must be contiguous (row-major, strides {contiguous_strides(t.shape)} "
                f"for shape {tuple(t.shape)}), got strides {t.stride()}"
            )


def contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    """The strides of a contiguous (row-major) tensor of ``shape``."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(1, n)
    return tuple(reversed(strides))


def check_last_dim_contiguous(name: str, **tensors: torch.Tensor) -> None:
    for arg, t in tensors.items():
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: {arg} needs a contiguous last dim, got strides {t.stride()}")
