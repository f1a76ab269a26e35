"""Run untrusted Python in a child process with a wall-clock limit and an address-space limit.

The child runs ``python -I`` (isolated: no user site, no environment-driven imports) in a fresh
temporary directory with an empty environment, in its own process group so a timeout kills
everything it spawned. ``RLIMIT_AS`` caps its memory (allocations past it raise MemoryError or
kill it), ``RLIMIT_CPU`` backs up the wall-clock limit, ``RLIMIT_NPROC``/``RLIMIT_FSIZE`` stop
fork bombs and disk fills. This contains mistakes, not a determined attacker: run untrusted
workloads inside a container as well.
"""

from __future__ import annotations

import os
import resource
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


def _limits(memory_bytes: int, cpu_seconds: int, file_bytes: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_python(
    source: str, *, timeout_s: float = 5.0, memory_mb: int = 256, file_mb: int = 16
) -> SandboxResult:
    """Run ``source`` as a script; returns its exit, output (decoded, truncated to 64 KiB) and outcome."""
    memory = memory_mb << 20
    cpu = max(1, int(timeout_s) + 1)
    with tempfile.TemporaryDirectory(prefix="msa-sandbox-") as workdir:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", source],
            cwd=workdir,
            env={"PATH": "/usr/bin:/bin"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            preexec_fn=lambda: _limits(memory, cpu, file_mb << 20),
        )
        try:
            out, err = proc.communicate(timeout=timeout_s)
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
