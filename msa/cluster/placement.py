"""Placement of one engine replica: a placement group of ``tp x sp`` bundles on one node
(STRICT_PACK, so the shards reach each other over NVLink or loopback), one shard actor per bundle.
A bundle is one GPU (and a CPU for its actor), or one CPU when the replica runs without GPUs.
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from msa.cluster.protocol import EngineError
from msa.platform.aio import wait_within


def shard_bundle(use_gpu: bool) -> dict[str, int]:
    """The resources of one shard actor's bundle."""
    return {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}


class ReplicaPlacement:
    """The bundles of one replica; bundle ``rank`` hosts shard ``rank`` (= sp_rank * tp + tp_rank)."""

    def __init__(self, tp: int, sp: int, *, use_gpu: bool) -> None:
        self.tp, self.sp, self.use_gpu = tp, sp, use_gpu
        self.bundles = [shard_bundle(use_gpu) for _ in range(tp * sp)]
        self.group = placement_group(self.bundles, strategy="STRICT_PACK")

    async def ready(self, timeout_s: float) -> None:
        """Wait until every bundle is reserved; EngineError naming the demand if it never is."""
        try:
            await wait_within(self.group.ready(), timeout_s)
        except asyncio.TimeoutError as e:
            self.remove()
            raise EngineError(
                f"could not place {len(self.bundles)} bundles {self.bundles[0]} on one node "
                f"within {timeout_s:.0f} s (tp={self.tp} x sp={self.sp}); cluster has "
                f"{ray.available_resources()} available"
            ) from e

    def actor_options(self, rank: int) -> dict[str, Any]:
        """``.options(...)`` for the shard actor of bundle ``rank``."""
        return {
            "num_cpus": 1,
            "num_gpus": 1 if self.use_gpu else 0,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.group, placement_group_bundle_index=rank
            ),
            "max_restarts": 0,
            "max_concurrency": 1,
        }

    def remove(self) -> None:
        """Give the bundles back (once; later calls do nothing)."""
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None
