"""``msa serve``: start (or join, with RAY_ADDRESS) a Ray cluster and serve the OpenAI-compatible
app on it until Ctrl-C. ``register`` adds the subcommand to the ``msa`` parser."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from msa.platform.config import PRESETS, ConfigError

if TYPE_CHECKING:
    from msa.serve.config import ServeConfig

APP_NAME = "msa"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``msa`` subcommands; its ``run`` default blocks until Ctrl-C."""
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API (Ray Serve)",
        description="Start a local Ray instance (or join the cluster at RAY_ADDRESS) and serve the model at "
        "http://HOST:PORT/v1 (chat/completions, completions, models), with /health and /metrics.",
    )
    p.add_argument(
        "--model",
        default="tiny",
        help=f"checkpoint directory or preset {sorted(PRESETS)} (default: tiny, random weights)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel shards per replica (default: 1)")
    p.add_argument("--sp", type=int, default=1, help="sequence-sharded KV ranks per replica (default: 1)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("MSA_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 (default: a non-empty $MSA_API_KEY, else none)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as 'model' (default: the preset or directory name)",
    )
    p.add_argument("--num-replicas", type=int, default=1, help="engine replicas (default: 1)")
    p.add_argument(
        "--api-servers",
        type=int,
        default=1,
        help="HTTP server processes for the one engine, so many requests at once are parsed and "
        "streamed on several cores (as vLLM's --api-server-count); with replica ingress they listen "
        "on PORT, PORT+1, ..., for a load balancer in front (default: 1)",
    )
    p.add_argument(
        "--ingress",
        choices=("replica", "proxy"),
        default=None,
        help="replica: the replicas serve HTTP themselves on PORT.. (Ray Serve's throughput-optimized "
        "direct ingress; no hop through the proxy); proxy: Serve's HTTP proxy on PORT, which spreads "
        "requests over the replicas (default: replica when starting a local Ray with one replica, "
        "else proxy)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=1024,
        help="queued sequences per replica before requests get 429 (default: 1024)",
    )
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences batched per step (default: 64)")
    p.add_argument(
        "--num-pages",
        type=int,
        default=None,
        help="KV pages per shard (default: sized from GPU memory; 1024 on the CPU)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default=None,
        help="default: cuda when the cluster has GPUs, else cpu",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="default: bfloat16 on GPUs, float32 on the CPU",
    )
    p.set_defaults(run=run_serve)


def app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``build_app`` arguments (``ServeConfig`` fields) given by the flags; unset ones are left out."""
    values = {
        "model": args.model,
        "tp": args.tp,
        "sp": args.sp,
        "api_key": args.api_key,
        "served_model_name": args.served_model_name,
        "num_replicas": args.num_replicas,
        "api_servers": args.api_servers,
        "max_waiting": args.max_waiting,
        "max_num_seqs": args.max_num_seqs,
        "num_pages": args.num_pages,
        "device": args.device,
        "dtype": args.dtype,
    }
    return {name: value for name, value in values.items() if value is not None}


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        # As the HTTP servers bind: a port left in TIME_WAIT is free to them.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound ({exc.strerror})"
            raise ConfigError(f"--port {port} {reason} on {host}") from None


def check_before_start(args: argparse.Namespace, config: ServeConfig, *, local_ray: bool) -> None:
    """Raise ConfigError, naming the flag, for flags that would otherwise fail only inside Ray
    (in its controller's log). The port's availability, the GPU and a checkpoint directory are
    checked only for a Ray started here: a cluster at RAY_ADDRESS may hold them on other nodes."""
    from msa.cluster.parallel import check_parallel_shape
    from msa.platform.cli import check_device

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if local_ray:
        _check_port_free(args.host, args.port)
        check_device(config.device)
    if local_ray or config.model in PRESETS:
        model = config.model_config()  # only the config: no weights are read
        try:
            check_parallel_shape(model, config.tp)
        except ConfigError as exc:
            raise ConfigError(f"--tp {config.tp}: {exc}") from None


def check_resources(config: ServeConfig, cluster: dict[str, float]) -> None:
    """ConfigError, naming the flags, when ``cluster`` (Ray's resources) cannot hold what the
    application reserves; Serve would otherwise wait for them, with the cause in its log."""
    demand = config.resource_demand()
    short = [k for k in ("CPU", "GPU") if demand[k] > cluster.get(k, 0)]
    if short:
        wants = ", ".join(f"{demand[k]:g} {k}s" for k in short)
        has = ", ".join(f"{cluster.get(k, 0):g}" for k in short)
        raise ConfigError(
            f"--api-servers {config.api_servers}, --num-replicas {config.num_replicas}, --tp {config.tp} "
            f"and --sp {config.sp} on {config.device} reserve {wants}, but this Ray cluster has {has}"
        )


def run_serve(args: argparse.Namespace) -> int:
    from msa.cluster.shard import free_port
    from msa.serve.config import ServeConfig
    from msa.serve.ingress import replica_http_ports, replica_ingress_env

    config_args = app_args(args)
    config = ServeConfig.from_args(config_args)  # bad flags fail here, before Ray starts
    joined = bool(os.environ.get("RAY_ADDRESS"))
    check_before_start(args, config, local_ray=not joined)
    ingress = args.ingress or ("proxy" if joined or args.num_replicas > 1 else "replica")
    proxy_port = args.port
    if ingress == "replica":
        if joined:
            raise ConfigError(
                "--ingress replica needs a Ray started here: a cluster at RAY_ADDRESS keeps the ingress "
                "its nodes started with (RAY_SERVE_THROUGHPUT_OPTIMIZED=1 there gives replica ingress)"
            )
        # Read by Ray Serve's processes when they start: set before Ray starts.
        os.environ.update(replica_ingress_env(args.port, config.deployment_replicas))
        proxy_port = free_port(args.host)  # Serve still runs its proxy; the replicas take PORT

    import ray
    from ray import serve

    from msa.serve.app import build_app

    ray.init(**({} if joined else {"include_dashboard": False}))
    if not joined:
        try:
            cluster = ray.cluster_resources()
            check_resources(config.resolved(cluster.get("GPU", 0)), cluster)
        except ConfigError:
            ray.shutdown()
            raise
    # After ray.init, whose core worker would otherwise abort the process on SIGTERM: SIGTERM (docker
    # stop, kill) stops like Ctrl-C, and so does SIGINT when a non-interactive shell had ignored it.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        serve.start(http_options={"host": args.host, "port": proxy_port})
        serve.run(build_app(config_args), name=APP_NAME, route_prefix="/")
        name = config.model_name
        urls = [f"http://{args.host}:{proxy_port}/v1"]
        if ingress == "replica":
            urls = [f"http://{args.host}:{port}/v1" for port in replica_http_ports(APP_NAME)]
            print(f"msa serve: the replicas serve HTTP; Serve's proxy is at :{proxy_port}", flush=True)
        print(f"msa serve: '{name}' is ready at {', '.join(urls)} (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("msa serve: stopping", file=sys.stderr, flush=True)
    finally:
        # On a joined cluster only this app goes; a cluster started here goes with it.
        if joined:
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m msa.serve.cli serve ...``: the subcommand on its own."""
    from msa.platform.cli import run_subcommand

    parser = argparse.ArgumentParser(prog="msa")
    register(parser.add_subparsers(dest="command", required=True))
    return run_subcommand(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
