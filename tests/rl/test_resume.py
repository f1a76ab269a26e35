"""A run killed with SIGKILL and resumed trains on exactly the samples of an uninterrupted run."""

from __future__ import annotations

import json
import math
import os
import signal
import string
import subprocess
import sys
import time
from pathlib import Path

import yaml

STEPS = 4


def _config(output_dir: Path, data: Path) -> dict:
    return {
        "data": {"path": str(data)},
        "env": {"name": "repeat_char", "options": {"length": 3}},
        "engine": {"num_pages": 256, "max_num_seqs": 32, "max_num_batched_tokens": 1024},
        # overlap: the checkpoint also carries rollouts generated for the next step
        "rollout": {"prompts_per_step": 2, "group_size": 3, "max_tokens": 3, "overlap": True},
        "trainer": {"grad_accum_steps": 2, "lr": 0.05},
        # the frozen reference (KL term) must also come back right after a resume
        "algorithm": {"kl_coef": 0.05},
        "run": {"steps": STEPS, "output_dir": str(output_dir), "checkpoint_every": 1, "keep_checkpoints": 2},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
    }


def _start(config_path: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    return subprocess.Popen(
        [sys.executable, "-m", "msa.rl.cli", "train", str(config_path)],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_kill_between_steps_then_resume_repeats_and_loses_nothing(tmp_path):
    # A dense reward (any lowercase letter), so the policy moves every step and a resume that
    # restored the wrong weights, optimizer or reference would sample differently.
    data = tmp_path / "lowercase.jsonl"
    rows = [{"prompt": f"Reply in lowercase {i}", "target": string.ascii_lowercase} for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = {}
    for name in ("straight", "killed"):
        out = tmp_path / name
        out.mkdir()
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(_config(out, data)))
        paths[name] = out
    straight = _start(tmp_path / "straight.yaml", tmp_path / "straight.log")
    killed = _start(tmp_path / "killed.yaml", tmp_path / "killed.log")
    deadline = time.monotonic() + 400
    try:
        while len(_rows(paths["killed"] / "metrics.jsonl")) < 2:
            assert killed.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 2 in time"
            time.sleep(0.1)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        assert (paths["killed"] / "checkpoints" / "latest").exists()
        resumed = _start(tmp_path / "killed.yaml", tmp_path / "killed.log")
        assert resumed.wait(timeout=400) == 0, (tmp_path / "killed.log").read_text()[-3000:]
        assert straight.wait(timeout=400) == 0, (tmp_path / "straight.log").read_text()[-3000:]
    finally:
        for proc in (straight, killed):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    assert "resumed from" in (tmp_path / "killed.log").read_text()
    want = _rows(paths["straight"] / "samples.jsonl")
    got = _rows(paths["killed"] / "samples.jsonl")
    assert [r["step"] for r in want] == sorted(r["step"] for r in want)
    assert len(want) == STEPS * 2 * 3
    assert got == want  # same prompts, samples, tokens, versions and rewards, each step exactly once
    # With overlap, step s trains on rollouts of weight version s - 1 (step 0: the initial weights).
    assert all(r["version"] == max(r["step"] - 1, 0) for r in want)
    a, b = _rows(paths["straight"] / "metrics.jsonl"), _rows(paths["killed"] / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(STEPS))
    assert a[0]["train/kl"] == 0.0 and all(r["train/kl"] > 0 for r in a[1:])  # policy leaves the reference
    # Same samples, so the same losses up to fp32 summation order (the two runs' threads differ;
    # the loss sums advantages of both signs, so its rounding is large relative to its value).
    for x, y in zip(a, b, strict=True):
        assert math.isclose(x["train/loss"], y["train/loss"], rel_tol=1e-3, abs_tol=1e-5), (x, y)
        assert x["rollout/reward_mean"] == y["rollout/reward_mean"]
