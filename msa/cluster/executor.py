"""Where the shards run: in this process (``LocalExecutor``, tp = sp = 1) or as Ray actors placed
in one placement group (``RayExecutor``). The engine talks to either through ``ModelExecutor``.

Every call has a timeout; a shard that dies or stops answering turns into EngineDeadError, so a
caller never hangs on a lost actor.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import sys
from collections.abc import Awaitable
from typing import Any

from msa.cluster.config import EngineConfig
from msa.cluster.protocol import EngineDeadError, EngineError
from msa.cluster.sampler import SampleResult
from msa.cluster.scheduler import StepPlan
from msa.cluster.shard import ModelShard, ShardSpec
from msa.cluster.weights import BucketLayout, WeightBucket
from msa.platform.aio import wait_within

log = logging.getLogger(__name__)


def shard_spec(config: EngineConfig, rank: int) -> ShardSpec:
    return ShardSpec(
        model=config.model,
        dtype=config.torch_dtype,
        device=config.device,
        seed=config.seed,
        tp=config.tp,
        sp=config.sp,
        rank=rank,
        num_pages=config.num_pages,
        kv_cache_memory_bytes=config.kv_cache_memory_bytes,
        gpu_memory_utilization=config.gpu_memory_utilization,
        max_num_batched_tokens=config.max_num_batched_tokens,
        collective_timeout_s=config.step_timeout_s,
        random_init=config.random_init,
        cuda_graph_max_tokens=config.graph_tokens,
        max_num_seqs=config.max_num_seqs,
    )


class ModelExecutor(abc.ABC):
    """Runs every shard of one replica. ``start`` returns the KV pages each shard holds."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abc.abstractmethod
    async def start(self) -> int: ...

    @abc.abstractmethod
    async def execute(self, plan: StepPlan) -> SampleResult:
        """One step on every shard; rank 0's sampled tokens."""

    @abc.abstractmethod
    async def check_health(self) -> None: ...

    @abc.abstractmethod
    async def stage_weights(self, bucket: WeightBucket) -> None: ...

    @abc.abstractmethod
    async def open_weight_group(
        self, host: str, port: int, world: int, first_rank: int, layout: BucketLayout
    ) -> None:
        """Every shard joins the weight-broadcast group at ``host:port`` (shard r as rank
        ``first_rank + r``); returns once all have joined, which needs the sender to join too."""

    @abc.abstractmethod
    async def receive_weights(self, version: int) -> None:
        """Every shard stages one broadcast of the weight group and checks its buckets."""

    @abc.abstractmethod
    async def close_weight_group(self) -> None: ...

    @abc.abstractmethod
    async def commit_weights(self, version: int) -> None: ...

    @abc.abstractmethod
    async def discard_weights(self) -> None: ...

    @abc.abstractmethod
    async def fill_cache_random(self, seed: int) -> None:
        """Random values in every KV page of every shard (benchmarks of decode at long context)."""

    @abc.abstractmethod
    async def shutdown(self) -> None: ...


# The step thread holds the GIL while it launches kernels; with Python's default 5 ms switch
# interval the event loop (the engine loop, streamed outputs, HTTP in a Serve replica) waits up to
# 5 ms for every turn. 0.5 ms lets it in promptly.
GIL_SWITCH_INTERVAL_S = 0.0005


class LocalExecutor(ModelExecutor):
    """The single shard in this process; its work runs in a worker thread so the event loop
    keeps streaming while a step computes, or, when ``inline``, in the loop's thread (no timeout
    then: nothing could interrupt it). It shortens the process's GIL switch interval to
    ``GIL_SWITCH_INTERVAL_S`` (never lengthens it)."""

    def __init__(self, config: EngineConfig, *, inline: bool = False) -> None:
        super().__init__(config)
        if config.world_size != 1:
            raise EngineError(f"LocalExecutor runs tp = sp = 1, got tp={config.tp}, sp={config.sp}")
        self.shard = ModelShard(shard_spec(config, 0))
        self.inline = inline
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))

    async def _call(self, fn, *args, timeout: float) -> Any:
        if self.inline:
            return fn(*args)
        try:
            return await wait_within(asyncio.to_thread(fn, *args), timeout)
        except asyncio.TimeoutError as e:
            raise EngineDeadError(
                f"the local shard did not answer {fn.__name__} within {timeout:.0f} s"
            ) from e

    async def start(self) -> int:
        pages = await self._call(self.shard.setup, 0, timeout=self.config.start_timeout_s)
        await self._call(self.shard.init_cache, pages, timeout=self.config.start_timeout_s)
        return pages

    async def execute(self, plan: StepPlan) -> SampleResult:
        return await self._call(self.shard.execute, plan, timeout=self.config.step_timeout_s)

    async def check_health(self) -> None:
        await self._call(self.shard.check_health, timeout=self.config.health_timeout_s)

    async def stage_weights(self, bucket: WeightBucket) -> None:
        await self._call(self.shard.stage_weights, bucket, timeout=self.config.step_timeout_s)

    async def open_weight_group(
        self, host: str, port: int, world: int, first_rank: int, layout: BucketLayout
    ) -> None:
        timeout = self.config.step_timeout_s
        await self._call(
            self.shard.open_weight_group, host, port, world, first_rank, layout, timeout, timeout=timeout
        )

    async def receive_weights(self, version: int) -> None:
        await self._call(self.shard.receive_weights, version, timeout=self.config.step_timeout_s)

    async def close_weight_group(self) -> None:
        self.shard.close_weight_group()

    async def commit_weights(self, version: int) -> None:
        await self._call(self.shard.commit_weights, version, timeout=self.config.step_timeout_s)

    async def discard_weights(self) -> None:
        self.shard.discard_weights()

    async def fill_cache_random(self, seed: int) -> None:
        await self._call(self.shard.fill_cache_random, seed, timeout=self.config.start_timeout_s)

    async def shutdown(self) -> None:
        self.shard = None


class RayExecutor(ModelExecutor):
    """One ``ModelShard`` actor per bundle of the replica's placement group; every step goes to all
    of them and rank 0's answer comes back."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.placement = None
        self.shards: list = []

    async def _all(self, method: str, *args: Any, timeout: float) -> list[Any]:
        import ray

        calls: list[Awaitable] = [getattr(shard, method).remote(*args) for shard in self.shards]
        try:
            return await wait_within(asyncio.gather(*calls), timeout)
        except asyncio.TimeoutError as e:
            raise EngineDeadError(f"a shard did not answer {method} within {timeout:.0f} s") from e
        except (
            ray.exceptions.RayActorError,
            ray.exceptions.ActorUnavailableError,
            ray.exceptions.ObjectLostError,
        ) as e:
            raise EngineDeadError(f"a shard actor died during {method}: {e}") from e
        except ray.exceptions.RayTaskError as e:
            raise e.as_instanceof_cause() from None

    async def start(self) -> int:
        import ray

        from msa.cluster.placement import ReplicaPlacement

        config = self.config
        self.placement = ReplicaPlacement(config.tp, config.sp, use_gpu=config.device == "cuda")
        await self.placement.ready(self.config.start_timeout_s)
        actor = ray.remote(ModelShard)
        self.shards = [
            actor.options(**self.placement.actor_options(rank)).remote(shard_spec(config, rank))
            for rank in range(config.world_size)
        ]
        port = await wait_within(self.shards[0].free_port.remote(), self.config.start_timeout_s)
        capacities = await self._all("setup", port, timeout=self.config.start_timeout_s)
        pages = min(capacities)
        await self._all("init_cache", pages, timeout=self.config.start_timeout_s)
        return pages

    async def execute(self, plan: StepPlan) -> SampleResult:
        try:
            results = await self._all("execute", plan, timeout=self.config.step_timeout_s)
        except EngineDeadError:
            raise
        except Exception as e:  # one rank failing leaves the others inside a collective
            raise EngineDeadError(f"a shard failed a step: {e!r}") from e
        return results[0]

    async def check_health(self) -> None:
        await self._all("check_health", timeout=self.config.health_timeout_s)

    async def stage_weights(self, bucket: WeightBucket) -> None:
        import ray

        ref = ray.put(bucket)  # one copy in the object store, read by every shard
        await self._all("stage_weights", ref, timeout=self.config.step_timeout_s)

    async def open_weight_group(
        self, host: str, port: int, world: int, first_rank: int, layout: BucketLayout
    ) -> None:
        timeout = self.config.step_timeout_s
        await self._all("open_weight_group", host, port, world, first_rank, layout, timeout, timeout=timeout)

    async def receive_weights(self, version: int) -> None:
        await self._all("receive_weights", version, timeout=self.config.step_timeout_s)

    async def close_weight_group(self) -> None:
        await self._all("close_weight_group", timeout=self.config.step_timeout_s)

    async def commit_weights(self, version: int) -> None:
        await self._all("commit_weights", version, timeout=self.config.step_timeout_s)

    async def discard_weights(self) -> None:
        await self._all("discard_weights", timeout=self.config.step_timeout_s)

    async def fill_cache_random(self, seed: int) -> None:
        await self._all("fill_cache_random", seed, timeout=self.config.start_timeout_s)

    async def shutdown(self) -> None:
        import ray

        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        self.shards = []
        if self.placement is not None:
            self.placement.remove()
            self.placement = None
