"""Weight updates in checksummed buckets: full tensors packed by the sender, verified by each shard.

A bucket is a flat byte buffer of whole tensors (a tensor larger than the bucket size gets a bucket
of its own) with the names, shapes and dtypes to cut it apart, and the sha256 of the bytes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from msa.cluster.protocol import WeightUpdateError


@dataclass(slots=True)
class WeightBucket:
    """Tensors ``names`` (shapes, dtypes as strings like "float32") laid end to end in ``payload``
    (uint8 numpy array, so Ray ships it without a copy); ``checksum`` is its sha256 hex digest."""

    index: int
    version: int
    names: list[str]
    shapes: list[tuple[int, ...]]
    dtypes: list[str]
    payload: np.ndarray
    checksum: str

    @property
    def nbytes(self) -> int:
        return int(self.payload.nbytes)


def _digest(payload: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(payload))).hexdigest()


def _as_bytes(t: torch.Tensor) -> np.ndarray:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8)


def _seal(index: int, version: int, items: list[tuple[str, torch.Tensor]]) -> WeightBucket:
    payload = np.concatenate([_as_bytes(t) for _, t in items]) if items else np.zeros(0, dtype=np.uint8)
    return WeightBucket(index=index, version=version, names=[n for n, _ in items],
                        shapes=[tuple(t.shape) for _, t in items],
                        dtypes=[str(t.dtype).removeprefix("torch.") for _, t in items],
                        payload=payload, checksum=_digest(payload))


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], version: int,
                 bucket_bytes: int = 256 << 20) -> Iterator[WeightBucket]:
    """Group full tensors into buckets of at most ``bucket_bytes`` (one oversized tensor alone)."""
    items: list[tuple[str, torch.Tensor]] = []
    size, index = 0, 0
    for name, tensor in named_tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if items and size + nbytes > bucket_bytes:
            yield _seal(index, version, items)
            items, size, index = [], 0, index + 1
        items.append((name, tensor))
        size += nbytes
    if items:
        yield _seal(index, version, items)


def unpack_bucket(bucket: WeightBucket) -> list[tuple[str, torch.Tensor]]:
    """Verify the checksum, then cut the payload into its named tensors (CPU, sharing its memory).
    Raises WeightUpdateError naming the bucket when the bytes do not match."""
    actual = _digest(bucket.payload)
    if actual != bucket.checksum:
        raise WeightUpdateError(f"weight bucket {bucket.index} of version {bucket.version} "
                                f"({len(bucket.names)} tensors, first {bucket.names[:1]}) "
                                f"failed its sha256 check: "
                                f"expected {bucket.checksum[:16]}..., got {actual[:16]}...")
    data = torch.from_numpy(np.ascontiguousarray(bucket.payload))
    out, offset = [], 0
    for name, shape, dtype in zip(bucket.names, bucket.shapes, bucket.dtypes, strict=True):
        torch_dtype = getattr(torch, dtype)
        count = int(np.prod(shape)) if shape else 1
        nbytes = count * torch.empty((), dtype=torch_dtype).element_size()
        out.append((name, data[offset:offset + nbytes].view(torch_dtype).reshape(shape)))
        offset += nbytes
    if offset != bucket.nbytes:
        raise WeightUpdateError(f"weight bucket {bucket.index}: payload holds {bucket.nbytes} bytes, "
                                f"its tensors describe {offset}")
    return out
