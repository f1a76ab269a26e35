"""The RL training loop: rollouts -> advantages -> DeepSpeed update -> weight sync -> log/checkpoint.

Read top to bottom, this is the algorithm; every remote call's ``ray.get`` is in sight.
With ``rollout.overlap`` the next step's rollouts are generated while the trainers update
(one step off-policy); the engine takes the new weights only after those rollouts finished.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import torch
from tqdm import tqdm

from msa.cluster.engine import EngineConfig, MSAEngine
from msa.rl.batch import split_for_trainers, to_samples
from msa.rl.chat import ChatTokens
from msa.rl.checkpoint import (
    POLICY_TAG,
    DriverState,
    capture_rng,
    checkpoint_step,
    finished_checkpoints,
    latest_checkpoint,
    mark_latest,
    marked_checkpoint,
    restore_rng,
    step_dir,
    write_driver_state,
)
from msa.rl.config import RLConfig
from msa.rl.data import PromptSampler, load_prompts
from msa.rl.envs import ENVIRONMENTS
from msa.rl.metrics import RunLogger
from msa.rl.placement import TrainerGroup, runtime_env
from msa.rl.rollout import RolloutBatch, RolloutWorker
from msa.rl.sync import WeightSync
from msa.rl.trainer import TOKEN_MEAN_TERMS

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunSummary:
    steps_run: int
    final_step: int
    history: list[dict]


def engine_config(config: RLConfig) -> EngineConfig:
    e = config.engine
    return EngineConfig(
        model=config.model.source,
        tp=e.tp,
        sp=e.sp,
        device=config.model.device,
        dtype=config.model.dtype,
        seed=config.model.seed,
        num_pages=e.num_pages,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        gpu_memory_utilization=e.gpu_memory_utilization,
        weight_bucket_bytes=e.weight_bucket_bytes,
        # On GPUs the engine's shard needs a GPU of its own beside the trainers' for the weight group.
        ray_shards=config.model.device == "cuda",
    )


def rollout_metrics(batch: RolloutBatch, version: int) -> dict[str, float]:
    episodes = [ep for g in batch.groups for ep in g.episodes]
    rewards = torch.tensor([ep.reward for ep in episodes] or [float("nan")])
    model_tokens = sum(sum(ep.loss_mask) for ep in episodes)
    masked_tokens = sum(len(ep.loss_mask) - sum(ep.loss_mask) for ep in episodes)
    return {
        "rollout/reward_mean": float(rewards.mean()),
        "rollout/reward_std": float(rewards.std()) if len(episodes) > 1 else 0.0,
        "rollout/episodes": len(episodes),
        "rollout/failed_groups": len(batch.failed),
        "rollout/retries": batch.retries,
        "rollout/regenerated_mixed_version": batch.regenerations,
        "rollout/model_tokens": model_tokens,
        "rollout/observation_tokens": masked_tokens,
        "rollout/turns_mean": sum(ep.turns for ep in episodes) / max(len(episodes), 1),
        "rollout/staleness": max((version - ep.weight_version for ep in episodes), default=0),
        "time/rollout": batch.seconds,
    }


def trainer_metrics(results: list[dict[str, float]]) -> dict[str, float]:
    """One row from every rank's ``train_step`` metrics: ``train/tokens`` summed, the per-token
    means weighted by each rank's tokens (the step's global token mean), the rest averaged over the
    ranks that report them."""
    tokens = [r["train/tokens"] for r in results]
    total = sum(tokens)
    weighted = {f"train/{k}" for k in TOKEN_MEAN_TERMS}
    merged: dict[str, float] = {"train/tokens": total}
    for key in dict.fromkeys(k for r in results for k in r):
        if key in weighted:
            merged[key] = sum(r[key] * n for r, n in zip(results, tokens, strict=True)) / max(total, 1.0)
        elif key != "train/tokens":
            values = [r[key] for r in results if key in r]
            merged[key] = sum(values) / len(values)
    return merged


def check_start(config: RLConfig) -> None:
    """Before anything starts: a fresh run (``run.resume`` false) neither mixes with nor prunes an
    earlier run's checkpoints, and a resumed one has steps left to ``run.steps`` (or is done)."""
    found = finished_checkpoints(config.run.output_dir)
    if not found:
        return
    if not config.run.resume:
        raise ValueError(
            f"run.output_dir {config.run.output_dir} holds checkpoints of an earlier run "
            f"(latest step {checkpoint_step(found[-1])}); set run.resume=true to continue it, "
            "or choose another run.output_dir"
        )
    marked = marked_checkpoint(config.run.output_dir)
    resume_at = checkpoint_step(marked) if marked is not None else None
    if resume_at is not None and resume_at > config.run.steps:
        raise ValueError(
            f"run.steps is {config.run.steps}, but the checkpoint to resume in {config.run.output_dir} "
            f"is at step {resume_at}; set run.steps above it to train on"
        )


def report_failures(batch: RolloutBatch, step: int) -> None:
    for group in batch.failed:
        log.warning(
            "step %d: group of prompt %d failed and is left out of training: %s", step, group.uid, group.error
        )


async def train(config: RLConfig, prompts: list[dict] | None = None) -> RunSummary:
    """Run (or resume) the post-training described by ``config``; returns the metrics history.
    ``prompts``: rows to draw from (keys already the environment's names) instead of reading
    ``config.data``'s file, for a caller that holds its prompts in memory."""
    check_start(config)
    out = Path(config.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not ray.is_initialized():
        ray.init(runtime_env=runtime_env(), include_dashboard=False)
    rows = load_prompts(config.data) if prompts is None else prompts
    sampler = PromptSampler(rows, seed=config.run.seed, shuffle=config.data.shuffle)
    engine = MSAEngine(engine_config(config))
    await engine.start()
    env_class, env_options = ENVIRONMENTS[config.env.name], dict(config.env.options)
    worker = RolloutWorker(
        engine,
        ChatTokens(engine.tokenizer),
        lambda: env_class(**env_options),
        config.rollout,
        run_seed=config.run.seed,
    )
    trainers = TrainerGroup(config)
    try:
        return await _loop(config, out, sampler, engine, worker, trainers)
    finally:
        trainers.shutdown()
        await engine.shutdown()


async def _loop(
    config: RLConfig,
    out: Path,
    sampler: PromptSampler,
    engine: MSAEngine,
    worker: RolloutWorker,
    trainers: TrainerGroup,
) -> RunSummary:
    actors, rc = trainers.actors, config.rollout
    master_addr, master_port = ray.get(actors[0].address.remote())
    ray.get([a.setup.remote(master_addr, master_port) for a in actors])

    # Resume: the trainers' tensors, then the driver's position, RNG and pending rollouts.
    state = DriverState()
    found = latest_checkpoint(out) if config.run.resume else None
    if found is not None:
        directory, state = found
        ray.get([a.load.remote(str(directory), POLICY_TAG) for a in actors])
        sampler.load_state(state.data)
        restore_rng(state.rng)
        log.info("resumed from %s at step %d", directory, state.step)
    # The engine serves exactly the trainers' weights from the first rollout on.
    weights = WeightSync(engine, actors, config.model.dtype)
    await weights.open()
    await weights.sync(state.step)
    logger = RunLogger(out, config.logging, config.to_dict(), start_step=state.step, wandb_id=state.wandb_id)
    pending = state.pending
    bar = tqdm(
        range(state.step, config.run.steps),
        initial=state.step,
        total=config.run.steps,
        desc="rl",
        disable=not config.logging.progress_bar,
    )
    for step in bar:
        step_start = time.perf_counter()
        # 1. Rollouts on the current weights (or those generated during the previous update).
        batch = (
            pending if pending is not None else await worker.run_step(step, sampler.take(rc.prompts_per_step))
        )
        pending = None
        report_failures(batch, step)
        metrics = rollout_metrics(batch, version=step)
        if not batch.groups:
            raise RuntimeError(f"step {step}: every group failed; first error: {batch.failed[0].error}")

        # 2. Advantages, then one DeepSpeed update per pass over the batch.
        samples, _ = to_samples(
            batch.groups, config.algorithm.name, normalize_std=config.algorithm.normalize_std
        )
        shards = split_for_trainers(samples, len(actors), config.trainer.grad_accum_steps)
        tokens = sum(s.num_loss_tokens for s in samples)
        train_start = time.perf_counter()
        passes = config.algorithm.updates_per_rollout
        for update in range(passes):
            refs = [a.train_step.remote(shards[r], tokens) for r, a in enumerate(actors)]
            if rc.overlap and update == passes - 1 and step + 1 < config.run.steps:
                next_prompts = sampler.take(rc.prompts_per_step)
                pending, results = await asyncio.gather(
                    worker.run_step(step + 1, next_prompts), asyncio.to_thread(ray.get, refs)
                )
            else:
                results = await asyncio.to_thread(ray.get, refs)
        metrics |= trainer_metrics(results)
        metrics["time/train"] = time.perf_counter() - train_start

        # 3. Weight sync: the engine switches to version step + 1 between two of its steps.
        report = await weights.sync(step + 1)
        metrics |= report.metrics()
        metrics["time/step"] = time.perf_counter() - step_start

        # 4. Logs, then a checkpoint that resumes at step + 1.
        logger.log(step, metrics, batch.groups)
        bar.set_postfix(reward=f"{metrics['rollout/reward_mean']:.3f}", loss=f"{metrics['train/loss']:.4f}")
        every = config.run.checkpoint_every
        if every and ((step + 1) % every == 0 or step + 1 == config.run.steps):
            directory = step_dir(out, step + 1)
            directory.mkdir(parents=True, exist_ok=True)
            ray.get([a.save.remote(str(directory), POLICY_TAG) for a in actors])
            write_driver_state(
                directory,
                DriverState(
                    step=step + 1,
                    data=sampler.state(),
                    pending=pending,
                    rng=capture_rng(),
                    wandb_id=logger.wandb_id,
                ),
            )
            mark_latest(out, directory, config.run.keep_checkpoints)
    logger.close()
    await weights.close()
    return RunSummary(
        steps_run=config.run.steps - state.step, final_step=config.run.steps, history=logger.history
    )
