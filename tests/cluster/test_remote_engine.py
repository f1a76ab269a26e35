"""``RemoteEngine``: the engine in its own Ray actor process (real Ray on loopback), against the
same engine run in this process."""

from __future__ import annotations

import asyncio

import pytest
import ray

from msa.cluster.engine import EngineConfig, MSAEngine
from msa.cluster.protocol import EngineDeadError, RequestTooLongError, SamplingParams
from msa.cluster.remote import ENGINE_CORE_CONCURRENCY, EngineCore, RemoteEngine
from tests.cluster.conftest import collect, greedy, greedy_reference, prompt, reuse_a_finished_id, tokens_of


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(**kw) -> EngineConfig:
    base = dict(model="tiny", device="cpu", dtype="float32", num_pages=64, max_num_seqs=8,
                max_num_batched_tokens=32, seed=0)
    return EngineConfig(**{**base, **kw})


PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, n=2, logprobs=2)


async def outputs_of(engine, lengths: list[int]) -> list[dict]:
    requests = [collect(engine, f"r{i}", prompt(n, i), PARAMS) for i, n in enumerate(lengths)]
    return await asyncio.gather(*requests)


def test_remote_engine_streams_what_the_engine_does_in_process():
    lengths = [3, 17, 41]

    async def main():
        local = MSAEngine(config())
        await local.start()
        remote = RemoteEngine(config())
        await remote.start()
        try:
            assert remote.max_context_length == local.max_context_length
            assert remote.tokenizer.eos_token_ids == local.tokenizer.eos_token_ids
            return await outputs_of(local, lengths), await outputs_of(remote, lengths), remote.stats()
        finally:
            await local.shutdown()
            await remote.shutdown()

    local, remote, stats = asyncio.run(main())
    assert stats.healthy and stats.pages_total == [64]
    for got, want in zip(remote, local, strict=True):
        for index in (0, 1):
            assert tokens_of(got[index]) == tokens_of(want[index])
            assert [p for o in got[index] for p in o.logprobs] == pytest.approx(
                [p for o in want[index] for p in o.logprobs], abs=1e-5)
            assert "".join(o.text for o in got[index]) == "".join(o.text for o in want[index])
            assert got[index][-1].finish_reason == "length"


def test_remote_engine_errors_cancellation_and_a_dead_engine_process():
    async def main():
        remote = RemoteEngine(config())
        await remote.start()
        try:
            # A second connection that cannot show the token is closed at its first message.
            reader, writer = await asyncio.open_connection(*remote.address)
            writer.write(b"not the token, and longer")
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()

            # An admission error crosses the process boundary with its fields.
            with pytest.raises(RequestTooLongError) as too_long:
                await collect(remote, "long", prompt(10, 0), SamplingParams(max_tokens=1000))
            assert (too_long.value.prompt_tokens, too_long.value.max_tokens) == (10, 1000)
            assert too_long.value.limit == remote.max_context_length == 256  # 64 pages x 4 tokens

            # A reader that stops early aborts the request and its pages come back.
            stream = remote.generate("early", prompt(9, 1), SamplingParams(max_tokens=200, ignore_eos=True))
            async for _ in stream:
                break
            await stream.aclose()
            for _ in range(100):
                if remote.stats().pages_used == [0] and remote.stats().running == 0:
                    break
                await asyncio.sleep(0.05)
            freed = remote.stats().pages_used

            # Killing the engine process fails the request in flight and marks the engine dead.
            stream = remote.generate("doomed", prompt(9, 2), SamplingParams(max_tokens=200, ignore_eos=True))
            await stream.__anext__()
            ray.kill(remote._actor)
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            with pytest.raises(EngineDeadError):
                await remote.check_health()
            with pytest.raises(EngineDeadError):
                await collect(remote, "after", prompt(3, 0), SamplingParams(max_tokens=2))
            return freed, remote.stats().healthy
        finally:
            await remote.shutdown()

    freed, healthy = asyncio.run(main())
    assert freed == [0]
    assert not healthy


def test_a_lost_connection_aborts_its_requests_in_the_engine_process():
    """The caller's process goes away mid-stream (its connection closes): the engine aborts what
    it was generating for it and frees the pages, and the caller's engine reports itself dead."""

    async def main():
        remote = RemoteEngine(config())
        await remote.start()
        try:
            stream = remote.generate("orphan", prompt(9, 3), SamplingParams(max_tokens=200, ignore_eos=True))
            await stream.__anext__()
            assert (await remote._actor.stats.remote()).running == 1
            remote._conn.close()
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            for _ in range(100):
                stats = await remote._actor.stats.remote()
                if stats.running == 0 and stats.pages_used == [0]:
                    break
                await asyncio.sleep(0.05)
            return stats, remote.stats().healthy
        finally:
            await remote.shutdown()

    stats, healthy = asyncio.run(main())
    assert stats.running == 0 and stats.pages_used == [0] and stats.healthy
    assert not healthy



def test_two_callers_share_one_engine_process():
    """Two API servers' engines attached to one EngineCore actor: each gets its own requests'
    outputs, equal to the engine run in this process; neither can abort the other's request; one
    that goes away has only its own requests aborted; and its shutdown leaves the shared engine up."""
    greedy = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    long = SamplingParams(max_tokens=200, ignore_eos=True)

    async def main():
        local = MSAEngine(config())
        await local.start()
        want = [tokens_of((await collect(local, f"l{i}", prompt(n, i), greedy))[0])
                for i, n in enumerate([5, 23, 11, 40])]
        await local.shutdown()
        actor = ray.remote(EngineCore).options(max_concurrency=ENGINE_CORE_CONCURRENCY).remote(config())
        a, b = RemoteEngine(config(), actor=actor), RemoteEngine(config(), actor=actor)
        await asyncio.gather(a.start(), b.start())
        try:
            # Both callers at once: each stream gets its own request's outputs.
            got = await asyncio.gather(*[collect(engine, f"r{i}", prompt(n, i), greedy) for i, (engine, n)
                                         in enumerate(zip([a, b, a, b], [5, 23, 11, 40], strict=True))])
            # A caller's abort of a request id it does not own reaches nobody's request.
            theirs = a.generate("mine", prompt(9, 1), SamplingParams(max_tokens=12, ignore_eos=True))
            first = await theirs.__anext__()
            await b.abort("mine")
            rest = [out async for out in theirs]
            # a's connection goes: its request in flight is aborted, b's runs on to its end.
            orphan = a.generate("orphan", prompt(9, 2), long)
            await orphan.__anext__()
            survivor = asyncio.ensure_future(collect(b, "survivor", prompt(9, 3), long))
            a._conn.close()
            with pytest.raises(EngineDeadError):
                async for _ in orphan:
                    pass
            survived = await survivor
            await a.shutdown()  # attached: closes its connection, leaves the engine to b
            after = await collect(b, "after", prompt(3, 0), greedy)
            stats = await actor.stats.remote()
            return want, got, first, rest, survived, after, stats
        finally:
            await b.shutdown()
            ray.kill(actor)

    want, got, first, rest, survived, after, stats = asyncio.run(main())
    assert [tokens_of(outs[0]) for outs in got] == want
    assert len(first.token_ids) + sum(len(o.token_ids) for o in rest) == 12
    assert rest[-1].finish_reason == "length"
    assert len(tokens_of(survived[0])) == 200 and survived[0][-1].finish_reason == "length"
    assert len(tokens_of(after[0])) == 6
    assert stats.running == 0 and stats.pages_used == [0] and stats.healthy


def test_a_finished_request_id_is_free_while_its_old_stream_is_still_open(reference):
    """A request's id is free once the engine finished it, whether or not its stream was closed:
    closing the old stream later leaves the newer request alone; an id in flight is refused; an id
    whose stream was closed early is free at once."""

    async def main():
        remote = RemoteEngine(config())
        await remote.start()
        try:
            first, rest = await reuse_a_finished_id(remote)
            early = remote.generate("early", prompt(9, 2), greedy(200))
            await early.__anext__()
            await early.aclose()
            reused = await asyncio.wait_for(collect(remote, "early", prompt(7, 3), greedy(4)), 30)
            return first, rest, reused, await remote._actor.stats.remote()
        finally:
            await remote.shutdown()

    first, rest, reused, stats = asyncio.run(main())
    assert first.token_ids + tokens_of(rest) == greedy_reference(reference, prompt(6, 1), 20)
    assert rest[-1].finish_reason == "length"
    assert tokens_of(reused[0]) == greedy_reference(reference, prompt(7, 3), 4)
    assert stats.running == 0 and stats.pages_used == [0]
