"""``msa serve``: flags to application args, and the command itself serving until Ctrl-C."""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from msa.cluster.shard import free_port
from msa.serve.cli import app_args, register

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="msa")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_flags_become_build_app_args():
    args = parse(["serve", "--model", "m3_proxy", "--tp", "2", "--sp", "4", "--port", "9000",
                  "--api-key", "k", "--served-model-name", "m3"])
    assert app_args(args) == {"model": "m3_proxy", "tp": 2, "sp": 4, "api_key": "k",
                              "served_model_name": "m3", "num_replicas": 1, "api_servers": 1,
                              "max_waiting": 1024,
                              "max_num_seqs": 64}
    assert (args.host, args.port, args.command) == ("127.0.0.1", 9000, "serve")


def test_defaults_serve_tiny_without_a_key(monkeypatch):
    monkeypatch.delenv("MSA_API_KEY", raising=False)
    args = parse(["serve"])
    assert app_args(args)["model"] == "tiny" and "api_key" not in app_args(args)


@pytest.mark.parametrize("env, key", [("", None), ("s3cret", "s3cret")])
def test_api_key_comes_from_a_non_empty_environment_variable(monkeypatch, env, key):
    """An empty MSA_API_KEY means no key, as in the deployed app, not a key the config refuses."""
    from msa.serve.config import ServeConfig

    monkeypatch.setenv("MSA_API_KEY", env)
    args = parse(["serve"])
    assert args.api_key == key
    assert ServeConfig.from_args(app_args(args)).api_key == key


def test_bad_flag_values_are_rejected_before_ray_starts():
    from msa.platform.config import ConfigError
    from msa.serve.cli import run_serve

    with pytest.raises(ConfigError, match="tp"):
        run_serve(parse(["serve", "--tp", "0"]))


def check(argv: list[str], *, local_ray: bool = True) -> None:
    """``msa serve``'s checks before Ray starts, on a free port unless ``argv`` names one."""
    from msa.serve.cli import check_before_start
    from msa.serve.config import ServeConfig

    argv = argv if "--port" in argv else [*argv, "--port", str(free_port())]
    args = parse(["serve", *argv])
    check_before_start(args, ServeConfig.from_args(app_args(args)), local_ray=local_ray)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_a_port_out_of_range_is_rejected_before_ray_starts(port):
    from msa.platform.config import ConfigError
    from msa.serve.cli import run_serve

    with pytest.raises(ConfigError, match=rf"^--port must be in 1\.\.65535, got {port}$"):
        run_serve(parse(["serve", "--port", str(port)]))


def test_a_port_in_use_is_rejected_when_ray_starts_here():
    import socket

    from msa.platform.config import ConfigError

    port = free_port()
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        with pytest.raises(ConfigError, match=f"^--port {port} is in use on 127.0.0.1$"):
            check(["--port", str(port)])
        check(["--port", str(port)], local_ray=False)  # a joined cluster binds it on its own nodes
    check(["--port", str(port)])


def test_a_missing_model_directory_says_so(tmp_path):
    from msa.platform.config import ConfigError

    missing = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="'model' .*: no such directory"):
        check(["--model", missing])
    with pytest.raises(ConfigError, match="'model' must be a directory holding config.json"):
        check(["--model", str(tmp_path)])
    check(["--model", missing], local_ray=False)  # it may exist only on the cluster's GPU nodes


def test_tp_must_divide_the_models_kv_heads(tmp_path):
    import json

    from msa.platform.config import ConfigError, tiny

    with pytest.raises(ConfigError, match=r"^--tp 3: .*num_key_value_heads \(2\)"):
        check(["--tp", "3"])
    with pytest.raises(ConfigError, match="^--tp 3: "):
        check(["--tp", "3"], local_ray=False)  # a preset is known without the cluster's nodes
    (tmp_path / "config.json").write_text(json.dumps(tiny().to_dict()))  # a config, no weights
    check(["--model", str(tmp_path), "--tp", "2"])
    with pytest.raises(ConfigError, match="^--tp 4: .*num_key_value_heads"):
        check(["--model", str(tmp_path), "--tp", "4"])


def test_device_cuda_without_a_gpu_is_rejected_before_ray_starts(monkeypatch):
    import torch

    from msa.platform.config import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="^--device cuda: no CUDA device is available here$"):
        check(["--device", "cuda"])


def test_replica_ingress_needs_a_ray_started_here(monkeypatch):
    from msa.platform.config import ConfigError
    from msa.serve.cli import run_serve

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # never reached: refused before Ray starts
    with pytest.raises(ConfigError, match="--ingress replica needs a Ray started here"):
        run_serve(parse(["serve", "--ingress", "replica"]))


def serve_env() -> dict[str, str]:
    """The environment of an ``msa serve`` process that starts its own Ray, from this checkout."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_SERVE_")}
    return {**env, "PYTHONPATH": str(ROOT)}


def test_api_servers_beyond_the_machines_cpus_fail_at_start():
    """A local Ray cluster gets this machine's CPUs; 512 API servers cannot be placed, and msa serve
    says so and exits instead of waiting on Serve."""
    env = serve_env()
    command = [sys.executable, "-m", "msa.platform.cli", "serve", "--port", str(free_port())]
    command += ["--api-servers", "512"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stderr
    assert "--api-servers 512" in done.stderr and "reserve 513 CPUs, but this Ray cluster has" in done.stderr


def test_free_port_gives_a_run_of_free_ports_for_the_api_servers():
    import socket

    first = free_port(count=3)
    held = []
    try:
        for port in range(first, first + 3):  # each binds: nothing listens on any of them
            held.append(socket.socket())
            held[-1].bind(("127.0.0.1", port))
    finally:
        for s in held:
            s.close()


def test_replica_ingress_pins_the_replicas_ports():
    from msa.serve.ingress import direct_ingress, replica_ingress_env

    env = replica_ingress_env(8000, 3)
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] == "8000"
    assert env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] == "8003"  # exclusive
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"  # they stop with the server
    assert direct_ingress(env) and not direct_ingress({})
    assert not direct_ingress({**env, "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"})  # Ray's own override
    with pytest.raises(ValueError, match="num_replicas"):
        replica_ingress_env(8000, 0)


@pytest.mark.parametrize(
    ("stop_signal", "ingress"),
    [(signal.SIGINT, "replica"), (signal.SIGTERM, "proxy")],
    ids=["ctrl-c-replica-ingress", "sigterm-proxy-ingress"],
)
def test_msa_serve_answers_a_chat_request_and_stops_cleanly(tmp_path, stop_signal, ingress):
    """PORT answers: the replica's own HTTP server (the default) or Serve's proxy."""
    port = free_port()
    env = serve_env()
    command = [sys.executable, "-m", "msa.serve.cli", "serve", "--port", str(port), "--num-pages", "256"]
    command += [] if ingress == "replica" else ["--ingress", "proxy"]
    log = tmp_path / "serve.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "is ready at" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(1)
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=30).status_code == 200
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 4}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        proc.send_signal(stop_signal)
        stopping = time.monotonic()
        proc.wait(timeout=90)
    output = log.read_text()
    assert proc.returncode == 0, output
    # Within the 30 s a replica's port used to stay open for a load balancer to drain it.
    assert time.monotonic() - stopping < 30, output
    assert f"is ready at http://127.0.0.1:{port}/v1 " in output and "stopping" in output
    assert ("the replicas serve HTTP" in output) == (ingress == "replica")
