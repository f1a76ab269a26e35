"""Environments for agentic rollouts, by the name a config's ``env.name`` uses."""

from msa.rl.envs.arithmetic import ArithmeticEnv
from msa.rl.envs.base import Environment, StepResult
from msa.rl.envs.coding import CodingEnv
from msa.rl.envs.repeat_char import RepeatCharEnv

ENVIRONMENTS: dict[str, type[Environment]] = {
    "arithmetic": ArithmeticEnv,
    "coding": CodingEnv,
    "repeat_char": RepeatCharEnv,
}

__all__ = ["ENVIRONMENTS", "ArithmeticEnv", "CodingEnv", "Environment", "RepeatCharEnv", "StepResult"]
