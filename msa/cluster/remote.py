"""The engine in its own process: ``EngineCore`` (a Ray actor) runs ``MSAEngine`` and its step loop,
and ``RemoteEngine``, in the caller's process, speaks the same ``Engine`` protocol to it.

A caller whose event loop is busy with other work (an HTTP server streaming tokens) then never
shares a GIL with the steps. Requests and outputs do not travel as Ray calls: a step every few
milliseconds outruns what Ray's per-call machinery in a busy process can turn around, and calls
that waited for the steps' end added tens of milliseconds to the first token. They cross one TCP
connection per caller instead, as length-prefixed pickles (``Frames``): the caller sends ``add``
and ``abort`` messages, and the engine process sends it, after every step, one message with every
output of its requests that the step produced and the engine's stats, as vLLM's API servers and
engine core exchange one ZMQ message per step. Several callers (API servers) may share one engine.
The engine reads its sockets between steps, in the same loop turn that sends the outputs. Ray
still places the process and carries the rare calls: start, health, weight updates, shutdown. A
connection proves itself first with a token that only the Ray call returns; nothing is unpickled
before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import itertools
import logging
import pickle
import secrets
from collections.abc import AsyncIterator, Callable, Iterable
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
    InvalidRequestError,
    SamplingParams,
    TokenOutput,
    stream_queue,
)

log = logging.getLogger(__name__)

# With no outputs to send, the engine process still sends its stats this often.
STATS_INTERVAL_S = 0.25

# Concurrent calls an EngineCore actor takes (its Ray option ``max_concurrency``): its rare calls
# (start, health, weight updates) never wait behind each other.
ENGINE_CORE_CONCURRENCY = 1000

_LENGTH = 4  # bytes of a frame's big-endian length prefix


@dataclass(slots=True)
class RequestFailed:
    """A request's stream ended with ``error`` in the engine process."""

    request_id: str
    error: BaseException


@dataclass(slots=True)
class _OpenRequest:
    """A caller's request that the engine has not finished: its id, the key its outputs come back
    with, the queue they go to and how many of its choices are still open."""

    request_id: str
    key: int
    queue: asyncio.Queue
    open_choices: int


class Frames(asyncio.Protocol):
    """A stream connection carrying length-prefixed pickles. Each whole message goes to
    ``on_message(self, message)`` as soon as its last byte arrives, in the loop turn that read it;
    ``on_lost(self, exc)`` is told when the connection ends. With ``token`` the peer must first
    send those raw bytes: nothing it sends is unpickled before, and a wrong token closes the
    connection (``on_proof(self)`` is told of a right one)."""

    def __init__(
        self,
        on_message: Callable[[Frames, Any], None],
        on_lost: Callable[[Frames, BaseException | None], None],
        *,
        token: bytes | None = None,
        on_proof: Callable[[Frames], None] | None = None,
    ) -> None:
        self.on_message, self.on_lost = on_message, on_lost
        self._token, self._on_proof = token, on_proof
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        self._buffer += data
        if self._token is not None:
            token = self._token
            if len(self._buffer) < len(token):
                return
            proof = bytes(self._buffer[: len(token)])
            del self._buffer[: len(token)]
            self._token = None
            if not hmac.compare_digest(proof, token):
                self._refused = True
                self.close()
                return
            if self._on_proof is not None:
                self._on_proof(self)
        while len(self._buffer) >= _LENGTH:
            size = int.from_bytes(self._buffer[:_LENGTH], "big")
            if len(self._buffer) < _LENGTH + size:
                return
            message = pickle.loads(self._buffer[_LENGTH : _LENGTH + size])
            del self._buffer[: _LENGTH + size]
            self.on_message(self, message)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.on_lost(self, exc)

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        self.transport.write(len(data).to_bytes(_LENGTH, "big") + data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class EngineCore:
    """Ray actor body (async): the engine with its steps inline in the loop (``inline_steps``),
    and the server end of its callers' connections. Each caller connects with the token ``start``
    returned; a request's outputs go back on the connection that added it, each with the key the
    caller gave the request, and a caller that goes away has its requests aborted (nobody reads
    them any more). Several callers may share the engine (API servers in processes of their own);
    ``start`` may come from each."""

    def __init__(self, config: EngineConfig) -> None:
        self.engine = MSAEngine(config, inline_steps=True)
        self._token = secrets.token_bytes(16)
        self._server: asyncio.Server | None = None
        self._start_lock = asyncio.Lock()
        self._clients: set[Frames] = set()
        self._owners: dict[str, Frames] = {}  # request id -> the connection that added it
        self._outboxes: dict[Frames, list[tuple[int, TokenOutput | RequestFailed]]] = {}
        self._flush_pending = False
        self._stats_task: asyncio.Task | None = None

    async def start(self) -> dict[str, Any]:
        async with self._start_lock:
            if self._server is None:
                await self.engine.start()
                host = ray.util.get_node_ip_address()

                def connection() -> Frames:
                    return Frames(self._on_message, self._on_lost, token=self._token, on_proof=self._on_proof)

                self._server = await asyncio.get_running_loop().create_server(connection, host, 0)
                self._stats_task = asyncio.create_task(self._send_stats(), name="msa-engine-core-stats")
        return {
            "max_context_length": self.engine.max_context_length,
            "stats": self.engine.stats(),
            "address": self._server.sockets[0].getsockname()[:2],
            "token": self._token,
        }

    def _on_proof(self, conn: Frames) -> None:
        self._clients.add(conn)

    def _on_message(self, conn: Frames, message: Any) -> None:
        if conn not in self._clients:
            conn.close()
            return
        kind, request_id, *args = message
        if kind == "add":
            self._add(conn, request_id, *args)
        elif kind == "abort" and self._owners.get(request_id) is conn:
            # At once, before the connection's next message: that may reuse the id.
            self.engine.abort_now(request_id)

    def _on_lost(self, conn: Frames, exc: BaseException | None) -> None:
        if conn in self._clients:
            self._clients.discard(conn)
            self._outboxes.pop(conn, None)
            for request_id in [r for r, owner in self._owners.items() if owner is conn]:
                self.engine.abort_now(request_id)

    def _add(
        self, conn: Frames, request_id: str, key: int, prompt_token_ids: list[int], params: SamplingParams
    ) -> None:
        """Start a request; its outputs, or the error that refuses or ends it, go to ``conn``'s outbox
        with ``key``."""
        open_choices = params.n

        def sink(item: TokenOutput | BaseException) -> None:
            nonlocal open_choices
            if isinstance(item, BaseException):
                open_choices = 0
                item = RequestFailed(request_id, item)
            elif item.finish_reason is not None:
                open_choices -= 1
            if open_choices == 0 and self._owners.get(request_id) is conn:
                del self._owners[request_id]
            self._post(conn, key, item)

        try:
            self.engine.add_request(request_id, prompt_token_ids, params, sink)
        except EngineError as e:  # refused (too long, queue full, dead): the caller re-raises it
            self._post(conn, key, RequestFailed(request_id, e))
            return
        self._owners[request_id] = conn

    def _post(self, conn: Frames, key: int, item: TokenOutput | RequestFailed) -> None:
        self._outboxes.setdefault(conn, []).append((key, item))
        if not self._flush_pending:  # one message per caller for everything a step posts
            self._flush_pending = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        outboxes, self._outboxes = self._outboxes, {}
        stats = self.engine.stats()
        for conn, items in outboxes.items():
            if conn in self._clients:
                conn.send((items, stats))

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            stats = self.engine.stats()
            for conn in self._clients:
                conn.send(([], stats))

    async def stats(self) -> EngineStats:
        return self.engine.stats()

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def update_weights(self, named_tensors: list[tuple[str, torch.Tensor]], version: int) -> None:
        await self.engine.update_weights(named_tensors, version)

    async def shutdown(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._clients):
            conn.close()
        await self.engine.shutdown()


class RemoteEngine:
    """``Engine`` whose ``MSAEngine`` runs in an ``EngineCore`` actor. Without ``actor`` it starts
    its own, with the Ray options ``actor_options`` (``num_cpus``, ``num_gpus``), placed on this
    node when it can be so the connection stays on the host, and stops it on ``shutdown``. With
    ``actor`` (an ``EngineCore`` actor that others may share) it only connects, and ``shutdown``
    closes its connection. Outputs arrive on the connection in this process's event loop and go
    straight into their requests' queues."""

    def __init__(
        self, config: EngineConfig, actor_options: dict[str, Any] | None = None, *, actor: Any = None
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer_for(config)
        self._options = {"num_cpus": 1, **(actor_options or {})}
        self._actor: Any = actor
        self._owns_actor = actor is None
        self._started = False
        self.address: tuple[str, int] | None = None  # the engine process's end of the connection
        self._conn: Frames | None = None
        # The requests the engine has not finished, by key; by id those whose stream is open too.
        self._routes: dict[int, _OpenRequest] = {}
        self._open: dict[str, _OpenRequest] = {}
        self._keys = itertools.count()
        self._stats = EngineStats(
            running=0, waiting=0, pages_used=[], pages_total=[], rejected=0, weight_version=0, healthy=False
        )
        self._max_context_length = 0
        self._dead: EngineDeadError | None = None

    @property
    def max_context_length(self) -> int:
        return self._max_context_length

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        if self._actor is None:
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
            self._actor = (
                ray.remote(EngineCore)
                .options(**self._options, scheduling_strategy=here, max_concurrency=ENGINE_CORE_CONCURRENCY)
                .remote(self.config)
            )
        info = await self._actor.start.remote()
        self._max_context_length, self._stats = info["max_context_length"], info["stats"]
        self.address = host, port = info["address"]
        _, self._conn = await asyncio.get_running_loop().create_connection(
            lambda: Frames(self._on_message, self._on_lost), host, port
        )
        self._conn.transport.write(info["token"])

    def _on_message(self, conn: Frames, message: tuple[list, EngineStats]) -> None:
        items, self._stats = message
        for key, item in items:
            request = self._routes.get(key)
            if request is None:
                continue
            if isinstance(item, RequestFailed):
                request.open_choices = 0
                request.queue.put_nowait(item.error)
            else:
                request.open_choices -= item.finish_reason is not None
                request.queue.put_nowait(item)
            if request.open_choices == 0:
                # Finished in the engine: the id is free again, whether or not its stream was closed.
                del self._routes[key]
                if self._open.get(request.request_id) is request:
                    del self._open[request.request_id]

    def _on_lost(self, conn: Frames, exc: BaseException | None) -> None:
        if self._dead is None:
            log.error("the engine process closed its connection: %s", exc)
            self._fail(
                EngineDeadError(f"the engine process closed its connection ({exc or 'end of stream'})")
            )

    def _fail(self, error: EngineDeadError) -> None:
        self._dead = error
        self._stats = dataclasses.replace(self._stats, healthy=False)
        for request in self._routes.values():
            request.queue.put_nowait(error)
        self._routes.clear()
        self._open.clear()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        if self._conn is None:
            raise EngineError("the engine is not started; await engine.start() first")

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        self._check_alive()
        if request_id in self._open:
            raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
        request = _OpenRequest(request_id, next(self._keys), asyncio.Queue(), params.n)
        self._open[request_id] = self._routes[request.key] = request
        try:
            self._conn.send(("add", request_id, request.key, list(prompt_token_ids), params))
            async for out in stream_queue(request.queue, params.n):
                yield out
        finally:
            # Abort only this stream's own request, and only while the engine has not finished it
            # (nor refused it): once it has, the id may belong to a newer request. Its id is free at
            # once; its outputs still on the way come with its key, not the next request's.
            if self._open.get(request_id) is request:
                del self._open[request_id]
                if self._dead is None:
                    self._conn.send(("abort", request_id))

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
        if self._conn is not None and self._dead is None:
            self._conn.send(("abort", request_id))

    async def check_health(self) -> None:
        self._check_alive()
        await self._call(self._actor.check_health.remote())

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        self._check_alive()
        await self._call(self._actor.update_weights.remote(list(named_tensors), version))

    def stats(self) -> EngineStats:
        """The engine's stats as of its latest message (at most ``STATS_INTERVAL_S`` old)."""
        return self._stats

    async def shutdown(self) -> None:
        self._fail(self._dead or EngineDeadError("the engine was shut down"))
        if self._conn is not None:
            self._conn.close()
        if self._actor is not None and self._owns_actor:
            with contextlib.suppress(Exception):
                await self._actor.shutdown.remote()
            ray.kill(self._actor)
