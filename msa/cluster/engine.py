"""``MSAEngine``: the ``msa.cluster.protocol.Engine`` that serving and RL drive.

One asyncio task runs the engine loop: schedule a step, run it on the executor's shards, append the
sampled tokens, and push each choice's streamed output into its request's queue. ``generate``
reads that queue. Weight updates are staged while steps run and committed between two steps, so
a step never mixes versions and every output names the version that produced it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from msa.cluster.block_manager import BlockManager
from msa.cluster.config import EngineConfig
from msa.cluster.executor import LocalExecutor, ModelExecutor, RayExecutor
from msa.cluster.output import ChoiceStream
from msa.cluster.parallel import check_parallel_shape
from msa.cluster.protocol import (
    EngineDeadError,
    EngineError,
    EngineOverloadedError,
    EngineStats,
    InvalidRequestError,
    RequestTooLongError,
    SamplingParams,
    TokenOutput,
    stream_queue,
)
from msa.cluster.sampler import SampleResult
from msa.cluster.scheduler import Scheduler, StepPlan
from msa.cluster.sequence import Sequence
from msa.cluster.weights import BucketLayout, WeightBucket, pack_buckets
from msa.platform.config import model_config_of
from msa.platform.tokenizer import Tokenizer

__all__ = ["EngineConfig", "MSAEngine"]

log = logging.getLogger(__name__)


# Where a request's outputs go, as the step that made them finishes: each TokenOutput, or the
# exception that ends the request (the engine died or shut down).
OutputSink = Callable[[TokenOutput | BaseException], None]


@dataclass
class _Request:
    request_id: str
    seqs: list[Sequence]
    streams: list[ChoiceStream]
    sink: OutputSink

    @property
    def done(self) -> bool:
        return all(s.finished for s in self.streams)


@dataclass(slots=True)
class StepCounters:
    """Steps run since the start, the seconds they took, and their decode and prefill tokens."""

    steps: int = 0
    seconds: float = 0.0
    decode_tokens: int = 0
    prefill_tokens: int = 0

    def add(self, plan: StepPlan, seconds: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.prefill_tokens += plan.num_prompt_tokens
        self.decode_tokens += plan.num_tokens - plan.num_prompt_tokens


def tokenizer_for(config: EngineConfig) -> Tokenizer:
    """The checkpoint's tokenizer (tokenizer.json in the model or tokenizer directory), else the
    byte-level default."""
    source = config.tokenizer or config.model
    if isinstance(source, str) and Path(source).is_dir() and (Path(source) / "tokenizer.json").exists():
        return Tokenizer.from_directory(source)
    return Tokenizer.byte_level_default()


class MSAEngine:
    """A replica of ``config.tp x config.sp`` shards. Construction only reads the model config;
    ``await start()`` places the shards, loads the weights and sizes the KV cache.

    ``inline_steps``: an in-process shard runs each step in the event loop's own thread, which
    waits for it, instead of in a worker thread while the loop goes on. For a process whose loop
    has nothing else to do during a step (``EngineCore``): the step then never shares the GIL with
    the loop's message handling, which lengthened host-bound steps."""

    def __init__(self, config: EngineConfig, *, inline_steps: bool = False) -> None:
        self.config = config
        self.inline_steps = inline_steps
        self.model_config = model_config_of(config.model)
        check_parallel_shape(self.model_config, config.tp)
        self.block_size = self.model_config.sparse.block_size
        self.executor: ModelExecutor | None = None
        self.scheduler: Scheduler | None = None
        self.tokenizer: Tokenizer | None = None
        self.weight_version = 0
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[int, tuple[Sequence, ChoiceStream, _Request]] = {}
        self._rng = random.Random(config.seed)
        self._rejected = 0
        self._dead: EngineDeadError | None = None
        self._wake = asyncio.Event()
        self._step_lock = asyncio.Lock()
        self._update_lock = asyncio.Lock()
        self._loop_task: asyncio.Task | None = None
        self._steps = StepCounters()

    # Lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self.tokenizer = await asyncio.to_thread(tokenizer_for, self.config)
        self.eos_token_ids = sorted(set(self.model_config.eos_token_ids) | set(self.tokenizer.eos_token_ids))
        local = self.config.world_size == 1 and not self.config.ray_shards
        executor = LocalExecutor(self.config, inline=self.inline_steps) if local else RayExecutor(self.config)
        try:
            num_pages = await executor.start()
        except BaseException:
            await executor.shutdown()
            raise
        if num_pages < 1:
            await executor.shutdown()
            raise EngineError(
                "no KV page fits on a shard after the weights; lower tp x sp demands or "
                "raise gpu_memory_utilization / kv_cache_memory_bytes"
            )
        self.executor = executor
        blocks = BlockManager(num_pages, self.config.sp, self.block_size)
        self.scheduler = Scheduler(blocks, self.config.max_num_seqs, self.config.max_num_batched_tokens)
        self._loop_task = asyncio.create_task(self._run_loop(), name="msa-engine-loop")
        log.info(
            "engine started: tp=%d sp=%d, %d KV pages per shard, longest context %d tokens",
            self.config.tp,
            self.config.sp,
            num_pages,
            self.max_context_length,
        )

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
            self._loop_task = None
        # A shut-down engine refuses new work instead of queueing it where no loop will run it.
        self._dead = self._dead or EngineDeadError("the engine was shut down")
        for request in list(self._requests.values()):
            request.sink(EngineDeadError("the engine was shut down"))
        self._requests.clear()
        if self.executor is not None:
            await self.executor.shutdown()
            self.executor = None

    @property
    def max_context_length(self) -> int:
        """Longest prompt + completion one sequence may have on this replica."""
        limit = self.model_config.max_position_embeddings
        if self.scheduler is not None:
            limit = min(limit, self.scheduler.block_manager.max_sequence_tokens)
        return limit

    # Requests ----------------------------------------------------------------------------------

    def _check_request(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        if self.scheduler is None:
            raise EngineError("the engine is not started; await engine.start() first")
        if request_id in self._requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
        params.validate()
        if params.n > self.config.max_waiting:
            # Every choice waits in the queue before its first step: more than it holds never fit.
            raise InvalidRequestError(
                f"sampling parameter 'n' is {params.n}, but this engine queues at most "
                f"max_waiting={self.config.max_waiting} sequences",
                "n",
            )
        if not prompt:
            raise InvalidRequestError("prompt_token_ids must hold at least one token", "prompt_token_ids")
        vocab = self.model_config.vocab_size
        token_lists = (("prompt_token_ids", prompt), ("allowed_token_ids", params.allowed_token_ids or []))
        for name, ids in token_lists:
            bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)), None)
            if bad is not None:
                raise InvalidRequestError(f"{name} holds {bad!r}, outside the vocabulary [0, {vocab})", name)
        limit = self.max_context_length
        if len(prompt) + params.max_tokens > limit:
            # Name the tighter of the two limits, the one max_context_length reports.
            if limit == self.model_config.max_position_embeddings:
                reason = "max_position_embeddings"
            else:
                reason = (
                    f"KV pages: {self.scheduler.block_manager.num_pages} per shard x "
                    f"sp={self.config.sp} x {self.block_size} tokens, tp={self.config.tp}"
                )
            raise RequestTooLongError(len(prompt), params.max_tokens, limit, reason)
        if len(self.scheduler.waiting) + params.n > self.config.max_waiting:
            self._rejected += 1
            raise EngineOverloadedError(
                f"{len(self.scheduler.waiting)} sequences are waiting "
                f"(max_waiting={self.config.max_waiting})",
                retry_after=1.0,
            )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        """Stream the request's outputs (``params.n`` choices interleaved, told apart by
        ``index``); ends after every choice's output with a finish_reason."""
        queue: asyncio.Queue = asyncio.Queue()
        self.add_request(request_id, prompt_token_ids, params, queue.put_nowait)
        request = self._requests[request_id]
        try:
            async for out in stream_queue(queue, params.n):
                yield out
        finally:
            # Only this stream's own request: once it finished, its id may belong to a newer one.
            if self._requests.get(request_id) is request and self._dead is None:
                self._abort(request, notify=False)

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: OutputSink
    ) -> None:
        """Admit a request whose outputs go to ``sink`` as each step finishes (``generate`` streams
        them from a queue; the engine's own process hands them on in batches). Raises what
        ``generate`` raises before its first output."""
        prompt = list(prompt_token_ids)
        self._check_request(request_id, prompt, params)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(62)
        request = _Request(request_id, [], [], sink)
        for index in range(params.n):
            source = request.seqs[0] if request.seqs else None
            seq = Sequence(request_id, index, prompt, params, seed, self.config.sp, prefix_source=source)
            stream = ChoiceStream(request_id, index, len(prompt), params, self.tokenizer, self.eos_token_ids)
            request.seqs.append(seq)
            request.streams.append(stream)
            self._seqs[seq.seq_id] = (seq, stream, request)
            self.scheduler.add(seq)
        self._requests[request_id] = request
        self._wake.set()

    def request_ids(self) -> list[str]:
        """The ids of the requests in flight."""
        return list(self._requests)

    async def abort(self, request_id: str) -> None:
        self.abort_now(request_id)

    def abort_now(self, request_id: str) -> None:
        """``abort`` for a caller outside a coroutine (a connection's message handler): the request
        is finished and its id free when this returns."""
        request = self._requests.get(request_id)
        if request is not None:
            self._abort(request, notify=True)

    def _abort(self, request: _Request, *, notify: bool) -> None:
        """Finish the request's open choices with "abort" (sent to its sink if ``notify``)."""
        self._requests.pop(request.request_id, None)
        for seq, stream in zip(request.seqs, request.streams, strict=True):
            if stream.finished:
                continue
            self._release(seq)
            out = stream.abort(self.weight_version)
            if notify:
                request.sink(out)

    def _release(self, seq: Sequence) -> None:
        self.scheduler.remove(seq)
        self._seqs.pop(seq.seq_id, None)

    # The loop ----------------------------------------------------------------------------------

    async def _run_loop(self) -> None:
        try:
            while True:
                plan = self.scheduler.schedule()
                if plan is None:
                    self._wake.clear()
                    if self.scheduler.has_work():  # a preemption left this step empty: go again
                        await asyncio.sleep(0.001)
                    else:
                        await self._wake.wait()
                    continue
                async with self._step_lock:
                    plan.weight_version = self.weight_version
                    start = time.perf_counter()
                    result = await self.executor.execute(plan)
                    self._steps.add(plan, time.perf_counter() - start)
                self._deliver(plan, result)
                await asyncio.sleep(0)  # let the loop's other tasks see the outputs before the next step
        except asyncio.CancelledError:
            raise
        except EngineDeadError as e:
            self._die(e)
        except Exception as e:
            log.exception("engine loop failed")
            self._die(EngineDeadError(f"the engine loop failed: {e!r}"))

    def _deliver(self, plan: StepPlan, result: SampleResult) -> None:
        by_id = {seq_id: entry[0] for seq_id, entry in self._seqs.items()}
        for seq, i in self.scheduler.postprocess(plan, by_id, result.token_ids):
            _, stream, request = self._seqs[seq.seq_id]
            top = result.top_logprobs[i]
            out = stream.append(result.token_ids[i], result.logprobs[i], top, plan.weight_version)
            if stream.finished:
                self._release(seq)
                if request.done:
                    self._requests.pop(request.request_id, None)
            request.sink(out)

    def _die(self, error: EngineDeadError) -> None:
        self._dead = error
        log.error("engine is dead: %s", error)
        for request in list(self._requests.values()):
            request.sink(EngineDeadError(str(error)))
        self._requests.clear()

    # Health, weights, stats --------------------------------------------------------------------

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        if self.executor is None:
            raise EngineDeadError("the engine is not running")
        try:
            async with self._step_lock:
                await self.executor.check_health()
        except EngineDeadError as e:
            self._die(e)
            if self._loop_task is not None:
                self._loop_task.cancel()
            raise

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Pack full tensors held by the caller into checksummed buckets and load them into every
        shard through Ray's object store (the path for a caller with no weight group)."""
        buckets = pack_buckets(named_tensors, version, self.config.weight_bucket_bytes)
        await self.load_weight_buckets(buckets, version)

    async def load_weight_buckets(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """Stage already packed buckets on every shard (each verifies its checksum), then switch all
        shards to ``version`` between two steps. On any error the staged tensors are dropped, the
        engine keeps its current weights, and the error (WeightUpdateError names the bucket) is raised."""

        async def stage() -> None:
            iterator = iter(buckets)
            while (bucket := await asyncio.to_thread(next, iterator, None)) is not None:
                await self.executor.stage_weights(bucket)

        await self._load_weights(stage, version)

    async def open_weight_group(
        self, host: str, port: int, world: int, first_rank: int, layout: BucketLayout
    ) -> None:
        """Join every shard to a weight-broadcast group whose rank 0 (the sender, e.g. a trainer)
        hosts its store at ``host:port``; shard r is rank ``first_rank + r`` of ``world``. Returns
        once every member has joined. Later broadcasts carry buckets of ``layout``."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        await self.executor.open_weight_group(host, port, world, first_rank, layout)

    async def receive_weights(self, version: int) -> None:
        """Take one broadcast of full weights from the weight group (the sender broadcasts at the
        same time), then switch every shard to ``version`` between two steps, as
        ``load_weight_buckets`` does; a bad bucket raises WeightUpdateError and changes nothing."""
        await self._load_weights(lambda: self.executor.receive_weights(version), version)

    async def close_weight_group(self) -> None:
        if self.executor is not None:
            await self.executor.close_weight_group()

    async def _load_weights(self, stage: Callable[[], Awaitable[None]], version: int) -> None:
        """Steps keep running while ``stage`` fills every shard's staging area; the switch to
        ``version`` happens under the step lock, so a step never mixes versions."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        async with self._update_lock:
            try:
                await stage()
                async with self._step_lock:
                    await self._commit_weights(version)
            except EngineDeadError as e:
                self._die(e)
                raise
            except BaseException:
                await self.executor.discard_weights()
                raise

    async def _commit_weights(self, version: int) -> None:
        """Switch every shard to the staged ``version`` and tag later steps with it. A caller
        cancelled meanwhile waits for the switch to end before its cancellation goes on: the shards'
        copies cannot be stopped halfway, and a step must not start before ``weight_version`` names
        the weights it runs on."""

        async def commit() -> None:
            await self.executor.commit_weights(version)
            self.weight_version = version

        task = asyncio.ensure_future(commit())
        cancelled: asyncio.CancelledError | None = None
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError as e:
                cancelled = e
        task.result()  # the commit's own error, if it failed
        if cancelled is not None:
            raise cancelled

    def stats(self) -> EngineStats:
        """Requests with a choice in the running batch, requests with all choices waiting, pages per
        sequence shard (the tensor-parallel ranks of a shard hold the same pages)."""
        blocks = self.scheduler.block_manager if self.scheduler else None
        running = {s.request_id for s in self.scheduler.running} if self.scheduler else set()
        waiting = {s.request_id for s in self.scheduler.waiting} - running if self.scheduler else set()
        return EngineStats(
            running=len(running),
            waiting=len(waiting),
            pages_used=blocks.pages_used if blocks else [],
            pages_total=[blocks.num_pages] * blocks.sp if blocks else [],
            rejected=self._rejected,
            weight_version=self.weight_version,
            healthy=self._dead is None and self.executor is not None,
            steps=self._steps.steps,
            step_seconds=self._steps.seconds,
            decode_tokens=self._steps.decode_tokens,
            prefill_tokens=self._steps.prefill_tokens,
        )
