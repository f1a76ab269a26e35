"""Rollouts on a real in-process engine: loss masks over tool tokens, retries and failed groups,
weight versions, and episodes that straddle a weight update."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import torch

from msa.platform.checkpoint import load_model
from msa.rl.chat import ChatTokens
from msa.rl.config import RolloutSection
from msa.rl.data import Prompt
from msa.rl.envs.base import Environment, StepResult
from msa.rl.rollout import RolloutWorker
from tests.rl.conftest import started_engine

TOOL_TEXT = "tool says 42"


class EchoToolEnv(Environment):
    """Answers every turn with a tool result, for three turns; reward = number of turns seen."""

    def __init__(self) -> None:
        self.turns = 0

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": sample["prompt"]}]

    def step(self, text: str) -> StepResult:
        self.turns += 1
        return StepResult(
            observations=[{"role": "tool", "content": TOOL_TEXT}],
            reward=float(self.turns),
            done=self.turns == 3,
        )


def worker_for(engine, make_env, **rollout) -> RolloutWorker:
    section = RolloutSection(**{"group_size": 2, "max_tokens": 4, **rollout})
    return RolloutWorker(engine, ChatTokens(engine.tokenizer), make_env, section, run_seed=0)


def test_tool_observations_are_masked_and_model_tokens_keep_their_logprobs():
    async def main():
        engine = await started_engine()
        try:
            worker = worker_for(engine, EchoToolEnv, max_turns=3)
            return await worker.run_step(0, [Prompt(0, {"prompt": "hello"})]), engine.tokenizer
        finally:
            await engine.shutdown()

    batch, tokenizer = asyncio.run(main())
    for ep in batch.groups[0].episodes:
        assert ep.turns == 3 and ep.reward == 3.0
        assert len(ep.response_ids) == len(ep.loss_mask) == len(ep.logprobs)
        masked = [t for t, m in zip(ep.response_ids, ep.loss_mask, strict=True) if m == 0]
        text = tokenizer.decode(masked, skip_special_tokens=False)
        assert text.count(f"<tool_response>{TOOL_TEXT}</tool_response>") == 2  # after turns 1 and 2
        assert text.count("<|im_start|>assistant\n") == 2
        assert sum(ep.loss_mask) <= 3 * 4  # at most max_tokens per turn are trained
        trained = [lp for lp, m in zip(ep.logprobs, ep.loss_mask, strict=True) if m]
        assert all(lp < 0 for lp in trained)
        assert all(lp == 0.0 for lp, m in zip(ep.logprobs, ep.loss_mask, strict=True) if not m)
        # Spans alternate: model tokens, then glue, with the glue exactly the rendered observation turn.
        spans = [m for i, m in enumerate(ep.loss_mask) if i == 0 or m != ep.loss_mask[i - 1]]
        assert spans == [1, 0, 1, 0, 1]


class FlakyEnv(Environment):
    """Crashes on the first ``fail_first`` resets of each prompt; prompt uid 1 always crashes."""

    lock = threading.Lock()
    resets: dict[int, int] = {}

    def __init__(self, fail_first: int = 1) -> None:
        self.fail_first = fail_first

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        with self.lock:
            count = self.resets[sample["uid"]] = self.resets.get(sample["uid"], 0) + 1
        if sample["uid"] == 1 or count <= self.fail_first:
            raise RuntimeError(f"environment crashed on prompt {sample['uid']}")
        return [{"role": "user", "content": "hi"}]

    def step(self, text: str) -> StepResult:
        return StepResult(reward=1.0)


def test_crashing_episodes_are_retried_then_their_group_fails_and_is_reported():
    FlakyEnv.resets = {}

    async def main():
        engine = await started_engine()
        try:
            worker = worker_for(engine, FlakyEnv, max_retries=2)
            return await worker.run_step(0, [Prompt(u, {"uid": u}) for u in (0, 1)])
        finally:
            await engine.shutdown()

    batch = asyncio.run(main())
    assert [g.uid for g in batch.groups] == [0]
    assert all(ep.reward == 1.0 for ep in batch.groups[0].episodes)
    assert sum(ep.attempts for ep in batch.groups[0].episodes) == 3  # one crash, retried
    assert [g.uid for g in batch.failed] == [1]
    assert "failed 3 times" in batch.failed[0].error and "environment crashed" in batch.failed[0].error
    assert batch.retries >= 3


class HangOnceEnv(Environment):
    """The first reset hangs until released; every later one is immediate."""

    calls = 0
    release = threading.Event()

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        HangOnceEnv.calls += 1
        if HangOnceEnv.calls == 1:
            HangOnceEnv.release.wait(60)
        return [{"role": "user", "content": "hi"}]

    def step(self, text: str) -> StepResult:
        return StepResult(reward=0.5)


def test_an_episode_that_times_out_is_retried():
    HangOnceEnv.calls = 0
    HangOnceEnv.release.clear()

    async def main():
        engine = await started_engine()
        try:
            worker = worker_for(engine, HangOnceEnv, episode_timeout_s=5.0, max_concurrency=1, max_retries=3)
            return await worker.run_step(0, [Prompt(0, {})])
        finally:
            HangOnceEnv.release.set()  # lets the abandoned reset thread finish
            await engine.shutdown()

    batch = asyncio.run(main())
    assert not batch.failed and batch.retries >= 1
    hung = batch.groups[0].episodes[0]
    assert hung.attempts >= 2 and hung.reward == 0.5


def test_episode_spanning_a_weight_update_is_dropped_and_regenerated():
    async def main():
        engine = await started_engine()
        loop = asyncio.get_running_loop()
        model, _ = load_model("tiny", dtype=torch.float32, seed=1, progress=False)
        new_weights = list(model.state_dict().items())

        class UpdateBetweenTurnsEnv(EchoToolEnv):
            updated = False

            def step(self, text: str) -> StepResult:
                # The first episode's first turn ends with the engine moving to version 7.
                if not UpdateBetweenTurnsEnv.updated:
                    UpdateBetweenTurnsEnv.updated = True
                    asyncio.run_coroutine_threadsafe(engine.update_weights(new_weights, 7), loop).result()
                return super().step(text)

        try:
            worker = worker_for(engine, UpdateBetweenTurnsEnv, max_turns=3, group_size=2, max_concurrency=1)
            return await worker.run_step(0, [Prompt(0, {"prompt": "hello"})])
        finally:
            await engine.shutdown()

    batch = asyncio.run(main())
    assert batch.regenerations == 1 and not batch.failed
    episodes = batch.groups[0].episodes
    assert [ep.weight_version for ep in episodes] == [7, 7]
    assert [ep.regenerations for ep in episodes] == [1, 0]


class RecordingEngine:
    """The engine, with the request id and seed of every generate call noted."""

    def __init__(self, engine) -> None:
        self.engine, self.requests = engine, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, request_id, ids, params):
        self.requests.append((request_id, params.seed))
        return self.engine.generate(request_id, ids, params)


def test_a_prompt_twice_in_one_step_makes_two_independent_groups():
    async def main():
        engine = await started_engine()
        try:
            runs = []
            for _ in range(2):
                recording = RecordingEngine(engine)
                worker = worker_for(recording, EchoToolEnv, max_turns=1, max_retries=0)
                prompt = Prompt(5, {"prompt": "hello"})
                runs.append((await worker.run_step(3, [prompt, prompt]), recording.requests))
            return runs
        finally:
            await engine.shutdown()

    (batch, requests), (_, again) = asyncio.run(main())
    assert not batch.failed and [g.uid for g in batch.groups] == [5, 5]
    assert batch.retries == 0
    ids, seeds = [r for r, _ in requests], [s for _, s in requests]
    assert len(requests) == 4 and len(set(ids)) == 4 and len(set(seeds)) == 4
    assert sorted(again) == sorted(requests)  # the same step again draws the same seeds
