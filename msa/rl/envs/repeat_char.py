"""Single-turn: reply with the character named in the prompt, as many times as allowed.

Reward = the share of the first ``length`` reply characters that are a target character, so it is
verifiable, graded (a partly right reply earns part of it) and learnable by a tiny random model.
``target`` is usually one character; a longer string means "any of these" (e.g. all lowercase
letters: "reply in lowercase"), which gives a random model a denser reward.
"""

from __future__ import annotations

from typing import Any

from msa.rl.envs.base import Environment, StepResult, require_field


class RepeatCharEnv(Environment):
    """Sample fields: ``prompt`` (the user message) and ``target`` (the rewarded character(s))."""

    def __init__(self, length: int = 8) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"env option 'length' must be an integer >= 1, got {length!r}")
        self.length = length
        self.target: set[str] = set()

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        target = require_field(sample, "target", "repeat_char")
        if not isinstance(target, str) or not target:
            raise ValueError(f"repeat_char: sample field 'target' must be a non-empty string, got {target!r}")
        self.target = set(target)
        return [{"role": "user", "content": require_field(sample, "prompt", "repeat_char")}]

    def step(self, text: str) -> StepResult:
        reply = text[: self.length]
        hits = sum(ch in self.target for ch in reply)
        return StepResult(reward=hits / self.length, done=True, info={"reply_chars": len(reply)})
