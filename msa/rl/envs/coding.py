"""Write a Python function; reward = the share of its unit tests that pass in the sandbox."""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from msa.rl.envs.base import Environment, StepResult, require_field
from msa.rl.envs.sandbox import run_python

_FENCE = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.S)

# Each test runs on its own, and its verdict is written as soon as it is known, so a program that
# hangs in test 3 still gets credit for tests 1 and 2 when the sandbox kills it. The solution shares
# the runner's process, so the verdicts go out on a copy of stdout taken before it runs (fd 1 then
# leads to /dev/null), through functions bound before it runs, and each carries a marker with a nonce
# drawn per run: text the solution prints cannot pass for a verdict. (Code that inspects the runner's
# frames can still reach them; as for the sandbox, this contains mistakes, not a determined attacker.)
_RUNNER = """
import json, os, sys
_dumps, _write, _fd = json.dumps, os.write, os.dup(1)
_devnull = os.open(os.devnull, os.O_WRONLY)
os.dup2(_devnull, 1)
os.close(_devnull)
def _verdict(record, _dumps=_dumps, _write=_write, _fd=_fd):
    _write(_fd, ("\\n{mark} " + _dumps(record) + "\\n").encode())
_exec, _compile, _BaseException = exec, compile, BaseException
_src = json.loads({source!r})
_tests = json.loads({tests!r})
_ns = {{"__name__": "__solution__"}}
try:
    _exec(_compile(_src, "solution.py", "exec"), _ns)
except _BaseException as e:
    _verdict({{"test": -1, "error": type(e).__name__}})
    sys.exit(0)
for _i, _t in enumerate(_tests):
    try:
        _exec(_compile(_t, "test_%d.py" % _i, "exec"), dict(_ns))
        _ok = True
    except _BaseException:
        _ok = False
    _verdict({{"test": _i, "passed": _ok}})
"""


def extract_code(text: str) -> str:
    """The last fenced code block of a reply, or the whole reply when it has none."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


def score_program(source: str, tests: list[str], *, timeout_s: float, memory_mb: int) -> tuple[float, dict]:
    """(share of ``tests`` passed, details) for ``source`` run in the sandbox. The share is in
    [0, 1]: each test counts once, by its first verdict, and a test without one has failed."""
    mark = f"__msa_test_{secrets.token_hex(16)}__"
    runner = _RUNNER.format(source=json.dumps(source), tests=json.dumps(tests), mark=mark)
    result = run_python(runner, timeout_s=timeout_s, memory_mb=memory_mb)
    info: dict[str, Any] = {"sandbox": result.outcome, "tests": len(tests)}
    verdicts: dict[int, bool] = {}
    for record in _records(result.stdout, mark):
        if record.get("test") == -1:
            info["solution_error"] = record.get("error")
        elif isinstance(record.get("test"), int):
            verdicts.setdefault(record["test"], record.get("passed") is True)
    passed = sum(verdicts.get(i, False) for i in range(len(tests)))
    info["passed"] = passed
    return passed / len(tests), info


def _records(stdout: str, mark: str) -> list[dict[str, Any]]:
    """The runner's verdict records: the JSON objects on the lines that start with ``mark``."""
    records = []
    for line in stdout.splitlines():
        if line.startswith(mark):
            try:
                record = json.loads(line[len(mark) :])
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


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
