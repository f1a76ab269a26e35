"""``msa train`` and ``msa submit``: post-train locally, or on a Ray cluster as a Ray job.

``register(subparsers)`` adds both to the ``msa`` parser; ``python -m msa.rl.cli`` runs them alone
(the entrypoint a submitted job uses).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

_EXCLUDES = [".git", ".venv", "runs", "wandb", "__pycache__", "*.pyc", "benchmarks/results", "node_modules"]


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``section.field=value`` pairs, values parsed as YAML scalars (``run.steps=3``)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--set expects section.field=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {pair!r}: the value is not valid YAML ({e})") from None
    return out


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="RL post-training with agentic rollouts (GRPO / REINFORCE++)",
        description="Post-train an msa model with rollouts from the msa engine and "
        "DeepSpeed trainers placed by Ray. Resumes from the output "
        "directory's latest checkpoint when run.resume is true.",
    )
    p.add_argument("config", help="run config YAML (see examples/rl_tiny.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override one config field, e.g. --set run.steps=5 or --set env.options.length=4 (repeatable)",
    )
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from msa.rl.config import load_rl_config
    from msa.rl.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_rl_config(args.config, _overrides(args.overrides))
    summary = asyncio.run(train(config))
    last = summary.history[-1] if summary.history else {}
    reward = last.get("rollout/reward_mean", float("nan"))
    print(f"finished at step {summary.final_step}; last mean reward {reward:.4f}")
    print(f"outputs in {config.run.output_dir}")
    return 0


def _add_submit(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "submit",
        help="run `msa train CONFIG` as a job on a Ray cluster",
        description="Submit the training as a Ray job (the Python equivalent of "
        "`ray job submit --working-dir . -- python -m msa.rl.cli train CONFIG`). "
        "The current directory is uploaded; CONFIG must lie inside it.",
    )
    p.add_argument("config", help="run config YAML, inside the current directory")
    p.add_argument(
        "--address",
        default=None,
        help="Ray dashboard address, e.g. http://head:8265 (default: RAY_ADDRESS or the local one)",
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    p.add_argument(
        "--no-wait", action="store_true", help="print the job id and return instead of following logs"
    )
    p.set_defaults(run=_run_submit)


def submit_entrypoint(config: str, overrides: list[str]) -> str:
    """The job's shell command line; each argument quoted so the job sees exactly these strings."""
    argv = ["python", "-m", "msa.rl.cli", "train", config]
    for override in overrides:
        argv += ["--set", override]
    return shlex.join(argv)


def _run_submit(args: argparse.Namespace) -> int:
    from ray.job_submission import JobStatus, JobSubmissionClient

    from msa.rl.config import load_rl_config

    run_config = load_rl_config(args.config, _overrides(args.overrides))  # fail here, not on the cluster
    cwd = Path.cwd().resolve()
    config = Path(args.config).resolve()
    if not config.is_relative_to(cwd):
        raise ValueError(f"the config {config} must lie inside the uploaded working directory {cwd}")
    overrides = list(args.overrides)
    output_dir = Path(run_config.run.output_dir)
    if not output_dir.is_absolute():
        # The job runs in Ray's temporary copy of the working directory, which the cluster deletes:
        # a relative output directory is taken from where msa submit runs instead.
        output_dir = cwd / output_dir
        overrides.append(f"run.output_dir={output_dir}")
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=submit_entrypoint(str(config.relative_to(cwd)), overrides),
        runtime_env={"working_dir": str(cwd), "excludes": _EXCLUDES},
    )
    print(f"submitted {job_id}; outputs in {output_dir} on the node that runs it")
    if args.no_wait:
        return 0

    async def follow() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    status = client.get_job_status(job_id)
    print(f"job {job_id}: {status}")
    return 0 if status == JobStatus.SUCCEEDED else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train`` and ``submit`` to the ``msa`` command's subparsers."""
    _add_train(subparsers)
    _add_submit(subparsers)


def main(argv: list[str] | None = None) -> int:
    from msa.platform.cli import run_subcommand

    parser = argparse.ArgumentParser(prog="msa", description="RL post-training of msa models.")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_subcommand(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
