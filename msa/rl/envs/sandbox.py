"""Run untrusted Python in a child process with a wall-clock limit and an address-space limit.

The child runs ``python -I`` (isolated: no user site, no environment-driven imports) in a fresh
temporary directory with an empty environment, in its own process group so a timeout kills
everything it spawned. Before the untrusted source runs, the child sets its own ``RLIMIT_AS``
(allocations past it raise MemoryError), ``RLIMIT_CPU`` (backs up the wall-clock limit),
``RLIMIT_FSIZE`` (no disk fills) and ``RLIMIT_CORE``. The limits are set in the child itself rather
than in a ``preexec_fn``, which is unsafe while the parent runs threads (rollouts step environments
in worker threads). This contains mistakes, not a determined attacker: run untrusted workloads
inside a container as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """outcome: "ok" (exit 0), "error" (non-zero exit), "timeout" (killed at the wall-clock limit),
    "memory" (ran out of its address space)."""

    outcome: str
    returncode: int | None
    stdout: str
    stderr: str


# Runs first in the child; the untrusted source follows as its own compiled unit.
_PRELUDE = """
import resource as _r
_r.setrlimit(_r.RLIMIT_AS, ({memory}, {memory}))
_r.setrlimit(_r.RLIMIT_CPU, ({cpu}, {cpu} + 1))
_r.setrlimit(_r.RLIMIT_FSIZE, ({files}, {files}))
_r.setrlimit(_r.RLIMIT_CORE, (0, 0))
del _r
exec(compile({source!r}, "<sandbox>", "exec"), {{"__name__": "__main__"}})
"""


def run_python(
    source: str, *, timeout_s: float = 5.0, memory_mb: int = 256, file_mb: int = 16
) -> SandboxResult:
    """Run ``source`` as a script; returns its exit, output (decoded, truncated to 64 KiB) and outcome."""
    program = _PRELUDE.format(
        memory=memory_mb << 20, cpu=max(1, int(timeout_s) + 1), files=file_mb << 20, source=source
    )
    with tempfile.TemporaryDirectory(prefix="msa-sandbox-") as workdir:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-"],  # the program comes on stdin: no argv length limit
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(program.encode(), timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            timed_out = True
    stdout, stderr = _text(out), _text(err)
    if timed_out or proc.returncode == -signal.SIGXCPU:
        outcome = "timeout"
    elif "MemoryError" in stderr or proc.returncode == -signal.SIGKILL:
        outcome = "memory"
    else:
        outcome = "ok" if proc.returncode == 0 else "error"
    return SandboxResult(outcome, proc.returncode, stdout, stderr)


def _text(raw: bytes) -> str:
    return raw[:65536].decode("utf-8", errors="replace")
