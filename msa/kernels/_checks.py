"""Input checks of the kernel entry points, each raising a ValueError that names the argument.

Metadata checks (devices, shard coordinates) read no tensor values and run on every call. Value
checks read the tensors, which on a GPU waits for the host: ``values_checked`` says when to run
them (CPU tensors always, CUDA tensors with ``MSA_CHECK_INPUTS=1``).
"""

from __future__ import annotations

import os

import torch

from msa.kernels._paged import num_local_blocks


def check_same_device(name: str, anchor: str, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor of ``tensors`` on the device of ``tensors[anchor]``."""
    device = tensors[anchor].device
    for arg, t in tensors.items():
        if t.device != device:
            raise ValueError(
                f"{name}: {arg} is on {t.device} but {anchor} is on {device}: all must be on one device"
            )


def check_shard(name: str, shard_rank: int, shard_world: int) -> None:
    if not 0 <= shard_rank < shard_world:
        raise ValueError(
            f"{name}: need 0 <= shard_rank < shard_world, got shard_rank={shard_rank}, "
            f"shard_world={shard_world}"
        )


def values_checked(t: torch.Tensor) -> bool:
    """Whether the value checks run for inputs on ``t``'s device: on the CPU always; on a GPU only
    with ``MSA_CHECK_INPUTS=1``, since reading values there syncs with the host (which a CUDA graph
    cannot capture); never on devices without values (meta)."""
    if t.device.type == "cpu":
        return True
    return t.is_cuda and os.environ.get("MSA_CHECK_INPUTS") == "1"


def check_cu_seqlens(name: str, cu_seqlens_q: torch.Tensor, total_q: int) -> None:
    """``cu_seqlens_q`` starts at 0, never decreases, and ends at the number of query rows."""
    cu = cu_seqlens_q.cpu()
    if int(cu[0]) != 0:
        raise ValueError(f"{name}: cu_seqlens_q[0] must be 0, got {int(cu[0])}")
    down = (cu[1:] < cu[:-1]).nonzero()
    if down.numel():
        i = int(down[0]) + 1
        raise ValueError(
            f"{name}: cu_seqlens_q must not decrease, got cu_seqlens_q[{i}] = {int(cu[i])} after "
            f"{int(cu[i - 1])}"
        )
    if total_q != 0 and int(cu[-1]) != total_q:
        raise ValueError(
            f"{name}: cu_seqlens_q[-1] ({int(cu[-1])}) must equal the number of query rows ({total_q})"
        )


def check_query_counts(name: str, cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """No sequence has more queries than tokens (they are its last ones)."""
    q_lens, lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).cpu(), seq_lens.cpu()
    over = (q_lens > lens).nonzero()
    if over.numel():
        b = int(over[0])
        raise ValueError(
            f"{name}: sequence {b} has {int(q_lens[b])} queries (cu_seqlens_q) but seq_lens[{b}] is "
            f"{int(lens[b])}"
        )


def check_block_table(
    name: str,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    block_size: int,
    num_pages: int,
    shard_rank: int,
    shard_world: int,
) -> None:
    """``block_table`` has a column for each of a sequence's blocks on this shard, and the entries
    a sequence uses are pages of the cache; the entries past them are not read."""
    table, lens = block_table.cpu(), seq_lens.cpu().long()
    need = num_local_blocks((lens + block_size - 1) // block_size, shard_rank, shard_world)
    narrow = (need > table.shape[1]).nonzero()
    if narrow.numel():
        b = int(narrow[0])
        raise ValueError(
            f"{name}: block_table has {table.shape[1]} columns but sequence {b} "
            f"(seq_lens[{b}] = {int(lens[b])}) needs {int(need[b])} blocks of {block_size} on this shard"
        )
    used = torch.arange(table.shape[1]) < need[:, None]
    bad = (used & ((table < 0) | (table >= num_pages))).nonzero()
    if bad.numel():
        b, i = (int(x) for x in bad[0])
        raise ValueError(
            f"{name}: block_table[{b}, {i}] = {int(table[b, i])} is not a page of the cache "
            f"(0 <= page < {num_pages})"
        )


def check_distinct_block_ids(name: str, block_ids: torch.Tensor) -> None:
    """No block id (>= 0) twice in one (token, KV group) selection."""
    ids = block_ids.cpu().long().sort(-1).values
    twice = ((ids[..., 1:] == ids[..., :-1]) & (ids[..., 1:] >= 0)).nonzero()
    if twice.numel():
        t, g, k = (int(x) for x in twice[0])
        raise ValueError(f"{name}: block_ids[{t}, {g}] holds block {int(ids[t, g, k])} more than once")


def check_slots(name: str, slots: torch.Tensor, num_slots: int) -> None:
    """Every slot is before the cache's end (negative ones are skipped by the store)."""
    s = slots.cpu()
    past = (s >= num_slots).nonzero()
    if past.numel():
        i = int(past[0])
        raise ValueError(f"{name}: slots[{i}] = {int(s[i])} is past the cache's {num_slots} slots")
