"""Write a Python function; reward = the share of its unit tests that pass in the sandbox."""

from __future__ import annotations

import json
import re
from typing import Any

from msa.rl.envs.base import Environment, StepResult, require_field
from msa.rl.envs.sandbox import run_python

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)
_MARK = "__msa_test__"

# Each test runs on its own, and its verdict is printed as soon as it is known, so a program that
# hangs in test 3 still gets credit for tests 1 and 2 when the sandbox kills it.
_RUNNER = """
import json, sys
_src = json.loads({source!r})
_tests = json.loads({tests!r})
_ns = {{"__name__": "__solution__"}}
try:
    exec(compile(_src, "solution.py", "exec"), _ns)
except BaseException as e:
    print("{mark}", json.dumps({{"test": -1, "error": type(e).__name__}}), flush=True)
    sys.exit(0)
for _i, _t in enumerate(_tests):
    try:
        exec(compile(_t, "test_%d.py" % _i, "exec"), dict(_ns))
        _ok = True
    except BaseException:
        _ok = False
    print("{mark}", json.dumps({{"test": _i, "passed": _ok}}), flush=True)
"""


def extract_code(text: str) -> str:
    """The last fenced code block of a reply, or the whole reply when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def score_program(source: str, tests: list[str], *, timeout_s: float, memory_mb: int) -> tuple[float, dict]:
    """(share of ``tests`` passed, details) for ``source`` run in the sandbox."""
    runner = _RUNNER.format(source=json.dumps(source), tests=json.dumps(tests), mark=_MARK)
    result = run_python(runner, timeout_s=timeout_s, memory_mb=memory_mb)
    passed, info = 0, {"sandbox": result.outcome, "tests": len(tests)}
    for line in result.stdout.splitlines():
        if line.startswith(_MARK):
            record = json.loads(line[len(_MARK) :])
            passed += bool(record.get("passed"))
            if "error" in record:
                info["solution_error"] = record["error"]
    info["passed"] = passed
    return passed / len(tests), info


class CodingEnv(Environment):
    """Sample fields: ``prompt`` (the task) and ``tests`` (a list of Python snippets, e.g. asserts,
    or a JSON string of one). Single turn: the reply's code is scored."""

    def __init__(self, timeout_s: float = 5.0, memory_mb: int = 256) -> None:
        self.timeout_s, self.memory_mb = timeout_s, memory_mb
        self.tests: list[str] = []

    def reset(self, sample: dict[str, Any]) -> list[dict[str, Any]]:
        tests = require_field(sample, "tests", "coding")
        tests = json.loads(tests) if isinstance(tests, str) else list(tests)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise ValueError("coding: the sample field 'tests' must be a non-empty list of code strings")
        self.tests = tests
        return [{"role": "user", "content": require_field(sample, "prompt", "coding")}]

    def step(self, text: str) -> StepResult:
        reward, info = score_program(
            extract_code(text), self.tests, timeout_s=self.timeout_s, memory_mb=self.memory_mb
        )
        return StepResult(reward=reward, done=True, info=info)
