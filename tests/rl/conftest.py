"""Shared pieces of the RL tests: a tiny in-process engine and small run configs."""

from __future__ import annotations

from typing import Any

from msa.cluster.engine import EngineConfig, MSAEngine
from msa.rl.config import RLConfig


async def started_engine(**kw: Any) -> MSAEngine:
    base = dict(
        model="tiny",
        device="cpu",
        dtype="float32",
        num_pages=256,
        max_num_seqs=32,
        max_num_batched_tokens=1024,
        seed=0,
    )
    engine = MSAEngine(EngineConfig(**{**base, **kw}))
    await engine.start()
    return engine


def tiny_run_config(output_dir: str, **sections: dict[str, Any]) -> RLConfig:
    """The repeat-char task on the tiny model, small enough for a test."""
    raw: dict[str, dict[str, Any]] = {
        "data": {"path": "examples/data/repeat_char.jsonl"},
        "env": {"name": "repeat_char", "options": {"length": 3}},
        "engine": {"num_pages": 256, "max_num_seqs": 32, "max_num_batched_tokens": 1024},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_tokens": 3},
        "trainer": {"grad_accum_steps": 2, "lr": 0.01},
        "run": {"steps": 1, "output_dir": output_dir},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return RLConfig.from_dict(raw)
