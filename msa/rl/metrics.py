"""Run outputs: metrics.jsonl, samples.jsonl (which episodes each step trained on), a reward and
loss curve PNG, and wandb (offline unless configured otherwise)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from msa.rl.config import LoggingSection
from msa.rl.rollout import GroupResult


def _truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep the rows of steps < ``last_step``: later ones came from work a resume redoes."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < last_step]
    path.write_text("".join(line + "\n" for line in kept))


def episode_record(step: int, group: GroupResult) -> list[dict[str, Any]]:
    rows = []
    for ep in group.episodes:
        digest = hashlib.sha1(json.dumps(ep.response_ids).encode()).hexdigest()[:16]
        rows.append(
            {
                "step": step,
                "uid": ep.uid,
                "index": ep.index,
                "version": ep.weight_version,
                "reward": ep.reward,
                "response_sha1": digest,
            }
        )
    return rows


class RunLogger:
    """Appends to the output directory's logs, resuming at ``start_step``."""

    def __init__(
        self,
        output_dir: str | Path,
        section: LoggingSection,
        config: dict[str, Any],
        *,
        start_step: int,
        wandb_id: str | None,
    ) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.section = section
        self.metrics_path = self.dir / "metrics.jsonl"
        self.samples_path = self.dir / "samples.jsonl"
        for path in (self.metrics_path, self.samples_path):
            _truncate_jsonl(path, start_step)
        self.history = (
            [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
            if self.metrics_path.exists()
            else []
        )
        self.wandb = None
        if section.wandb_mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                project=section.wandb_project,
                name=section.run_name,
                config=config,
                dir=str(self.dir),
                mode=section.wandb_mode,
                id=wandb_id,
                resume="allow",
            )

    @property
    def wandb_id(self) -> str | None:
        return self.wandb.id if self.wandb is not None else None

    def log(self, step: int, metrics: dict[str, Any], groups: list[GroupResult]) -> None:
        row = {"step": step, **metrics}
        self.history.append(row)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        with self.samples_path.open("a") as f:
            for group in groups:
                for record in episode_record(step, group):
                    f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if (step + 1) % self.section.plot_every == 0:
            self.plot()

    def plot(self) -> Path | None:
        """reward and loss per step -> ``curves.png``."""
        if not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.history]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for ax, key, title in (
            (axes[0], "rollout/reward_mean", "mean reward"),
            (axes[1], "train/loss", "loss"),
        ):
            values = [r.get(key, math.nan) for r in self.history]
            ax.plot(steps, values, marker=".")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.dir / "curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()
