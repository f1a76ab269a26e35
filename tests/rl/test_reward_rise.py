"""The shipped tiny config learns: GRPO from the random tiny model raises the repeat-char reward
within a CPU-sized run. The curve is compared with golden data (tests/rl/golden/), not eyeballed.

Set MSA_UPDATE_GOLDEN=1 to rewrite the golden file from this run.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import ray

from msa.rl.config import load_rl_config
from msa.rl.train import train

GOLDEN = Path(__file__).parent / "golden" / "rl_tiny_reward.json"
WINDOW = 5
# Same seeds give the same curve on one machine; another CPU may round matmuls differently and flip
# a few samples, so windowed means may differ by this much.
CURVE_TOLERANCE = 0.2


def windowed(values: list[float], width: int = WINDOW) -> list[float]:
    return [sum(values[i : i + width]) / width for i in range(len(values) - width + 1)]


@pytest.mark.slow
def test_tiny_grpo_run_raises_the_reward_like_the_golden_curve(tmp_path):
    config = load_rl_config(
        "examples/rl_tiny.yaml",
        {
            "run.output_dir": str(tmp_path),
            "run.checkpoint_every": 0,
            "run.resume": False,
            "logging.wandb_mode": "disabled",
            "logging.progress_bar": False,
        },
    )
    try:
        summary = asyncio.run(train(config))
    finally:
        ray.shutdown()
    rewards = [row["rollout/reward_mean"] for row in summary.history]
    losses = [row["train/loss"] for row in summary.history]
    assert len(rewards) == config.run.steps
    assert (tmp_path / "curves.png").stat().st_size > 0
    if os.environ.get("MSA_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(
            json.dumps(
                {
                    "config": "examples/rl_tiny.yaml",
                    "window": WINDOW,
                    "tolerance": CURVE_TOLERANCE,
                    "reward_mean": rewards,
                    "loss": losses,
                },
                indent=1,
            )
            + "\n"
        )
    golden = json.loads(GOLDEN.read_text())
    first, last = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-10:]) / 10
    assert first < 0.05, f"the random model should start near zero reward, got {first:.3f}"
    assert last > 0.3 and last > first + 0.25, f"reward did not rise: first {first:.3f}, last ten {last:.3f}"
    got, want = windowed(rewards), windowed(golden["reward_mean"])
    worst = max(abs(a - b) for a, b in zip(got, want, strict=True))
    assert worst <= golden["tolerance"], (
        f"windowed reward curve differs from golden by {worst:.3f}: {got} vs {want}"
    )
