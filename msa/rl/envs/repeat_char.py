"""Single-turn: reply with the character named in the prompt, as many times as allowed.

Reward = the share of the first ``length`` reply characters equal to the target, so it is
verifiable, graded (a partly right reply earns part of it) and learnable by a tiny random model.
"""

from __future__ import annotations

from typing import Any

from msa.rl.envs.base import Environment, StepResult, require_field


class RepeatCharEnv(Environment):
    """Sample fields: ``prompt`` (the user message) and ``target`` (one character)."""

    def __init__(self, length: int = 8) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"env option 'length' must be an integer >= 1, got {length!r}")
        self.length = length
        self.target = ""

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        target = str(require_field(sample, "target", "repeat_char"))
        if len(target) != 1:
            raise ValueError(f"repeat_char: the sample field 'target' must be one character, got {target!r}")
        self.target = target
        return [{"role": "user", "content": require_field(sample, "prompt", "repeat_char")}]

    def step(self, text: str) -> StepResult:
        reply = text[: self.length]
        hits = sum(ch == self.target for ch in reply)
        return StepResult(reward=hits / self.length, done=True, info={"reply_chars": len(reply)})
