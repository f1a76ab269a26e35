"""Weight updates in checksummed buckets: one layout and one checksum for both ways weights travel.

A bucket is a flat uint8 buffer of whole tensors at 16-byte aligned offsets (a tensor larger than
the bucket size gets a bucket of its own), followed by a 16-byte trailer: the bucket's checksum and
the weight version, both int64. The checksum is computed by torch ops on the buffer's own device,
so the sender (a trainer GPU) and every receiving shard check the bytes where they are, without a
host copy: the sum over the payload's int64 words of ``word * (2 * position + 1)``, with int64
wraparound. Addition mod 2**64 does not depend on the reduction order, so CPU and GPU agree, and
since every weight is odd, a change of any single word always changes the sum.

Two transports share this layout:
- the trainer -> engine process group (``msa.cluster.weight_transport``): RL syncs, device to
  device, buckets broadcast from the trainer's rank 0 to every shard;
- ``pack_buckets`` / ``unpack_bucket``: full tensors held by a caller with no process group to the
  shards (``MSAEngine.update_weights``), shipped through Ray's object store as numpy payloads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from msa.cluster.protocol import WeightUpdateError

ALIGN = 16
TRAILER_BYTES = 16
_CHECKSUM_WORDS = 1 << 24  # words per checksum chunk: bounds the int64 temporaries to 128 MB each


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A full tensor as it travels: state_dict name, shape and the dtype it is sent in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """Bucket ``index``: its tensors at byte ``offsets``; ``payload_bytes`` (a multiple of 8) is
    where the trailer starts, ``nbytes`` the whole buffer."""

    index: int
    tensors: tuple[TensorSpec, ...]
    offsets: tuple[int, ...]
    payload_bytes: int

    @property
    def nbytes(self) -> int:
        return self.payload_bytes + TRAILER_BYTES

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]


@dataclass(frozen=True, slots=True)
class BucketLayout:
    """Every bucket of one weight update, in send order."""

    buckets: tuple[BucketSpec, ...]

    @property
    def max_bucket_bytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (without alignment and trailers): what a sync moves."""
        return sum(t.nbytes for b in self.buckets for t in b.tensors)


def tensor_spec(name: str, tensor: torch.Tensor) -> TensorSpec:
    return TensorSpec(name, tuple(tensor.shape), tensor.dtype)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _seal_spec(index: int, tensors: list[TensorSpec]) -> BucketSpec:
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end = _align(end + t.nbytes)
    return BucketSpec(index, tuple(tensors), tuple(offsets), end)


def plan_buckets(specs: Iterable[TensorSpec], bucket_bytes: int) -> BucketLayout:
    """Group tensors, in order, into buckets whose payload is at most ``bucket_bytes`` (one
    oversized tensor alone)."""
    buckets: list[BucketSpec] = []
    items: list[TensorSpec] = []
    size = 0
    for spec in specs:
        need = _align(spec.nbytes)
        if items and size + need > bucket_bytes:
            buckets.append(_seal_spec(len(buckets), items))
            items, size = [], 0
        items.append(spec)
        size += need
    if items:
        buckets.append(_seal_spec(len(buckets), items))
    return BucketLayout(tuple(buckets))


def bucket_checksum(payload: torch.Tensor) -> torch.Tensor:
    """0-dim int64 on ``payload``'s device: sum of ``word * (2 * position + 1)`` over the int64
    words of ``payload`` (uint8, length a multiple of 8), with wraparound."""
    words = payload.view(torch.int64)
    total = torch.zeros((), dtype=torch.int64, device=payload.device)
    for start in range(0, words.numel(), _CHECKSUM_WORDS):
        chunk = words[start : start + _CHECKSUM_WORDS]
        weights = torch.arange(
            2 * start + 1, 2 * (start + chunk.numel()), 2, dtype=torch.int64, device=payload.device
        )
        total += weights.mul_(chunk).sum()
    return total


def bucket_views(spec: BucketSpec, flat: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The named tensors of bucket ``spec`` as views into ``flat`` (uint8, at least spec.nbytes)."""
    out = []
    for t, offset in zip(spec.tensors, spec.offsets, strict=True):
        raw = flat[offset : offset + t.nbytes]
        out.append((t.name, raw.view(t.dtype).view(t.shape)))
    return out


def fill_bucket(
    spec: BucketSpec, tensors: Iterator[tuple[str, torch.Tensor]], flat: torch.Tensor, version: int
) -> None:
    """Copy the next ``len(spec.tensors)`` tensors of ``tensors`` into ``flat[:spec.nbytes]`` (cast
    to the spec's dtypes), then write the checksum and version trailer. Raises WeightUpdateError
    when a tensor is missing or does not match the layout."""
    for (name, view), expected in zip(bucket_views(spec, flat), spec.tensors, strict=True):
        got_name, tensor = next(tensors, (None, None))
        if got_name != name or tuple(tensor.shape) != expected.shape:
            shape = None if tensor is None else tuple(tensor.shape)
            raise WeightUpdateError(
                f"bucket {spec.index} expects {name!r} {expected.shape}, the sender gave {got_name!r} {shape}"
            )
        view.copy_(tensor)
    payload = flat[: spec.payload_bytes]
    trailer = flat[spec.payload_bytes : spec.nbytes].view(torch.int64)
    trailer[0] = bucket_checksum(payload)
    trailer[1] = version


def bucket_check(spec: BucketSpec, flat: torch.Tensor) -> torch.Tensor:
    """``[3]`` int64 on ``flat``'s device: checksum of the received payload, then the trailer's
    checksum and version. Kept on the device so a receiver syncs once, after its last bucket."""
    trailer = flat[spec.payload_bytes : spec.nbytes].view(torch.int64)
    return torch.cat([bucket_checksum(flat[: spec.payload_bytes]).reshape(1), trailer])


def raise_on_mismatch(specs: Iterable[BucketSpec], checks: torch.Tensor, version: int) -> None:
    """``checks``: one ``bucket_check`` row per spec. Raises WeightUpdateError naming the first
    bucket whose bytes or version do not match, and its tensors."""
    for spec, (actual, expected, sent_version) in zip(specs, checks.tolist(), strict=True):
        if actual == expected and sent_version == version:
            continue
        names = spec.names
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        what = (
            f"failed its checksum: expected {expected & (2**64 - 1):016x}, got {actual & (2**64 - 1):016x}"
            if actual != expected
            else f"carries version {sent_version}"
        )
        raise WeightUpdateError(
            f"weight bucket {spec.index} of version {version} ({len(names)} tensors: {shown}) {what}"
        )


# The object-store transport ----------------------------------------------------------------------


@dataclass(slots=True)
class WeightBucket:
    """One bucket packed on the sender's CPU: ``payload`` is the whole buffer (uint8 numpy array,
    so Ray ships it without a copy), trailer included."""

    spec: BucketSpec
    version: int
    payload: np.ndarray

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def names(self) -> list[str]:
        return self.spec.names

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes)


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], version: int, bucket_bytes: int = 256 << 20
) -> Iterator[WeightBucket]:
    """Full tensors into CPU buckets of at most ``bucket_bytes`` of payload, packed one at a time."""
    items = [(name, t.detach()) for name, t in named_tensors]
    layout = plan_buckets((tensor_spec(name, t) for name, t in items), bucket_bytes)
    source = iter((name, t.to("cpu")) for name, t in items)
    for spec in layout.buckets:
        flat = torch.zeros(spec.nbytes, dtype=torch.uint8)
        fill_bucket(spec, source, flat, version)
        yield WeightBucket(spec, version, flat.numpy())


def unpack_bucket(bucket: WeightBucket, device: torch.device | str = "cpu") -> list[tuple[str, torch.Tensor]]:
    """Verify the bucket on ``device``, then cut it into its named tensors (views of one copy
    there). Raises WeightUpdateError naming the bucket when the bytes do not match."""
    if bucket.nbytes != bucket.spec.nbytes:
        raise WeightUpdateError(
            f"weight bucket {bucket.index}: payload holds {bucket.nbytes} bytes, "
            f"its layout describes {bucket.spec.nbytes}"
        )
    flat = torch.from_numpy(np.ascontiguousarray(bucket.payload)).to(device)
    raise_on_mismatch([bucket.spec], bucket_check(bucket.spec, flat)[None], bucket.version)
    return bucket_views(bucket.spec, flat)
