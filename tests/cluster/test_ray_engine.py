"""The engine on Ray shard actors (CPU, gloo over loopback): tensor parallel, sequence sharded
(context parallel) and both, against the single-process model; failures of a shard actor."""

from __future__ import annotations

import asyncio
import time

import pytest
import ray
import torch

from msa.cluster.block_manager import BlockManager
from msa.cluster.engine import EngineConfig, MSAEngine
from msa.cluster.protocol import EngineDeadError, EngineError, WeightUpdateError
from msa.cluster.scheduler import Scheduler
from msa.cluster.sequence import Sequence
from msa.cluster.weights import pack_buckets
from msa.model import cache_free_batch
from msa.platform.checkpoint import save_checkpoint
from tests.cluster.conftest import (
    collect,
    full_logprobs,
    greedy,
    greedy_reference,
    prompt,
    tiny_model,
    tokens_of,
)

LENGTHS = [2, 13, 42, 61]  # 4-token blocks, top-4: from dense (<= 4 blocks) to really sparse


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def engine_config(tp: int, sp: int, **kw) -> EngineConfig:
    base = dict(model="tiny", tp=tp, sp=sp, device="cpu", dtype="float32", num_pages=64, max_num_seqs=8,
                max_num_batched_tokens=32, seed=0)
    return EngineConfig(**{**base, **kw})


async def sharded_step_logits(engine: MSAEngine, prompts: list[list[int]], decode_steps: int) -> list[list]:
    """Drive the engine's executor directly with a scheduler of its own (chunked prefill of 16
    tokens a step, then greedy decodes) asking for full logits; returns per prompt the logits of
    every sampled row with the tokens before it."""
    blocks = BlockManager(engine.scheduler.block_manager.num_pages, engine.config.sp, engine.block_size)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=16)
    seqs = [Sequence(f"x{i}", 0, p, greedy(decode_steps), 0, engine.config.sp) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    by_id = {s.seq_id: s for s in seqs}
    seen: list[list] = [[] for _ in prompts]
    while any(s.num_output_tokens < decode_steps for s in seqs):
        plan = scheduler.schedule()
        plan.return_logits = True
        result = await engine.executor.execute(plan)
        for i, sample in enumerate(plan.samples):
            seq = by_id[plan.seq_ids[sample.row]]
            seen[seqs.index(seq)].append((list(seq.token_ids), result.logits[i]))
        scheduler.postprocess(plan, by_id, result.token_ids)
        for seq in seqs:
            if seq.num_output_tokens >= decode_steps and not seq.is_finished:
                scheduler.remove(seq)
    return seen


@pytest.mark.parametrize("tp,sp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "sp2", "tp2xsp2"])
def test_sharded_engine_matches_single_process(tp, sp, reference):
    prompts = [prompt(n, i) for i, n in enumerate(LENGTHS)]

    async def main():
        engine = MSAEngine(engine_config(tp, sp))
        await engine.start()
        try:
            outs = await asyncio.gather(*[collect(engine, f"r{i}", p, greedy(6, logprobs=2))
                                          for i, p in enumerate(prompts)])
            logits = await sharded_step_logits(engine, prompts, decode_steps=2)
            return outs, logits, engine.stats()
        finally:
            await engine.shutdown()

    outs, logits, stats = asyncio.run(main())
    for p, out in zip(prompts, outs, strict=True):
        got = tokens_of(out[0])
        assert got == greedy_reference(reference, p, 6)
        want = full_logprobs(reference, p + got)[len(p) - 1:-1]
        chosen = torch.tensor([lp for o in out[0] for lp in o.logprobs])
        torch.testing.assert_close(chosen, want[torch.arange(6), torch.tensor(got)], rtol=0, atol=1e-4)
    # Logits of every sampled row (after chunked prefill and each decode), fp32: same math with the
    # sums regrouped across ranks, so agreement to 1e-4 absolute on logits of magnitude ~1.
    for rows in logits:
        assert len(rows) == 2
        for tokens, got in rows:
            with torch.no_grad():
                want = reference(torch.tensor(tokens), cache_free_batch([len(tokens)], 4))[-1]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    assert stats.pages_used == [0] * sp and len(stats.pages_total) == sp


def test_tensor_parallel_ranks_load_their_checkpoint_slices_and_match_single_process(tmp_path, reference):
    save_checkpoint(reference, tmp_path, reference.config, max_shard_bytes=64 << 10, layout="vl")
    ids = prompt(45, 7)

    async def main():
        engine = MSAEngine(engine_config(2, 1, model=str(tmp_path)))
        await engine.start()
        try:
            return await collect(engine, "ckpt", ids, greedy(6, logprobs=0))
        finally:
            await engine.shutdown()

    out = asyncio.run(main())[0]
    got = tokens_of(out)
    assert got == greedy_reference(reference, ids, 6)
    want = full_logprobs(reference, ids + got)[len(ids) - 1 : -1]
    chosen = torch.tensor([lp for o in out for lp in o.logprobs])
    torch.testing.assert_close(chosen, want[torch.arange(6), torch.tensor(got)], rtol=0, atol=1e-4)


def test_sequence_sharded_engine_under_page_pressure_completes_everything(reference):
    lengths = [5 + 2 * i for i in range(8)]

    async def main():
        # 6 pages per shard x 2 shards x 4 tokens = 48 tokens: far less than 8 requests need at once.
        engine = MSAEngine(engine_config(1, 2, num_pages=6, max_num_seqs=8, max_num_batched_tokens=24))
        await engine.start()
        try:
            shared = collect(engine, "n3", prompt(21, 99), greedy(6, n=3))  # choices share prompt pages
            *outs, choices = await asyncio.gather(*[collect(engine, f"c{i}", prompt(n, i), greedy(6))
                                                    for i, n in enumerate(lengths)], shared)
            assert engine.scheduler.num_shared_tokens >= 2 * 20
            want = greedy_reference(reference, prompt(21, 99), 6)
            assert [tokens_of(choices[i]) for i in range(3)] == [want] * 3
            return outs, engine.scheduler.num_preemptions, engine.stats()
        finally:
            await engine.shutdown()

    outs, preemptions, stats = asyncio.run(main())
    assert preemptions > 0
    for i, (n, out) in enumerate(zip(lengths, outs, strict=True)):
        assert tokens_of(out[0]) == greedy_reference(reference, prompt(n, i), 6)
    assert stats.pages_used == [0, 0]


def test_tensor_parallel_weight_update_slices_per_rank_and_rejects_corruption():
    other = tiny_model(seed=1)
    ids = prompt(47, 5)

    async def main():
        engine = MSAEngine(engine_config(2, 1, weight_bucket_bytes=48 << 10))
        await engine.start()
        try:
            await engine.update_weights(other.state_dict().items(), version=7)
            after = await collect(engine, "after", ids, greedy(5, logprobs=0))
            buckets = list(pack_buckets(tiny_model(seed=2).state_dict().items(), 8, bucket_bytes=48 << 10))
            buckets[2].payload = buckets[2].payload.copy()
            buckets[2].payload[-1] ^= 0x01
            with pytest.raises(WeightUpdateError, match="bucket 2 "):
                await engine.load_weight_buckets(buckets, 8)
            still = await collect(engine, "still", ids, greedy(5))
            return after, still, engine.stats()
        finally:
            await engine.shutdown()

    after, still, stats = asyncio.run(main())
    got = tokens_of(after[0])
    assert got == greedy_reference(other, ids, 5) == tokens_of(still[0])
    want = full_logprobs(other, ids + got)[len(ids) - 1:-1]
    chosen = torch.tensor([lp for o in after[0] for lp in o.logprobs])
    torch.testing.assert_close(chosen, want[torch.arange(5), torch.tensor(got)], rtol=0, atol=1e-4)
    assert {o.weight_version for o in after[0]} == {7} and stats.weight_version == 7 and stats.healthy


def test_killing_a_shard_fails_in_flight_requests_and_health_within_bounds():
    async def main():
        engine = MSAEngine(engine_config(2, 1, step_timeout_s=20, health_timeout_s=5))
        await engine.start()
        try:
            await engine.check_health()
            streams = [engine.generate(f"k{i}", prompt(30, i), greedy(200)) for i in range(3)]
            firsts = await asyncio.gather(*[s.__anext__() for s in streams])
            assert all(f.token_ids for f in firsts)
            ray.kill(engine.executor.shards[1], no_restart=True)
            start = time.monotonic()

            async def drain(stream):
                async for _ in stream:
                    pass

            drained = asyncio.gather(*[drain(s) for s in streams], return_exceptions=True)
            results = await asyncio.wait_for(drained, timeout=30)
            elapsed = time.monotonic() - start
            assert all(isinstance(r, EngineDeadError) for r in results), results
            with pytest.raises(EngineDeadError):
                await engine.check_health()
            with pytest.raises(EngineDeadError):
                await collect(engine, "late", prompt(5), greedy(2))
            return elapsed, engine.stats()
        finally:
            await engine.shutdown()

    elapsed, stats = asyncio.run(main())
    assert elapsed < 30 and not stats.healthy


async def kill_and_wait(actor, timeout_s: float = 10.0) -> None:
    """``ray.kill`` returns before the actor is gone; wait until a call to it fails."""
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            await actor.__ray_ready__.remote()
        except ray.exceptions.RayActorError:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the actor still answers {timeout_s} s after ray.kill")


def test_health_check_of_an_idle_engine_notices_a_dead_shard():
    async def main():
        engine = MSAEngine(engine_config(1, 2, health_timeout_s=5))
        await engine.start()
        try:
            await engine.check_health()
            await kill_and_wait(engine.executor.shards[0])
            start = time.monotonic()
            with pytest.raises(EngineDeadError):
                await engine.check_health()
            return time.monotonic() - start, engine.stats()
        finally:
            await engine.shutdown()

    elapsed, stats = asyncio.run(main())
    assert elapsed < 10 and not stats.healthy


def test_a_replica_that_cannot_be_placed_fails_start_instead_of_hanging():
    async def main():
        engine = MSAEngine(engine_config(1, 5, start_timeout_s=3))  # 5 CPU bundles on a 4-CPU cluster
        start = time.monotonic()
        with pytest.raises(EngineError, match="could not place 5 bundles"):
            await engine.start()
        return time.monotonic() - start

    assert asyncio.run(main()) < 10
    assert ray.available_resources().get("CPU", 0) == 4  # the placement group was removed
