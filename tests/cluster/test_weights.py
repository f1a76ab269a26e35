"""Weight buckets: the layout, the on-device checksum, the object-store packing, and the weight
group's bucketed broadcast between real processes (gloo over loopback; NCCL on GPUs)."""

from __future__ import annotations

import multiprocessing as mp
import traceback

import pytest
import torch

from msa.cluster.protocol import WeightUpdateError
from msa.cluster.shard import free_port
from msa.cluster.weight_transport import WeightGroup, receive_buckets, send_buckets
from msa.cluster.weights import (
    ALIGN,
    TRAILER_BYTES,
    bucket_check,
    bucket_checksum,
    bucket_views,
    pack_buckets,
    plan_buckets,
    raise_on_mismatch,
    tensor_spec,
    unpack_bucket,
)


def mixed_tensors() -> list[tuple[str, torch.Tensor]]:
    """Awkward sizes and dtypes: odd byte counts, a scalar, an empty tensor, one larger than the
    bucket size used below."""
    g = torch.Generator().manual_seed(0)
    return [
        ("a.weight", torch.randn(7, 5, generator=g)),
        ("b.bf16", torch.randn(3, generator=g).to(torch.bfloat16)),
        ("c.scalar", torch.tensor(2.5)),
        ("d.empty", torch.zeros(0, 4)),
        ("e.ids", torch.arange(11, dtype=torch.int64)),
        ("f.big", torch.randn(40, 30, generator=g)),
        ("g.half", torch.randn(9, generator=g).to(torch.float16)),
        ("h.mask", torch.tensor([True, False, True])),
    ]


def test_layout_aligns_every_tensor_and_gives_an_oversized_tensor_its_own_bucket():
    named = mixed_tensors()
    layout = plan_buckets([tensor_spec(n, t) for n, t in named], bucket_bytes=512)
    assert [t.name for b in layout.buckets for t in b.tensors] == [n for n, _ in named]
    big = next(b for b in layout.buckets if "f.big" in b.names)
    assert big.names == ["f.big"] and big.payload_bytes == 40 * 30 * 4
    for bucket in layout.buckets:
        assert all(offset % ALIGN == 0 for offset in bucket.offsets)
        assert bucket.payload_bytes % 8 == 0 and bucket.nbytes == bucket.payload_bytes + TRAILER_BYTES
        assert bucket is big or bucket.payload_bytes <= 512
    assert layout.tensor_bytes == sum(t.numel() * t.element_size() for _, t in named)


def test_pack_then_unpack_gives_back_every_tensor_bit_for_bit():
    named = mixed_tensors()
    buckets = list(pack_buckets(named, version=4, bucket_bytes=512))
    assert len(buckets) > 2 and all(b.version == 4 for b in buckets)
    out = [pair for b in buckets for pair in unpack_bucket(b)]
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, want), (_, got) in zip(named, out, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_checksum_is_the_weighted_word_sum_mod_2_64():
    payload = torch.randint(0, 256, (8 * 37,), dtype=torch.uint8)
    words = [
        int.from_bytes(bytes(payload[i : i + 8].tolist()), "little", signed=True) for i in range(0, 296, 8)
    ]
    want = sum(w * (2 * i + 1) for i, w in enumerate(words)) % 2**64
    assert int(bucket_checksum(payload)) % 2**64 == want


@pytest.mark.parametrize("position", [0, 1, 7, 8, 123, 295], ids=lambda p: f"byte{p}")
@pytest.mark.parametrize("bit", [0, 7])
def test_checksum_sees_any_single_bit_flip(position, bit):
    payload = torch.randint(0, 256, (296,), dtype=torch.uint8)
    damaged = payload.clone()
    damaged[position] ^= 1 << bit
    assert int(bucket_checksum(damaged)) != int(bucket_checksum(payload))


def test_checksum_sees_two_swapped_words():
    payload = torch.randint(0, 256, (64,), dtype=torch.uint8)
    swapped = payload.clone()
    swapped[0:8], swapped[40:48] = payload[40:48], payload[0:8]
    assert not torch.equal(swapped, payload)
    assert int(bucket_checksum(swapped)) != int(bucket_checksum(payload))


def test_a_damaged_bucket_or_a_wrong_version_is_named_with_its_tensors():
    buckets = list(pack_buckets(mixed_tensors(), version=9, bucket_bytes=512))
    damaged = buckets[1]
    damaged.payload = damaged.payload.copy()
    damaged.payload[3] ^= 0x10
    with pytest.raises(
        WeightUpdateError, match=r"bucket 1 of version 9 \(\d+ tensors: .*\) failed its checksum"
    ):
        unpack_bucket(damaged)
    stale = buckets[0]
    stale.version = 10
    with pytest.raises(WeightUpdateError, match="bucket 0 of version 10 .* carries version 9"):
        unpack_bucket(stale)


def _group_member(
    rank: int, port: int, world: int, device: str, versions: list[int], corrupt: dict, queue
) -> None:
    """One process of the group: rank 0 sends ``versions`` in turn, the others receive each."""
    try:
        if device == "cuda":
            torch.cuda.set_device(rank)
        where = torch.device(device, torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")
        named = mixed_tensors()
        layout = plan_buckets([tensor_spec(n, t) for n, t in named], bucket_bytes=512)
        group = WeightGroup("127.0.0.1", port, rank, world, where, timeout_s=60)
        for version in versions:
            if rank == 0:
                source = ((n, t.to(where)) for n, t in named)
                sent = send_buckets(group, layout, source, version, corrupt_bucket=corrupt.get(version))
                queue.put((rank, version, "sent", sent))
                continue
            specs, checks, got = [], [], []
            for spec, flat in receive_buckets(group, layout):
                specs.append(spec)
                checks.append(bucket_check(spec, flat))
                got += [(name, t.to("cpu", copy=True)) for name, t in bucket_views(spec, flat)]
            equal = all(torch.equal(a, b) for (_, a), (_, b) in zip(got, named, strict=True))
            try:
                raise_on_mismatch(specs, torch.stack(checks).cpu(), version)
                queue.put((rank, version, "ok", equal))
            except WeightUpdateError as e:
                queue.put((rank, version, "error", str(e)))
        group.close()
    except BaseException:
        queue.put((rank, None, "crash", traceback.format_exc()))


def run_weight_group(device: str, world: int) -> None:
    versions, corrupt = [1, 2, 3], {2: 1}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    args = (port, world, device, versions, corrupt, queue)
    procs = [ctx.Process(target=_group_member, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in range(world * len(versions))]
    for p in procs:
        p.join(timeout=30)
    crashes = [r[3] for r in results if r[2] == "crash"]
    assert not crashes, crashes[0]
    by_key = {(rank, version): (kind, value) for rank, version, kind, value in results}
    layout_bytes = sum(t.numel() * t.element_size() for _, t in mixed_tensors())
    for version in versions:
        assert by_key[0, version] == ("sent", layout_bytes)
        for rank in range(1, world):
            kind, value = by_key[rank, version]
            if version in corrupt:
                assert kind == "error" and "bucket 1 of version 2" in value and "failed its checksum" in value
            else:
                assert (kind, value) == ("ok", True)


def test_weight_group_broadcasts_buckets_to_every_receiver_and_each_sees_a_damaged_one():
    run_weight_group("cpu", world=3)


@pytest.mark.gpu
def test_weight_group_over_nccl_between_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: one rank per GPU")
    run_weight_group("cuda", world=min(3, torch.cuda.device_count()))
