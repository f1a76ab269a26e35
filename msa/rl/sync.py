"""Weight sync from the trainers into the rollout engine, with the version bookkeeping.

The trainers' full weights go into the running engine's shards by ``engine.update_weights``
(bucketing and checksums are the engine's). The version is the number of optimizer steps the
weights have taken; every generated token carries the version that produced it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray


@dataclass(frozen=True, slots=True)
class SyncReport:
    version: int
    bytes: int
    gather_seconds: float
    load_seconds: float

    @property
    def seconds(self) -> float:
        return self.gather_seconds + self.load_seconds

    @property
    def gbps(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def metrics(self) -> dict[str, float]:
        return {
            "sync/version": self.version,
            "sync/gb": self.bytes / 1e9,
            "sync/seconds": self.seconds,
            "sync/gather_seconds": self.gather_seconds,
            "sync/load_seconds": self.load_seconds,
            "sync/gbps": self.gbps,
        }


async def sync_weights(engine, trainers: list, version: int, dtype: str) -> SyncReport:
    """Copy the policy held by the PolicyTrainer actors ``trainers`` (rank order; all take part, as
    ZeRO-3 gathers each parameter collectively; rank 0 returns them) into ``engine`` as ``version``.
    The engine commits it between two of its steps."""
    start = time.perf_counter()
    named = ray.get([t.named_weights.remote(dtype) for t in trainers])[0]
    gathered = time.perf_counter()
    await engine.update_weights(named, version)
    loaded = time.perf_counter()
    if engine.stats().weight_version != version:
        raise RuntimeError(
            f"the engine reports weight version {engine.stats().weight_version} after "
            f"loading version {version}"
        )
    size = sum(t.numel() * t.element_size() for _, t in named)
    return SyncReport(version, size, gathered - start, loaded - gathered)
