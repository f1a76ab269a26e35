"""Resumable run checkpoints: the trainers' DeepSpeed state plus the driver's state.

``{output_dir}/checkpoints/step_{N:06d}/`` holds ``policy/`` (model, optimizer, scheduler and each
rank's RNG states, written by DeepSpeed) and ``driver.pt`` (next step, data position, the driver's
RNG states, rollouts generated but not yet trained, the wandb run id). The ``latest`` file names
the newest complete one and is replaced atomically last, so a kill while writing leaves the previous
checkpoint in force.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from msa.rl.rollout import RolloutBatch

POLICY_TAG = "policy"


@dataclass(kw_only=True, slots=True)
class DriverState:
    """Everything besides the trainers' tensors that a resumed run needs. ``step``: the next step
    to run (= the number of optimizer steps taken = the policy's weight version)."""

    step: int = 0
    data: dict[str, int] = field(default_factory=lambda: {"epoch": 0, "index": 0})
    pending: RolloutBatch | None = None
    rng: dict[str, Any] = field(default_factory=dict)
    wandb_id: str | None = None


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f"step_{step:06d}"


def checkpoint_step(directory: Path) -> int | None:
    """The step a ``step_{N}`` folder resumes at, or None for any other name."""
    match = re.fullmatch(r"step_(\d+)", directory.name)
    return int(match.group(1)) if match else None


def finished_checkpoints(output_dir: str | Path) -> list[Path]:
    """The ``step_*`` folders whose driver state was written, oldest step first."""
    found = [
        p
        for p in checkpoint_root(output_dir).glob("step_*")
        if checkpoint_step(p) is not None and (p / "driver.pt").exists()
    ]
    return sorted(found, key=checkpoint_step)


def capture_rng() -> dict[str, Any]:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def restore_rng(state: dict[str, Any]) -> None:
    if state:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])


def write_driver_state(directory: Path, state: DriverState) -> None:
    torch.save(
        {
            "step": state.step,
            "data": state.data,
            "pending": state.pending,
            "rng": state.rng,
            "wandb_id": state.wandb_id,
        },
        directory / "driver.pt",
    )


def mark_latest(output_dir: str | Path, directory: Path, keep: int) -> None:
    """Point ``latest`` at ``directory`` (atomic rename), then drop the finished checkpoints of
    lower steps beyond the ``keep - 1`` newest of them; ``directory`` and later steps stay."""
    root = checkpoint_root(output_dir)
    tmp = root / "latest.tmp"
    tmp.write_text(directory.name + "\n")
    os.replace(tmp, root / "latest")
    step = checkpoint_step(directory)
    older = [p for p in finished_checkpoints(output_dir) if checkpoint_step(p) < step]
    for old in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)


def marked_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint folder the ``latest`` pointer names (a resume's), or None without one."""
    pointer = checkpoint_root(output_dir) / "latest"
    return checkpoint_root(output_dir) / pointer.read_text().strip() if pointer.exists() else None


def latest_checkpoint(output_dir: str | Path) -> tuple[Path, DriverState] | None:
    """The newest complete checkpoint and its driver state, or None when the run has none."""
    directory = marked_checkpoint(output_dir)
    if directory is None:
        return None
    if not (directory / "driver.pt").exists():
        pointer = checkpoint_root(output_dir) / "latest"
        raise FileNotFoundError(
            f"{pointer} names {directory.name}, but {directory} holds no complete checkpoint"
        )
    raw = torch.load(directory / "driver.pt", weights_only=False)
    return directory, DriverState(
        step=raw["step"], data=raw["data"], pending=raw["pending"], rng=raw["rng"], wandb_id=raw["wandb_id"]
    )
