"""End to end with real Ray actors and real DeepSpeed (gloo on CPU): one full step, the engine's
logits after weight sync, and a run killed with SIGKILL then resumed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import ray

from msa.cluster.protocol import SamplingParams
from msa.platform.config import tiny
from msa.rl.batch import TrainSample, split_for_trainers, to_samples
from msa.rl.chat import ChatTokens
from msa.rl.data import PromptSampler, load_prompts
from msa.rl.envs.base import Environment, StepResult
from msa.rl.placement import TrainerGroup, runtime_env
from msa.rl.rollout import RolloutWorker
from msa.rl.sync import WeightSync
from msa.rl.train import engine_config
from tests.rl.conftest import tiny_run_config

# fp32 on both sides; the engine attends over its paged cache token by token, the trainer over
# the whole sequence at once, so sums are ordered differently.
LOGPROB_ATOL = 1e-4


class LowByteEnv(Environment):
    """Reward = share of reply characters below 'a': about half for a random model, so every
    group has spread and the update moves the weights."""

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": sample["prompt"]}]

    def step(self, text: str) -> StepResult:
        return StepResult(reward=sum(ch < "a" for ch in text) / max(len(text), 1))


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, runtime_env=runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


def test_one_step_then_engine_logprobs_equal_the_trainers(ray_cluster, tmp_path):
    config = tiny_run_config(str(tmp_path), rollout={"prompts_per_step": 2, "group_size": 4, "max_tokens": 4})
    trainers = TrainerGroup(config)
    actor = trainers.actors[0]
    master = ray.get(actor.address.remote())
    assert ray.get(actor.setup.remote(*master)) > 0

    async def main():
        from msa.cluster.engine import MSAEngine

        engine = MSAEngine(engine_config(config))
        await engine.start()
        try:
            weights = WeightSync(engine, [actor], "float32")
            await weights.open()
            await weights.sync(0)
            worker = RolloutWorker(
                engine, ChatTokens(engine.tokenizer), LowByteEnv, config.rollout, run_seed=0
            )
            prompts = PromptSampler(load_prompts(config.data), seed=0).take(2)
            batch = await worker.run_step(0, prompts)
            samples, advantages = to_samples(batch.groups, "grpo", normalize_std=True)
            before = ray.get(actor.logprobs.remote(samples))
            shards = split_for_trainers(samples, 1, config.trainer.grad_accum_steps)
            metrics = ray.get(actor.train_step.remote(shards[0], sum(s.num_loss_tokens for s in samples)))
            report = await weights.sync(1)
            after = ray.get(actor.logprobs.remote(samples))
            # Fresh generations on version 1, scored again by the trainer.
            fresh = await _engine_samples(engine, [g.episodes[0].prompt_ids for g in batch.groups])
            check = [
                TrainSample(
                    input_ids=p + t,
                    loss_mask=[0] * len(p) + [1] * len(t),
                    old_logprobs=[0.0] * (len(p) + len(t)),
                    advantage=0.0,
                )
                for p, t, _, _ in fresh
            ]
            trainer_view = ray.get(actor.logprobs.remote(check))
            return batch, samples, advantages, before, metrics, report, after, fresh, trainer_view
        finally:
            await engine.shutdown()

    try:
        batch, samples, advantages, before, metrics, report, after, fresh, trainer_view = asyncio.run(main())
    finally:
        trainers.shutdown()
    assert not batch.failed and all(ep.weight_version == 0 for g in batch.groups for ep in g.episodes)
    assert float(advantages.abs().sum()) > 0
    # Before the update the trainer reproduces the rollout's own log-probabilities.
    for sample, lp in zip(samples, before, strict=True):
        old = [x for x, m in zip(sample.old_logprobs, sample.loss_mask, strict=True) if m]
        assert max(abs(a - b) for a, b in zip(lp, old, strict=True)) < LOGPROB_ATOL
    assert (
        metrics["train/tokens"] == sum(s.num_loss_tokens for s in samples) and metrics["train/grad_norm"] > 0
    )
    assert report.version == 1 and report.bytes > 0
    moved = max(abs(a - b) for x, y in zip(before, after, strict=True) for a, b in zip(x, y, strict=True))
    assert moved > 1e-3
    # After the sync the engine (version 1) and the trainer agree token by token.
    for (_, tokens, engine_lps, versions), trainer_lps in zip(fresh, trainer_view, strict=True):
        assert versions == {1} and len(tokens) == 6
        assert max(abs(a - b) for a, b in zip(engine_lps, trainer_lps, strict=True)) < LOGPROB_ATOL


async def _engine_samples(
    engine, prompts: list[list[int]]
) -> list[tuple[list[int], list[int], list[float], set]]:
    out = []
    for i, prompt in enumerate(prompts):
        toks, lps, versions = [], [], set()
        params = SamplingParams(max_tokens=6, temperature=1.0, seed=100 + i, ignore_eos=True, logprobs=0)
        async for o in engine.generate(f"check-{i}", prompt, params):
            toks += o.token_ids
            lps += o.logprobs
            versions.add(o.weight_version)
        out.append((prompt, toks, lps, versions))
    return out


def test_zero3_trainer_gathers_full_weights_for_the_sync(ray_cluster, tmp_path):
    import torch

    from msa.platform.checkpoint import load_model

    config = tiny_run_config(str(tmp_path), trainer={"zero_stage": 3, "grad_accum_steps": 2, "lr": 0.01})
    trainers = TrainerGroup(config)
    actor = trainers.actors[0]
    try:
        ray.get(actor.setup.remote(*ray.get(actor.address.remote())))
        before = dict(ray.get(actor.named_weights.remote("float32")))
        sample = TrainSample(
            input_ids=[1, 2, 3, 4, 5],
            loss_mask=[0, 0, 1, 1, 1],
            old_logprobs=[0.0, 0.0, -5.5, -5.5, -5.5],
            advantage=1.0,
        )
        ray.get(actor.train_step.remote([[sample], [sample]], 6))
        after = dict(ray.get(actor.named_weights.remote("float32")))
    finally:
        trainers.shutdown()
    initial = load_model("tiny", dtype=torch.float32, seed=0, progress=False)[0].state_dict()
    assert sorted(before) == sorted(initial)
    assert all(torch.equal(before[name], initial[name]) for name in initial)
    # Adam's first step moves every parameter with a gradient by about lr.
    moved = max((after[n] - initial[n]).abs().max().item() for n in initial)
    assert 0.005 < moved <= 0.0101


def test_indexer_loss_moves_only_the_index_branch(ray_cluster, tmp_path):
    """With a zero advantage the policy loss has no gradient: what moves is the indexer's loss."""
    config = tiny_run_config(
        str(tmp_path), algorithm={"indexer_kl_coef": 1.0}, trainer={"grad_accum_steps": 1, "lr": 0.01}
    )
    trainers = TrainerGroup(config)
    actor = trainers.actors[0]
    length = 40  # ten 4-token blocks, more than the top-4: the selection is sparse
    sample = TrainSample(
        input_ids=[(7 * i + 3) % 250 for i in range(length)],
        loss_mask=[0] * 20 + [1] * 20,
        old_logprobs=[0.0] * length,
        advantage=0.0,
    )
    try:
        ray.get(actor.setup.remote(*ray.get(actor.address.remote())))
        before = dict(ray.get(actor.named_weights.remote("float32")))
        metrics = ray.get(actor.train_step.remote([[sample]], 20))
        after = dict(ray.get(actor.named_weights.remote("float32")))
    finally:
        trainers.shutdown()
    assert metrics["train/indexer_kl"] > 0
    moved = {name for name in before if not (after[name] == before[name]).all()}
    assert moved and all(".index_" in name for name in moved), sorted(moved)
    sparse_layers = [i for i, on in enumerate(tiny().sparse_attention_freq) if on]
    assert {f"model.layers.{i}.self_attn.index_k_proj.weight" for i in sparse_layers} <= moved
