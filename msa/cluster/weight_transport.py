"""The trainer -> engine weight process group: bucketed broadcasts from the trainer's rank 0.

The group is its own communicator over a TCPStore at an address the driver picks (hosted by the
sender, rank 0; shard ``r`` of the engine is rank ``first_rank + r``). It is built from the backend
class itself (``ProcessGroupNCCL`` on CUDA, ``ProcessGroupGloo`` on CPU), so neither side's
default process group (DeepSpeed's, the engine's tensor/context-parallel one) is touched or needed.

Buckets follow ``msa.cluster.weights``: the sender fills one on its device, writes its checksum
and version into the trailer and broadcasts it while filling the next (two buffers alternate);
a receiver checks each bucket on its device and looks at the results once, after the last one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import timedelta

import torch
import torch.distributed as dist

from msa.cluster.weights import BucketLayout, BucketSpec, fill_bucket


class WeightGroup:
    """This process's membership (``rank`` of ``world``) in a weight-broadcast group."""

    def __init__(
        self, host: str, port: int, rank: int, world: int, device: torch.device, timeout_s: float
    ) -> None:
        timeout = timedelta(seconds=timeout_s)
        self.rank, self.world, self.device = rank, world, device
        self._store = dist.TCPStore(
            host, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False
        )
        store = dist.PrefixStore("msa-weights", self._store)
        if device.type == "cuda":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._backend = dist.ProcessGroupNCCL(store, rank, world, options)
        else:
            self._backend = dist.ProcessGroupGloo(store, rank, world, timeout)

    def broadcast(self, tensor: torch.Tensor) -> dist.Work:
        """Broadcast ``tensor`` from rank 0 (asynchronous: ``wait()`` on the result)."""
        options = dist.BroadcastOptions()
        options.rootRank = 0
        return self._backend.broadcast([tensor], options)

    def close(self) -> None:
        self._backend = None
        self._store = None


def _buffers(layout: BucketLayout, device: torch.device) -> list[torch.Tensor]:
    count = min(2, len(layout.buckets))
    return [torch.zeros(layout.max_bucket_bytes, dtype=torch.uint8, device=device) for _ in range(count)]


def _flip_a_bit(spec: BucketSpec, flat: torch.Tensor) -> None:
    """Fault injection for tests: one payload bit changed after the checksum was taken."""
    flat[spec.payload_bytes // 2] ^= 1


def send_buckets(
    group: WeightGroup,
    layout: BucketLayout,
    tensors: Iterable[tuple[str, torch.Tensor]],
    version: int,
    *,
    corrupt_bucket: int | None = None,
) -> int:
    """Broadcast the full ``tensors`` (in layout order) bucket by bucket from rank 0; returns the
    tensor bytes sent. ``corrupt_bucket`` damages that bucket after its checksum (tests)."""
    source = iter(tensors)
    buffers = _buffers(layout, group.device)
    in_flight: list[dist.Work | None] = [None] * len(buffers)
    for spec in layout.buckets:
        slot = spec.index % len(buffers)
        if in_flight[slot] is not None:
            in_flight[slot].wait()  # the buffer's previous bucket has left
        flat = buffers[slot][: spec.nbytes]
        fill_bucket(spec, source, flat, version)
        if spec.index == corrupt_bucket:
            _flip_a_bit(spec, flat)
        in_flight[slot] = group.broadcast(flat)
    for work in in_flight:
        if work is not None:
            work.wait()
    if group.device.type == "cuda":
        torch.cuda.synchronize(group.device)
    return layout.tensor_bytes


def receive_buckets(group: WeightGroup, layout: BucketLayout) -> Iterator[tuple[BucketSpec, torch.Tensor]]:
    """Each bucket of ``layout`` as it lands, as ``(spec, flat)`` on the group's device. The next
    bucket is already on its way into the other buffer while the caller works on this one; ``flat``
    is reused two buckets later, so the caller copies what it keeps before asking for the next one
    (work it queued on the current stream is ordered before the broadcast that overwrites it)."""
    buffers = _buffers(layout, group.device)
    specs = layout.buckets

    def post(spec: BucketSpec) -> tuple[torch.Tensor, dist.Work]:
        flat = buffers[spec.index % len(buffers)][: spec.nbytes]
        return flat, group.broadcast(flat)

    pending = post(specs[0]) if specs else None
    for i, spec in enumerate(specs):
        flat, work = pending
        work.wait()
        if i + 1 < len(specs):
            pending = post(specs[i + 1])
        yield spec, flat
