"""MSAEngine with the in-process executor (tp = sp = 1) against single-process generation."""

from __future__ import annotations

import asyncio
import sys

import pytest
import torch

from msa.cluster.engine import EngineConfig, MSAEngine
from msa.cluster.protocol import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestTooLongError,
    SamplingParams,
    TokenOutput,
    WeightUpdateError,
    coalesce,
)
from msa.cluster.weights import pack_buckets
from msa.model import PagedKVCache, cache_free_batch
from msa.platform.config import ConfigError, tiny
from tests.cluster.conftest import (
    collect,
    full_logprobs,
    greedy,
    greedy_reference,
    prompt,
    reuse_a_finished_id,
    tiny_model,
    tokens_of,
    until_finished,
)

LENGTHS = [3, 17, 41, 58]  # 4-token blocks, top-4: the longer prompts select sparsely


def engine_config(**kw) -> EngineConfig:
    base = dict(model="tiny", device="cpu", dtype="float32", num_pages=128, max_num_seqs=8,
                max_num_batched_tokens=32, seed=0)
    return EngineConfig(**{**base, **kw})


async def started(**kw) -> MSAEngine:
    engine = MSAEngine(engine_config(**kw))
    await engine.start()
    return engine


def test_batch_of_mixed_lengths_matches_single_process_greedy_and_logprobs(reference):
    async def main():
        engine = await started()
        try:
            params = greedy(10, logprobs=3)
            return await asyncio.gather(*[collect(engine, f"r{i}", prompt(n, i), params)
                                          for i, n in enumerate(LENGTHS)])
        finally:
            await engine.shutdown()

    results = asyncio.run(main())
    for i, (n, outs) in enumerate(zip(LENGTHS, results, strict=True)):
        ids = prompt(n, i)
        got = tokens_of(outs[0])
        assert got == greedy_reference(reference, ids, 10)
        want = full_logprobs(reference, ids + got)[n - 1:-1]  # fp32: same math, reordered sums
        chosen = torch.tensor([lp for o in outs[0] for lp in o.logprobs])
        torch.testing.assert_close(chosen, want[torch.arange(10), torch.tensor(got)], rtol=0, atol=1e-4)
        top = outs[0][0].top_logprobs[0]
        assert list(top) == torch.topk(want[0], 3).indices.tolist()
        assert outs[0][-1].finish_reason == "length"


def test_sixteen_concurrent_requests_complete_and_free_every_page():
    async def main():
        engine = await started(num_pages=96, max_num_seqs=6, max_num_batched_tokens=24)
        try:
            params = [greedy(4 + i % 5) for i in range(16)]
            results = await asyncio.gather(*[collect(engine, f"q{i}", prompt(5 + 3 * i, i), params[i])
                                             for i in range(16)])
            return results, params, engine.stats(), engine.scheduler.num_preemptions
        finally:
            await engine.shutdown()

    results, params, stats, preemptions = asyncio.run(main())
    for outs, p in zip(results, params, strict=True):
        assert len(tokens_of(outs[0])) == p.max_tokens and outs[0][-1].finish_reason == "length"
    assert stats.pages_used == [0] and stats.running == 0 and stats.waiting == 0
    # Step counters: every prompt token prefilled once, every token after a request's first decoded.
    assert preemptions == 0
    assert stats.prefill_tokens == sum(5 + 3 * i for i in range(16))
    assert stats.decode_tokens == sum(p.max_tokens - 1 for p in params)
    longest = max(p.max_tokens for p in params)
    assert longest <= stats.steps <= stats.prefill_tokens + stats.decode_tokens and stats.step_seconds > 0


def test_preemption_with_few_pages_keeps_greedy_tokens(reference):
    lengths = [30, 22, 35, 18, 27]

    async def main():
        # 24 pages = 96 tokens: every request fits alone, but not all at once.
        engine = await started(num_pages=24, max_num_seqs=5, max_num_batched_tokens=40)
        try:
            results = await asyncio.gather(*[collect(engine, f"p{i}", prompt(n, i), greedy(12))
                                             for i, n in enumerate(lengths)])
            return results, engine.scheduler.num_preemptions, engine.stats()
        finally:
            await engine.shutdown()

    results, preemptions, stats = asyncio.run(main())
    assert preemptions > 0
    for i, (n, outs) in enumerate(zip(lengths, results, strict=True)):
        assert tokens_of(outs[0]) == greedy_reference(reference, prompt(n, i), 12)
    assert stats.pages_used == [0]


def test_abort_and_cancellation_free_pages():
    async def main():
        engine = await started()
        try:
            seen = []
            async for out in engine.generate("a", prompt(20), greedy(200)):
                seen.append(out)
                if len(seen) == 2:
                    assert engine.stats().pages_used[0] > 0
                    await engine.abort("a")
            assert seen[-1].finish_reason == "abort" and len(seen) == 3
            assert engine.stats().pages_used == [0]
            stream = engine.generate("b", prompt(20), greedy(200))
            await stream.__anext__()
            await stream.aclose()  # the client went away
            assert engine.stats().pages_used == [0] and engine.stats().running == 0
            again = await collect(engine, "a", prompt(9), greedy(3))  # the id is free again
            assert len(tokens_of(again[0])) == 3
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_requests_that_can_never_fit_are_refused_with_the_limit():
    async def main():
        engine = await started(num_pages=10)  # 10 pages x 4 tokens
        try:
            assert engine.max_context_length == 40
            with pytest.raises(RequestTooLongError) as too_long:
                await collect(engine, "long", prompt(30), greedy(11))
            assert too_long.value.limit == 40 and "40" in str(too_long.value)
            with pytest.raises(RequestTooLongError) as beyond_both:  # the KV pages are the tighter limit
                await collect(engine, "huge", prompt(30), greedy(5000))
            assert beyond_both.value.limit == 40 and "KV pages" in str(beyond_both.value)
            fits = await collect(engine, "ok", prompt(30), greedy(10))
            assert len(tokens_of(fits[0])) == 10
        finally:
            await engine.shutdown()
        engine = await started(num_pages=2000)
        try:
            with pytest.raises(RequestTooLongError) as beyond:
                await collect(engine, "rope", prompt(4000), greedy(100))
            assert beyond.value.limit == 4096 and "max_position_embeddings" in str(beyond.value)
            with pytest.raises(InvalidRequestError, match="vocabulary"):
                await collect(engine, "bad", [1, 2, 999], greedy(1))
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_full_waiting_queue_raises_overloaded():
    async def main():
        engine = await started(max_waiting=3, max_num_seqs=1, max_num_batched_tokens=8)
        try:
            streams = [engine.generate(f"w{i}", prompt(6, i), greedy(3)) for i in range(3)]
            tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
            await asyncio.sleep(0)
            with pytest.raises(EngineOverloadedError):
                await collect(engine, "one-too-many", prompt(6), greedy(3))
            assert engine.stats().rejected == 1
            await asyncio.gather(*tasks)
            for s in streams:
                async for _ in s:
                    pass
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_stop_ids_stop_strings_and_seeded_choices(reference):
    ids = prompt(13, 3)
    free_run = greedy_reference(reference, ids, 12)

    async def main():
        engine = await started()
        try:
            by_id = await collect(engine, "ids", ids, greedy(12, stop_token_ids=[free_run[4]]))
            text = engine.tokenizer.decode(free_run)
            stop = text[5:7]
            by_text = await collect(engine, "text", ids, greedy(12, stop=[stop]))
            by_one_string = await collect(engine, "one", ids, greedy(12, stop=stop))  # as vLLM: [stop]
            sampled = SamplingParams(max_tokens=8, temperature=1.0, seed=7, n=3, ignore_eos=True)
            first = await collect(engine, "s1", ids, sampled)
            second = await collect(engine, "s2", ids, sampled)
            return by_id, text, stop, by_text, by_one_string, first, second
        finally:
            await engine.shutdown()

    by_id, text, stop, by_text, by_one_string, first, second = asyncio.run(main())
    stop_at = free_run.index(free_run[4])
    assert tokens_of(by_id[0]) == free_run[:stop_at + 1] and by_id[0][-1].finish_reason == "stop"
    streamed = "".join(o.text for o in by_text[0])
    assert streamed == text[:text.index(stop)] and by_text[0][-1].finish_reason == "stop"
    assert "".join(o.text for o in by_one_string[0]) == streamed
    assert tokens_of(by_one_string[0]) == tokens_of(by_text[0])
    assert sorted(first) == [0, 1, 2]
    assert [tokens_of(first[i]) for i in range(3)] == [tokens_of(second[i]) for i in range(3)]
    assert len({tuple(tokens_of(first[i])) for i in range(3)}) > 1


def test_update_weights_switches_to_the_new_model_and_rejects_a_corrupt_bucket():
    other = tiny_model(seed=1)
    ids = prompt(45, 2)

    async def main():
        engine = await started()
        try:
            before = await collect(engine, "before", ids, greedy(6, logprobs=0))
            await engine.update_weights(other.state_dict().items(), version=3)
            after = await collect(engine, "after", ids, greedy(6, logprobs=0))
            buckets = list(pack_buckets(tiny_model(seed=2).state_dict().items(), 4, bucket_bytes=64 << 10))
            assert len(buckets) > 2
            buckets[1].payload = buckets[1].payload.copy()
            buckets[1].payload[17] ^= 0xFF
            with pytest.raises(WeightUpdateError, match="bucket 1 "):
                await engine.load_weight_buckets(buckets, 4)
            still = await collect(engine, "still", ids, greedy(6, logprobs=0))
            return before, after, still, engine.stats()
        finally:
            await engine.shutdown()

    before, after, still, stats = asyncio.run(main())
    got = tokens_of(after[0])
    assert got == greedy_reference(other, ids, 6) and got != tokens_of(before[0])
    want = full_logprobs(other, ids + got)[len(ids) - 1:-1]
    chosen = torch.tensor([lp for o in after[0] for lp in o.logprobs])
    torch.testing.assert_close(chosen, want[torch.arange(6), torch.tensor(got)], rtol=0, atol=1e-4)
    assert {o.weight_version for o in before[0]} == {0} and {o.weight_version for o in after[0]} == {3}
    assert tokens_of(still[0]) == got and stats.weight_version == 3


def test_cpu_cache_is_sized_from_a_memory_budget_and_bad_configs_name_the_field():
    per_page = PagedKVCache.bytes_per_page(tiny(), dtype=torch.float32, num_mtp=0)

    async def main():
        engine = await started(num_pages=None, kv_cache_memory_bytes=50 * per_page + per_page // 2)
        try:
            return engine.stats(), engine.max_context_length
        finally:
            await engine.shutdown()

    stats, limit = asyncio.run(main())
    assert stats.pages_total == [50] and limit == 50 * 4
    with pytest.raises(ConfigError, match="num_pages"):
        EngineConfig(model="tiny", device="cpu")
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        engine_config(max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        MSAEngine(engine_config(tp=4))
    with pytest.raises(ConfigError, match=r"'/no/such/ckpt' is neither .* no such path on this host"):
        MSAEngine(engine_config(model="/no/such/ckpt"))
    with pytest.raises(ConfigError, match="cuda_graph_max_tokens"):
        engine_config(cuda_graph_max_tokens=-1)
    # None: 512 tokens, within the step budget and at least the batch.
    assert engine_config().graph_tokens == 32 and engine_config(cuda_graph_max_tokens=0).graph_tokens == 0
    assert engine_config(max_num_batched_tokens=4096).graph_tokens == 512
    assert engine_config(max_num_seqs=1024, max_num_batched_tokens=4096).graph_tokens == 1024


def test_choices_of_one_request_share_the_prompt_and_each_match_greedy(reference):
    ids = prompt(41, 9)

    async def main():
        engine = await started()
        try:
            outs = await collect(engine, "n4", ids, greedy(5, n=4))
            return outs, engine.scheduler.num_shared_tokens, engine.stats()
        finally:
            await engine.shutdown()

    outs, shared, stats = asyncio.run(main())
    want = greedy_reference(reference, ids, 5)
    assert sorted(outs) == [0, 1, 2, 3] and all(tokens_of(outs[i]) == want for i in range(4))
    assert shared == 3 * 40 and stats.pages_used == [0]


def test_requests_after_shutdown_fail_at_once():
    async def main():
        engine = await started()
        await engine.shutdown()
        with pytest.raises(EngineDeadError, match="shut down"):
            await asyncio.wait_for(collect(engine, "late", prompt(5, 0), greedy(3)), timeout=5)
        assert not engine.stats().healthy

    asyncio.run(main())


def test_a_reader_behind_the_engine_gets_the_same_tokens_in_fewer_outputs(reference):
    """Outputs queued while the reader is busy reach it merged (one per choice and run of steps),
    with the same tokens, logprobs, top logprobs and text as a reader that keeps up."""
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2, logprobs=2)

    async def main():
        engine = await started()
        try:
            fast = await collect(engine, "fast", prompt(17, 0), params)
            slow: dict[int, list] = {}
            async for out in engine.generate("slow", prompt(17, 0), params):
                slow.setdefault(out.index, []).append(out)
                await asyncio.sleep(0.05)  # several engine steps pass before the next read
            return fast, slow
        finally:
            await engine.shutdown()

    fast, slow = asyncio.run(main())
    for index in (0, 1):
        assert len(fast[index]) == 12
        assert len(slow[index]) < len(fast[index])
        assert any(len(o.token_ids) > 1 for o in slow[index])
        for field in ("token_ids", "logprobs", "top_logprobs"):
            assert [x for o in slow[index] for x in getattr(o, field)] == [
                x for o in fast[index] for x in getattr(o, field)
            ]
        assert "".join(o.text for o in slow[index]) == "".join(o.text for o in fast[index])
        assert [o.finish_reason for o in slow[index]][-1] == "length"
        assert all(o.finish_reason is None for o in slow[index][:-1])


def test_add_request_hands_each_step_output_to_its_sink():
    """A sink gets one output per step and choice, the same as generate's stream; a refused
    request raises at once; an abort reaches the sink; a finished request's id is free again."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, n=2, logprobs=1)

    async def main():
        engine = await started()
        try:
            streamed = await collect(engine, "streamed", prompt(17, 0), params)
            got: list = []
            done = asyncio.Event()

            def sink(item):
                got.append(item)
                if sum(o.finish_reason is not None for o in got) == params.n:
                    done.set()

            engine.add_request("sunk", prompt(17, 0), params, sink)
            await asyncio.wait_for(done.wait(), timeout=30)
            with pytest.raises(InvalidRequestError):
                engine.add_request("empty", [], params, sink)
            aborted: list = []
            engine.add_request("sunk", prompt(17, 0), greedy(60), aborted.append)  # the id is free
            while not aborted:
                await asyncio.sleep(0.01)
            await engine.abort("sunk")
            return streamed, got, aborted, engine.stats()
        finally:
            await engine.shutdown()

    streamed, got, aborted, stats = asyncio.run(main())
    for index in (0, 1):
        mine = [o for o in got if o.index == index]
        assert len(mine) == params.max_tokens  # nothing merged: one output per step
        assert [t for o in mine for t in o.token_ids] == [t for o in streamed[index] for t in o.token_ids]
    assert aborted[-1].finish_reason == "abort" and stats.running == 0 and stats.pages_used == [0]


def test_coalesce_merges_each_choice_within_one_weight_version():
    def out(index, token, version=0, finish=None):
        return TokenOutput(request_id="r", index=index, token_ids=[token], logprobs=[-float(token)],
                           top_logprobs=None, text=f"<{token}>", finish_reason=finish,
                           num_prompt_tokens=3, weight_version=version)

    merged = coalesce([out(0, 1), out(0, 2), out(1, 3), out(0, 4), out(0, 5, version=1),
                       out(0, 6, version=1, finish="length"), out(1, 7, finish="stop")])
    assert [(o.index, o.token_ids, o.weight_version, o.finish_reason) for o in merged] == [
        (0, [1, 2, 4], 0, None), (1, [3, 7], 0, "stop"), (0, [5, 6], 1, "length"),
    ]
    assert merged[0].logprobs == [-1.0, -2.0, -4.0] and merged[0].text == "<1><2><4>"
    # Each folded step keeps its own tokens and text, in order.
    assert list(merged[0].steps()) == [([1], "<1>"), ([2], "<2>"), ([4], "<4>")]
    assert list(merged[2].steps()) == [([5], "<5>"), ([6], "<6>")]
    assert list(out(0, 8).steps()) == [([8], "<8>")]
    # Folding outputs that were already folded keeps every step.
    twice = coalesce([coalesce([out(0, 1), out(0, 2)])[0], coalesce([out(0, 3), out(0, 4)])[0]])
    assert list(twice[0].steps()) == [([1], "<1>"), ([2], "<2>"), ([3], "<3>"), ([4], "<4>")]
    assert coalesce([]) == []


def test_an_in_process_shard_shortens_the_gil_switch_interval_and_never_lengthens_it():
    """The step thread holds the GIL while it launches work; the event loop must get it back
    within GIL_SWITCH_INTERVAL_S, not Python's default 5 ms."""
    from msa.cluster.executor import GIL_SWITCH_INTERVAL_S, LocalExecutor

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        LocalExecutor(engine_config())
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_S, rel=0.05)
        sys.setswitchinterval(0.0001)
        LocalExecutor(engine_config())
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.gpu
def test_gpu_engine_replays_cuda_graphs_and_decodes_the_models_greedy_tokens():
    """bf16 on one GPU: the shard captures its pieces, and every token a batch of requests
    generates through them is the bf16 model's own argmax for that context (within bf16 rounding
    of the top logit), checked by a cache-free forward of the whole sequence."""

    async def main():
        engine = await started(device="cuda", dtype="bfloat16", cuda_graph_max_tokens=16)
        try:
            pieces = engine.executor.shard._pieces
            assert pieces is not None and pieces.captured and pieces.max_tokens == 16
            outs = await asyncio.gather(*[collect(engine, f"g{i}", prompt(n, i), greedy(12))
                                          for i, n in enumerate(LENGTHS)])
            return engine.executor.shard.model, [tokens_of(o[0]) for o in outs]
        finally:
            await engine.shutdown()

    model, generated = asyncio.run(main())
    for i, (n, tokens) in enumerate(zip(LENGTHS, generated, strict=True)):
        ids = prompt(n, i) + tokens
        with torch.no_grad():
            batch = cache_free_batch([len(ids)], 4, device="cuda")
            logits = model(torch.tensor(ids, device="cuda"), batch).float()
        chosen = logits[n - 1 : -1].gather(1, torch.tensor(tokens, device="cuda")[:, None])[:, 0]
        assert bool((logits[n - 1 : -1].amax(1) - chosen <= 0.05).all()), (i, tokens)


@pytest.mark.gpu
def test_gpu_engine_without_cuda_graphs_runs_eagerly():
    async def main():
        engine = await started(device="cuda", dtype="bfloat16", cuda_graph_max_tokens=0)
        try:
            assert engine.executor.shard._pieces is None
            return tokens_of((await collect(engine, "e", prompt(9), greedy(4)))[0])
        finally:
            await engine.shutdown()

    assert len(asyncio.run(main())) == 4


SERVING_SCENARIO = [100, 700, 1900, 2300, 3100, 5000, 37, 260]  # prompt lengths, staggered


async def serve_scenario(engine) -> list:
    """Requests with SERVING_SCENARIO's prompt lengths, each arriving 50 ms after the one before,
    24 greedy tokens each: their outputs."""

    async def one(i, n, delay):
        await asyncio.sleep(delay)
        return await collect(engine, f"w{i}", [5 + i] * n, greedy(24))

    return await asyncio.gather(*[one(i, n, 0.05 * i) for i, n in enumerate(SERVING_SCENARIO)])


def test_warm_up_covers_every_launch_the_engine_makes_while_serving(monkeypatch):
    """The launch decisions of test_gpu_engine_compiles_no_kernel_while_serving, on a CPU: with M3's
    attention shape (small elsewhere) and an H200's 132 SMs, every attention-kernel launch that
    serving staggered prompts of 37-5000 tokens makes (compile-time parameters, warps, stages)
    is one the warm-up made. The kernels are recorded instead of run (their launch parameters
    come from shapes alone); the GPU test compiles them for real."""
    import dataclasses

    from msa.kernels.warmup import warm_up_attention
    from msa.platform.config import m3_proxy
    from tests.kernels.test_warmup import record_launches

    seen, phase = record_launches(monkeypatch, sms=132)
    config = dataclasses.replace(
        m3_proxy(), hidden_size=256, vocab_size=512, intermediate_size=256, moe_intermediate_size=64,
        shared_intermediate_size=64, num_local_experts=2, num_experts_per_tok=1,
    )
    pages, budget = 600, 2048
    k = torch.zeros(pages, 128, 4, 128, dtype=torch.bfloat16)
    ik = torch.zeros(pages, 128, 128, dtype=torch.bfloat16)
    warm_up_attention(
        k, k, ik, num_heads=64, index_heads=4, topk=16, max_seqs=8, max_blocks=pages, step_tokens=budget
    )
    phase[0] = "serving"

    async def main():
        engine = await started(model=config, dtype="bfloat16", num_pages=pages, max_num_batched_tokens=budget)
        try:
            await serve_scenario(engine)
        finally:
            await engine.shutdown()

    asyncio.run(main())
    served = {key for key, phases in seen.items() if "serving" in phases}
    assert {name for name, _ in served} >= {"_block_major_kernel", "_merge_states_kernel", "_decode_kernel"}
    assert not {key for key in served if "warm-up" not in seen[key]}


@pytest.mark.gpu
def test_gpu_engine_compiles_no_kernel_while_serving():
    """MiniMax-M3's attention shape (m3_proxy) on one GPU: after start (which warms the attention
    kernels up), requests that arrive one after another, with prompts from 100 to 5000 tokens
    (chunked prefill over a 2048-token step budget, sparse selection past 2048 tokens) and decodes
    at changing batch sizes, run without compiling a single Triton kernel."""
    from tests.kernels.test_warmup import compiled_specializations

    async def main():
        engine = await started(
            model="m3_proxy",
            device="cuda",
            dtype="bfloat16",
            random_init="device",
            max_num_seqs=8,
            max_num_batched_tokens=2048,
            num_pages=600,
        )
        try:
            before = compiled_specializations()
            outs = await serve_scenario(engine)
            return before, compiled_specializations(), outs
        finally:
            await engine.shutdown()

    before, after, outs = asyncio.run(main())
    assert all(len(tokens_of(o[0])) == 24 for o in outs)
    assert after == before


def test_a_finished_request_id_is_free_while_its_old_stream_is_still_open(reference):
    """Closing (or garbage-collecting) the stream of a finished request leaves a newer request with the same
    id alone; an id still in flight is refused."""

    async def main():
        engine = await started()
        try:
            first, rest = await reuse_a_finished_id(engine)
            # The same pattern with the old stream left to the garbage collector.
            again = [await asyncio.wait_for(until_finished(engine, "job", prompt(7, 2), greedy(4)), 30)
                     for _ in range(2)]
            return first, rest, again, engine.stats()
        finally:
            await engine.shutdown()

    first, rest, again, stats = asyncio.run(main())
    assert first.token_ids + tokens_of(rest) == greedy_reference(reference, prompt(6, 1), 20)
    assert rest[-1].finish_reason == "length"
    assert again[0] == again[1] == greedy_reference(reference, prompt(7, 2), 4)
    assert stats.running == 0 and stats.pages_used == [0]


BAD_PARAMS = [  # one malformed field each
    dict(seed="abc"), dict(seed=1.5), dict(seed=-1), dict(seed=2**63), dict(seed=True),
    dict(temperature=None), dict(temperature=True), dict(top_p="x"), dict(top_p=float("nan")),
    dict(stop_token_ids=[[1]]), dict(stop_token_ids="ab"), dict(stop_token_ids=[-1]),
    dict(max_tokens=True), dict(n=2.0), dict(logprobs="3"), dict(ignore_eos="no"), dict(top_k=None),
    dict(allowed_token_ids=[]), dict(allowed_token_ids=[-1]), dict(allowed_token_ids="ab"),
]


def test_allowed_token_ids_restrict_every_token_to_them(reference):
    """Greedy: each token is the best of the allowed ones under the reference model's own
    distribution (whose logprob is reported); sampled: every token is one of them."""
    allowed = [3, 50, 97, 200]

    async def main():
        engine = await started()
        try:
            restricted = greedy(6, allowed_token_ids=allowed, logprobs=0)
            greedy_outs = await collect(engine, "g", prompt(9), restricted)
            sampled = SamplingParams(max_tokens=12, seed=5, ignore_eos=True, allowed_token_ids=allowed)
            sampled_outs = await collect(engine, "s", prompt(9, 1), sampled)
            with pytest.raises(InvalidRequestError, match=r"allowed_token_ids holds 999, outside the vocab"):
                await collect(engine, "bad", prompt(3), greedy(1, allowed_token_ids=[1, 999]))
            return greedy_outs[0], tokens_of(sampled_outs[0])
        finally:
            await engine.shutdown()

    outs, sampled = asyncio.run(main())
    ids, tokens = prompt(9), tokens_of(outs)
    logprobs = [lp for out in outs for lp in out.logprobs]
    for i, token in enumerate(tokens):
        step = full_logprobs(reference, ids + tokens[:i])[-1]
        assert token == allowed[int(torch.argmax(step[allowed]))]
        assert logprobs[i] == pytest.approx(float(step[token]), abs=1e-4)
    assert len(sampled) == 12 and set(sampled) <= set(allowed)


def test_malformed_sampling_params_name_the_field_and_leave_the_engine_serving(reference):
    """A malformed field is refused when the params are built, and again by the engine for params
    changed after that; a request running meanwhile finishes."""

    async def main():
        engine = await started()
        try:
            running = asyncio.ensure_future(collect(engine, "good", prompt(5), greedy(30)))
            await asyncio.sleep(0.05)
            refused = []
            for kwargs in BAD_PARAMS:
                (field,) = kwargs
                with pytest.raises(InvalidRequestError, match=f"'{field}'") as built:
                    SamplingParams(**kwargs)
                refused.append(str(built.value))
            changed = SamplingParams(max_tokens=3, seed=7)
            changed.seed = "abc"
            with pytest.raises(InvalidRequestError, match="'seed'"):
                await collect(engine, "changed", prompt(5, 1), changed)
            largest_seed = SamplingParams(max_tokens=3, seed=2**63 - 1, ignore_eos=True)
            served = await collect(engine, "after", prompt(5, 1), largest_seed)
            return refused, await running, served, engine.stats()
        finally:
            await engine.shutdown()

    refused, good, served, stats = asyncio.run(main())
    assert len(refused) == len(BAD_PARAMS)
    assert tokens_of(good[0]) == greedy_reference(reference, prompt(5), 30)
    assert len(tokens_of(served[0])) == 3 and stats.healthy


def test_update_weights_cancelled_during_the_commit_still_switches_version_and_weights(reference):
    """The shard's copy cannot be stopped: a caller cancelled while it runs returns once it is done,
    and the engine's version names the weights its steps run on."""
    import threading
    import time

    other = tiny_model(seed=1)
    ids = prompt(45, 2)

    async def main():
        engine = await started()
        try:
            shard = engine.executor.shard
            commit, entered = shard.commit_weights, threading.Event()

            def slow_commit(version):
                entered.set()
                time.sleep(0.3)  # a big model's copy takes this long; the caller is cancelled meanwhile
                return commit(version)

            shard.commit_weights = slow_commit
            update = asyncio.ensure_future(engine.update_weights(other.state_dict().items(), version=5))
            while not entered.is_set():
                await asyncio.sleep(0.005)
            update.cancel()
            with pytest.raises(asyncio.CancelledError):
                await update
            versions = engine.weight_version, shard.weight_version
            after = await collect(engine, "after", ids, greedy(6))
            return versions, after
        finally:
            await engine.shutdown()

    versions, after = asyncio.run(main())
    assert versions == (5, 5)
    assert {o.weight_version for o in after[0]} == {5}
    assert tokens_of(after[0]) == greedy_reference(other, ids, 6) != greedy_reference(reference, ids, 6)


def test_a_temperature_too_small_to_divide_by_decodes_greedily(reference):
    ids = prompt(21, 4)

    async def main():
        engine = await started()
        try:
            runs = {}
            for temperature, top_p in [(0.0, 1.0), (1e-39, 1.0), (1e-39, 0.9), (1e-6, 1.0)]:
                params = SamplingParams(max_tokens=8, temperature=temperature, top_p=top_p, seed=3,
                                        ignore_eos=True)
                runs[temperature, top_p] = tokens_of((await collect(engine, "t", ids, params))[0])
            return runs
        finally:
            await engine.shutdown()

    runs = asyncio.run(main())
    assert runs[0.0, 1.0] == greedy_reference(reference, ids, 8)
    assert all(tokens == runs[0.0, 1.0] for tokens in runs.values())


def test_more_choices_than_the_queue_holds_are_invalid_and_a_full_queue_is_overloaded():
    async def main():
        engine = await started(max_waiting=2)
        try:
            with pytest.raises(InvalidRequestError, match="'n' is 3.*max_waiting=2") as too_many:
                engine.add_request("n3", prompt(5), greedy(2, n=3), lambda out: None)
            outs: list = []
            engine.add_request("w", prompt(5), greedy(3), outs.append)
            with pytest.raises(EngineOverloadedError):  # 1 waiting + 2 > 2, for now
                engine.add_request("n2-early", prompt(5), greedy(2, n=2), lambda out: None)
            while not any(o.finish_reason for o in outs):
                await asyncio.sleep(0.01)
            served = await collect(engine, "n2", prompt(5), greedy(2, n=2))
            return too_many.value, served, engine.stats()
        finally:
            await engine.shutdown()

    too_many, served, stats = asyncio.run(main())
    assert not isinstance(too_many, EngineOverloadedError)
    assert sorted(served) == [0, 1] and all(len(tokens_of(served[i])) == 2 for i in (0, 1))
    assert stats.rejected == 1
