"""The environment interface of multi-turn episodes.

An environment is built per episode. ``reset(sample)`` gives the opening messages (OpenAI-style
dicts, rendered by the tokenizer's chat template) and ``step(text)`` takes the model's whole
reply of one turn, executes any tool calls in it, and says what the model sees next, the reward so
far and whether the episode is over. The reward of an episode is the reward of its last step.
Any exception from ``reset`` or ``step`` is an environment failure: the rollout retries the
episode and, after the configured number of tries, fails its group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(kw_only=True, slots=True)
class StepResult:
    """observations: messages appended after the model's turn (role "tool" for tool results, "user"
    for feedback); reward: the episode's reward if it ended here; info: values for the logs."""

    observations: list[dict[str, Any]] = field(default_factory=list)
    reward: float = 0.0
    done: bool = True
    info: dict[str, Any] = field(default_factory=dict)


class Environment(ABC):
    """One episode. ``tools`` are the OpenAI-style function schemas shown in the prompt."""

    tools: list[dict[str, Any]] = []

    @abstractmethod
    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        """Opening messages for the dataset row ``sample`` (after the config's field mapping)."""

    @abstractmethod
    def step(self, text: str) -> StepResult:
        """Consume the model's reply of one turn (special tokens kept, stop token removed)."""


def require_field(sample: dict[str, Any], name: str, env: str) -> Any:
    if name not in sample:
        raise KeyError(
            f"environment '{env}' needs the sample field '{name}' (map it with data.fields); "
            f"the sample has {sorted(sample)}"
        )
    return sample[name]
