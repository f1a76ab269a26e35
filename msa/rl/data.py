"""Prompts for rollouts: a local jsonl or parquet file read by Hugging Face ``datasets``, renamed
by the config's field mapping, and drawn in a seeded order whose position is checkpointed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from msa.platform.config import ConfigError
from msa.rl.config import DataSection


@dataclass(frozen=True, slots=True)
class Prompt:
    """One dataset row: ``uid`` is its row index, ``sample`` its fields after the mapping."""

    uid: int
    sample: dict[str, Any]


def load_prompts(section: DataSection) -> list[dict[str, Any]]:
    """Every row as a dict whose keys are the environment's names (``fields``: env key -> column).
    A mapped key takes its column's value even where the dataset has a column of that name; several
    keys may read one column; columns not named in the mapping keep their own names."""
    from datasets import load_dataset

    table = load_dataset(section.loader, data_files=section.path, split="train")
    columns = set(table.column_names)
    missing = sorted(col for col in section.fields.values() if col not in columns)
    if missing:
        raise ConfigError(
            f"data.fields names column(s) {missing} that {section.path} does not have; "
            f"its columns: {sorted(columns)}"
        )
    mapped = set(section.fields.values())
    return [
        {k: v for k, v in row.items() if k not in mapped}
        | {key: row[col] for key, col in section.fields.items()}
        for row in table
    ]


class PromptSampler:
    """Endless prompt stream: epoch ``e`` visits every row once in the order of a permutation seeded
    by (seed, e). ``state()`` is the position (epoch, index) that a checkpoint keeps."""

    def __init__(self, rows: list[dict[str, Any]], *, seed: int, shuffle: bool = True) -> None:
        if not rows:
            raise ValueError("the prompt dataset is empty")
        self.rows, self.seed, self.shuffle = rows, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[Prompt]:
        out = []
        for _ in range(count):
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            uid = self._order[self.index]
            out.append(Prompt(uid, dict(self.rows[uid])))
            self.index += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._permutation(self.epoch)
