"""The engine in its own process: ``EngineCore`` (a Ray actor) runs ``MSAEngine`` and its step loop,
and ``RemoteEngine``, in the caller's process, speaks the same ``Engine`` protocol to it.

A caller whose event loop is busy with other work (an HTTP server streaming tokens) then never
shares a GIL with the steps. Outputs cross the process boundary in batches: one ``poll`` returns
everything every request produced since the previous one, so the traffic is one round trip per
engine step whatever the number of streams, as vLLM's API server and engine core exchange one
message per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from msa.cluster.config import EngineConfig
from msa.cluster.engine import MSAEngine, tokenizer_for
from msa.cluster.protocol import (
    EngineDeadError,
    EngineError,
    EngineStats,
    SamplingParams,
    TokenOutput,
    stream_queue,
)

log = logging.getLogger(__name__)

# How long a poll waits for outputs before it returns none (with fresh stats).
POLL_TIMEOUT_S = 0.25


@dataclass(slots=True)
class RequestFailed:
    """A request's stream ended with ``error`` in the engine process."""

    request_id: str
    error: BaseException


class EngineCore:
    """Ray actor body (async): the engine, its loop, and an outbox that every step's outputs go
    straight into (no task per request: the event loop's only per-step work is one poll). Steps
    run in the loop's thread (``inline_steps``); calls that arrive during one wait for its end,
    which costs them nothing, since a new request could only join the next step anyway."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = MSAEngine(config, inline_steps=True)
        self._outbox: list[TokenOutput | RequestFailed] = []
        self._ready = asyncio.Event()

    async def start(self) -> dict[str, Any]:
        await self.engine.start()
        return {"max_context_length": self.engine.max_context_length, "stats": self.engine.stats()}

    def _post(self, item: TokenOutput | RequestFailed) -> None:
        self._outbox.append(item)
        self._ready.set()

    async def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Start a request; its outputs, or the error that refuses or ends it, go to the outbox."""

        def sink(item: TokenOutput | BaseException) -> None:
            self._post(RequestFailed(request_id, item) if isinstance(item, BaseException) else item)

        try:
            self.engine.add_request(request_id, prompt_token_ids, params, sink)
        except EngineError as e:  # refused (too long, queue full, dead): the caller re-raises it
            sink(e)

    async def poll(self, timeout_s: float) -> tuple[list[TokenOutput | RequestFailed], EngineStats]:
        """Everything posted since the last poll (waiting up to ``timeout_s`` for something), and
        the engine's stats."""
        if not self._outbox:
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)
        items, self._outbox = self._outbox, []
        self._ready.clear()
        return items, self.engine.stats()

    async def abort(self, request_id: str) -> None:
        await self.engine.abort(request_id)

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        await self.engine.update_weights(named_tensors, version)

    async def shutdown(self) -> None:
        await self.engine.shutdown()


class RemoteEngine:
    """``Engine`` whose ``MSAEngine`` runs in an ``EngineCore`` actor. ``actor_options`` are the
    actor's Ray options (``num_cpus``, ``num_gpus``); it is placed on this node, so outputs cross
    no network. One background task polls the actor and hands each output to its request."""

    def __init__(self, config: EngineConfig, actor_options: dict[str, Any] | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer_for(config)
        self._options = {"num_cpus": 1, **(actor_options or {})}
        self._actor: Any = None
        self._queues: dict[str, asyncio.Queue] = {}
        self._stats = EngineStats(
            running=0, waiting=0, pages_used=[], pages_total=[], rejected=0, weight_version=0, healthy=False
        )
        self._max_context_length = 0
        self._dead: EngineDeadError | None = None
        self._poller: asyncio.Task | None = None

    @property
    def max_context_length(self) -> int:
        return self._max_context_length

    async def start(self) -> None:
        if self._actor is not None:
            return
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
        self._actor = (
            ray.remote(EngineCore)
            .options(**self._options, scheduling_strategy=here, max_concurrency=1000)
            .remote(self.config)
        )
        info = await self._actor.start.remote()
        self._max_context_length, self._stats = info["max_context_length"], info["stats"]
        self._poller = asyncio.create_task(self._poll_loop(), name="msa-remote-engine-poll")

    async def _poll_loop(self) -> None:
        try:
            while True:
                items, self._stats = await self._actor.poll.remote(POLL_TIMEOUT_S)
                for item in items:
                    queue = self._queues.get(item.request_id)
                    if queue is not None:
                        queue.put_nowait(item.error if isinstance(item, RequestFailed) else item)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the engine process died
            log.exception("the engine process failed")
            self._fail(EngineDeadError(f"the engine process failed: {e}"))

    def _fail(self, error: EngineDeadError) -> None:
        self._dead = error
        self._stats = dataclasses.replace(self._stats, healthy=False)
        for queue in self._queues.values():
            queue.put_nowait(error)

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        if self._actor is None:
            raise EngineError("the engine is not started; await engine.start() first")

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        self._check_alive()
        if request_id in self._queues:
            raise EngineError(f"request_id {request_id!r} is already in flight")
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            await self._call(self._actor.add.remote(request_id, list(prompt_token_ids), params))
            async for out in stream_queue(queue, params.n):
                yield out
            finished = True
        finally:
            self._queues.pop(request_id, None)
            if not finished and self._dead is None:
                with contextlib.suppress(Exception):
                    await self._actor.abort.remote(request_id)

    async def _call(self, ref: Any) -> Any:
        """Await an actor call; the engine's own errors pass through, a dead actor becomes
        EngineDeadError (and fails every request in flight)."""
        try:
            return await ref
        except EngineError:
            raise
        except Exception as e:
            if self._dead is None:
                self._fail(EngineDeadError(f"the engine process failed: {e}"))
            raise EngineDeadError(str(self._dead)) from e

    async def abort(self, request_id: str) -> None:
        if self._actor is not None and self._dead is None:
            await self._call(self._actor.abort.remote(request_id))

    async def check_health(self) -> None:
        self._check_alive()
        await self._call(self._actor.check_health.remote())

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self._check_alive()
        await self._call(self._actor.update_weights.remote(list(named_tensors), version))

    def stats(self) -> EngineStats:
        """The engine's stats as of the latest poll (at most ``POLL_TIMEOUT_S`` old)."""
        return self._stats

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            await asyncio.gather(self._poller, return_exceptions=True)
            self._poller = None
        self._fail(self._dead or EngineDeadError("the engine was shut down"))
        if self._actor is not None:
            with contextlib.suppress(Exception):
                await self._actor.shutdown.remote()
            ray.kill(self._actor)
