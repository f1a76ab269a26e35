"""``msa train`` / ``msa submit`` parsing and the checks they make before any work starts."""

from __future__ import annotations

import argparse
import shlex
import socket
from pathlib import Path

import pytest

from msa.rl.cli import main, register, submit_entrypoint


@pytest.fixture
def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="msa")
    register(p.add_subparsers(dest="command", required=True))
    return p


def test_register_adds_train_and_submit_with_overrides():
    args = parser().parse_args(
        ["train", "examples/rl_tiny.yaml", "--set", "run.steps=3", "--set", "rollout.overlap=true"]
    )
    assert args.command == "train" and args.overrides == ["run.steps=3", "rollout.overlap=true"]
    args = parser().parse_args(
        ["submit", "examples/rl_gpu.yaml", "--address", "http://head:8265", "--no-wait"]
    )
    assert args.address == "http://head:8265" and args.no_wait and callable(args.run)


def test_submit_entrypoint_runs_the_train_command_inside_the_job():
    assert submit_entrypoint("examples/rl_gpu.yaml", ["run.steps=5"]) == (
        "python -m msa.rl.cli train examples/rl_gpu.yaml --set run.steps=5"
    )


@pytest.mark.parametrize(
    "config,overrides",
    [
        ("configs/my run.yaml", []),
        ("examples/rl_tiny.yaml", ["logging.run_name=bob's run"]),
        ("examples/rl_tiny.yaml", ["logging.run_name=$HOME", 'logging.wandb_project="x" `id`; ls']),
    ],
)
def test_submit_entrypoint_quotes_every_argument(config, overrides):
    argv = shlex.split(submit_entrypoint(config, overrides))
    sets = [arg for override in overrides for arg in ("--set", override)]
    assert argv == ["python", "-m", "msa.rl.cli", "train", config, *sets]


def test_bad_override_and_bad_config_fail_with_a_message(capsys, tmp_path):
    assert main(["train", "examples/rl_tiny.yaml", "--set", "rollout.group_size=1"]) == 1
    assert "rollout.group_size" in capsys.readouterr().err
    assert main(["train", "examples/rl_tiny.yaml", "--set", "nonsense"]) == 1
    outside = tmp_path / "c.yaml"
    outside.write_text(open("examples/rl_tiny.yaml").read())
    assert main(["submit", str(outside), "--no-wait"]) == 1
    assert "inside the uploaded working directory" in capsys.readouterr().err


def test_submit_to_an_unreachable_cluster_fails_with_one_line(capsys, free_tcp_port):
    """A real job client against a port nothing listens on: an error line, not a traceback."""
    address = f"http://127.0.0.1:{free_tcp_port}"
    assert main(["submit", "examples/rl_tiny.yaml", "--address", address, "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("msa submit: error: ") and address in err and "Traceback" not in err


def test_submit_takes_a_relative_output_dir_from_where_it_runs(monkeypatch, capsys):
    """The job runs in Ray's temporary copy of the working directory; its outputs go to the
    output directory as seen from where msa submit ran."""
    import ray.job_submission

    submitted = []

    class Client:  # records the job instead of reaching a cluster
        def __init__(self, address):
            pass

        def submit_job(self, entrypoint, runtime_env):
            submitted.append((entrypoint, runtime_env))
            return "job-1"

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    assert main(["submit", "examples/rl_tiny.yaml", "--set", "run.steps=2", "--no-wait"]) == 0
    (entrypoint, runtime_env), = submitted
    out = Path.cwd().resolve() / "runs" / "rl_tiny"
    assert shlex.split(entrypoint)[-4:] == ["--set", "run.steps=2", "--set", f"run.output_dir={out}"]
    assert runtime_env["working_dir"] == str(Path.cwd().resolve())
    assert f"outputs in {out}" in capsys.readouterr().out
    assert main(["submit", "examples/rl_tiny.yaml", "--set", "run.output_dir=/data/run", "--no-wait"]) == 0
    assert shlex.split(submitted[1][0])[-2:] == ["--set", "run.output_dir=/data/run"]  # absolute: as given


@pytest.mark.parametrize(
    "override,field",
    [
        ("trainer.lr=fast", "trainer.lr"),
        ("rollout.temperature=hot", "rollout.temperature"),
        ("algorithm.kl_coef=null", "algorithm.kl_coef"),
        ("trainer.zero_stage=true", "trainer.zero_stage"),
        ("env.options.lenght=4", "env.options.lenght"),
    ],
)
def test_wrongly_typed_override_fails_with_a_message_naming_the_field(capsys, override, field):
    assert main(["train", "examples/rl_tiny.yaml", "--set", override]) == 1
    err = capsys.readouterr().err
    assert f"'{field}'" in err and "Traceback" not in err


@pytest.mark.parametrize("value,parsed", [("3", 3), ("true", True), ("0.5", 0.5), ("abc", "abc")])
def test_override_values_are_yaml_scalars(value, parsed):
    from msa.rl.cli import _overrides

    assert _overrides([f"run.x={value}"]) == {"run.x": parsed}
