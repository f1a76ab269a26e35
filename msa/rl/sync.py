"""Weight sync from the trainers into the rollout engine, with the version bookkeeping.

After each update the trainers' rank 0 broadcasts the full weights to every engine shard through a
process group of their own (``msa.cluster.weight_transport``: NCCL between GPUs, gloo on CPUs),
bucket by bucket from device to device. Each shard keeps its tensor-parallel slices and checks
every bucket's checksum; the engine then switches to the new version between two of its steps, or
keeps the old one if a bucket was damaged. The version is the number of optimizer steps the weights
have taken; every generated token carries the version that produced it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import ray

from msa.cluster.parallel import engine_runs
from msa.cluster.weights import BucketLayout, plan_buckets


@dataclass(frozen=True, slots=True)
class SyncReport:
    """One sync: tensor bytes moved, wall seconds from the first call until the engine runs
    ``version``, and the part the sending trainer spent gathering, packing and broadcasting."""

    version: int
    bytes: int
    seconds: float
    send_seconds: float
    buckets: int

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def metrics(self) -> dict[str, float]:
        return {
            "sync/version": self.version,
            "sync/gb": self.bytes / 1e9,
            "sync/seconds": self.seconds,
            "sync/send_seconds": self.send_seconds,
            "sync/buckets": self.buckets,
            "sync/gbps": self.gbps,
        }


def _first_error(results: list) -> BaseException | None:
    return next((r for r in results if isinstance(r, BaseException)), None)


class WeightSync:
    """The trainers -> engine weight path of one run. ``open`` once the trainers are set up, then
    ``sync(version)`` after every update, ``close`` at the end. ``trainers``: the PolicyTrainer
    actors in rank order (all take part, as ZeRO-3 gathers each parameter collectively)."""

    def __init__(self, engine, trainers: list, dtype: str) -> None:
        self.engine, self.trainers, self.dtype = engine, trainers, dtype
        self.layout: BucketLayout | None = None

    async def open(self) -> None:
        """Plan the buckets from the trainer's tensors (those the engine runs), then join trainer
        rank 0 (rank 0, hosting the store on its node) and every shard (ranks 1..) in one group."""
        host, port = await asyncio.to_thread(ray.get, self.trainers[0].address.remote())
        manifest = await asyncio.to_thread(ray.get, self.trainers[0].weight_manifest.remote(self.dtype))
        config = self.engine.config
        layout = plan_buckets((s for s in manifest if engine_runs(s.name)), config.weight_bucket_bytes)
        world = 1 + config.world_size
        joins = [
            t.open_weight_group.remote(host, port, world, layout, config.step_timeout_s)
            for t in self.trainers
        ]
        results = await asyncio.gather(
            asyncio.to_thread(ray.get, joins),
            self.engine.open_weight_group(host, port, world, 1, layout),
            return_exceptions=True,
        )
        if (error := _first_error(results)) is not None:
            raise error
        self.layout = layout

    async def sync(self, version: int, *, corrupt_bucket: int | None = None) -> SyncReport:
        """Broadcast the trainers' weights into the engine as ``version``; returns once the engine
        runs it. Raises (WeightUpdateError for a damaged bucket) with the engine still on its old
        version. ``corrupt_bucket``: damage that bucket in transit (tests)."""
        if self.layout is None:
            raise RuntimeError("WeightSync.sync before open")
        start = time.perf_counter()
        sends = [t.broadcast_weights.remote(version, corrupt_bucket) for t in self.trainers]
        results = await asyncio.gather(
            asyncio.to_thread(ray.get, sends),
            self.engine.receive_weights(version),
            return_exceptions=True,
        )
        seconds = time.perf_counter() - start
        if (error := _first_error(results)) is not None:
            raise error
        if self.engine.stats().weight_version != version:
            raise RuntimeError(
                f"the engine reports weight version {self.engine.stats().weight_version} after "
                f"loading version {version}"
            )
        sent = results[0][0]
        return SyncReport(version, int(sent["bytes"]), seconds, sent["seconds"], len(self.layout.buckets))

    async def close(self) -> None:
        await asyncio.to_thread(ray.get, [t.close_weight_group.remote() for t in self.trainers])
        await self.engine.close_weight_group()
        self.layout = None
