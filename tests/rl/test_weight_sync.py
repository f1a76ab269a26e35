"""The trainers -> engine weight group with real Ray actors and real DeepSpeed (gloo on CPU): after a
sync the engine's log-probabilities equal the trainer's (tensor-parallel engine, ZeRO-3 trainers);
a bucket damaged in transit is named and the engine keeps its old version."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import ray

from msa.cluster.engine import MSAEngine
from msa.cluster.protocol import SamplingParams, WeightUpdateError
from msa.rl.batch import TrainSample
from msa.rl.placement import TrainerGroup, runtime_env
from msa.rl.sync import WeightSync
from msa.rl.train import engine_config
from tests.rl.conftest import tiny_run_config

LOGPROB_ATOL = 1e-4  # fp32 both sides; the engine decodes token by token, the trainer all at once
PROMPTS = [[256, 72, 105, 33], [256, 7, 99, 14, 201, 3]]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


def train_sample(seed: int) -> TrainSample:
    ids = [256, 10 + seed, 20, 30, 40, 50]
    return TrainSample(
        input_ids=ids,
        loss_mask=[0, 0, 1, 1, 1, 1],
        old_logprobs=[0.0, 0.0, -5.5, -5.5, -5.5, -5.5],
        advantage=1.0,
    )


def start_trainers(config) -> TrainerGroup:
    trainers = TrainerGroup(config)
    master = ray.get(trainers.actors[0].address.remote())
    ray.get([a.setup.remote(*master) for a in trainers.actors])
    return trainers


def train_once(actors: list, seed: int) -> None:
    """One optimizer step on every rank (each with one micro-batch of one sample)."""
    ray.get([a.train_step.remote([[train_sample(seed + r)]], 4 * len(actors)) for r, a in enumerate(actors)])


async def engine_tokens(engine: MSAEngine) -> list[tuple[list[int], list[float], set[int]]]:
    out = []
    for i, prompt in enumerate(PROMPTS):
        tokens, lps, versions = [], [], set()
        params = SamplingParams(max_tokens=5, temperature=1.0, seed=50 + i, ignore_eos=True, logprobs=0)
        async for o in engine.generate(f"check-{i}-{engine.weight_version}", prompt, params):
            tokens += o.token_ids
            lps += o.logprobs
            versions.add(o.weight_version)
        out.append((tokens, lps, versions))
    return out


@contextlib.asynccontextmanager
async def synced_engine(config, actors: list) -> AsyncIterator[tuple[MSAEngine, WeightSync]]:
    """A started engine that serves the trainers' initial weights (version 0) through the group."""
    engine = MSAEngine(engine_config(config))
    await engine.start()
    try:
        weights = WeightSync(engine, actors, "float32")
        await weights.open()
        await weights.sync(0)
        yield engine, weights
    finally:
        await engine.shutdown()


def trainer_logprobs(actors: list, generated) -> list[list[float]]:
    samples = [
        TrainSample(
            input_ids=p + t,
            loss_mask=[0] * len(p) + [1] * len(t),
            old_logprobs=[0.0] * (len(p) + len(t)),
            advantage=0.0,
        )
        for p, (t, _, _) in zip(PROMPTS, generated, strict=True)
    ]
    return ray.get([a.logprobs.remote(samples) for a in actors])[0]  # ZeRO-3: every rank runs the forward


def max_gap(generated, trainer_view) -> float:
    return max(
        abs(a - b)
        for (_, lps, _), ref in zip(generated, trainer_view, strict=True)
        for a, b in zip(lps, ref, strict=True)
    )


def test_tensor_parallel_engine_matches_the_trainer_and_keeps_its_version_on_a_damaged_bucket(
    ray_cluster, tmp_path
):
    config = tiny_run_config(
        str(tmp_path),
        engine={"tp": 2, "weight_bucket_bytes": 64 << 10},
        trainer={"grad_accum_steps": 1, "lr": 0.01},
    )
    trainers = start_trainers(config)
    actors = trainers.actors

    async def main():
        async with synced_engine(config, actors) as (engine, weights):
            initial = await engine_tokens(engine)
            train_once(actors, seed=0)
            report = await weights.sync(1)
            synced = await engine_tokens(engine)
            synced_view = trainer_logprobs(actors, synced)
            train_once(actors, seed=1)
            with pytest.raises(
                WeightUpdateError, match=r"weight bucket 1 of version 2 \(\d+ tensors: model\."
            ) as err:
                await weights.sync(2, corrupt_bucket=1)
            kept = engine.stats().weight_version
            still = await engine_tokens(engine)
            repaired = await weights.sync(2)
            return initial, report, synced, synced_view, str(err.value), kept, still, repaired

    try:
        initial, report, synced, synced_view, error, kept, still, repaired = asyncio.run(main())
    finally:
        trainers.shutdown()
    assert report.version == 1 and report.buckets > 2 and report.bytes > 0 and report.gbps > 0
    assert all(versions == {1} for _, _, versions in synced)
    moved = max(
        abs(a - b) for x, y in zip(initial, synced, strict=True) for a, b in zip(x[1], y[1], strict=True)
    )
    assert moved > 1e-3
    assert max_gap(synced, synced_view) < LOGPROB_ATOL
    # The damaged sync changed nothing: same version, same tokens and log-probabilities.
    assert "failed its checksum" in error and kept == 1
    assert [(t, lp) for t, lp, _ in still] == [(t, lp) for t, lp, _ in synced]
    assert repaired.version == 2


def test_zero3_trainers_broadcast_gathered_weights(ray_cluster, tmp_path):
    config = tiny_run_config(
        str(tmp_path), trainer={"zero_stage": 3, "num_trainers": 2, "grad_accum_steps": 1, "lr": 0.01}
    )
    trainers = start_trainers(config)
    actors = trainers.actors

    async def main():
        async with synced_engine(config, actors) as (engine, weights):
            train_once(actors, seed=0)
            report = await weights.sync(1)
            return report, await engine_tokens(engine)

    try:
        report, synced = asyncio.run(main())
        view = trainer_logprobs(actors, synced)
    finally:
        trainers.shutdown()
    assert report.version == 1 and all(versions == {1} for _, _, versions in synced)
    assert max_gap(synced, view) < LOGPROB_ATOL
