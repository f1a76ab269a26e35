"""Where the trainer ranks run: one Ray placement group, one bundle per rank."""

from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from msa.rl.config import RLConfig
from msa.rl.trainer import PolicyTrainer


def runtime_env() -> dict:
    """Workers import ``msa`` from the same tree as the driver, installed or not. Inside a Ray job
    (``RAY_ADDRESS`` set, as for ``msa submit``) the job's working_dir already provides it, so
    nothing is added that could shadow the job's own runtime environment."""
    if os.environ.get("RAY_ADDRESS"):
        return {}
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


class TrainerGroup:
    """``num_trainers`` PolicyTrainer actors in a PACK placement group (ranks on as few nodes as
    fit). Bundle i holds rank i: ``cpus_per_trainer`` CPUs and ``gpus_per_trainer`` GPUs."""

    def __init__(self, config: RLConfig) -> None:
        section = config.trainer
        bundle = {"CPU": section.cpus_per_trainer}
        if section.gpus_per_trainer:
            bundle["GPU"] = section.gpus_per_trainer
        self.group = placement_group([dict(bundle) for _ in range(section.num_trainers)], strategy="PACK")
        ray.get(self.group.ready(), timeout=600)
        actor = ray.remote(PolicyTrainer)
        self.actors = [
            actor.options(
                num_cpus=section.cpus_per_trainer,
                num_gpus=section.gpus_per_trainer,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.group, placement_group_bundle_index=rank
                ),
                runtime_env=runtime_env(),
                max_restarts=0,
            ).remote(rank, section.num_trainers, config.model, section, config.algorithm)
            for rank in range(section.num_trainers)
        ]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        remove_placement_group(self.group)
