"""Where HTTP clients connect: Serve's HTTP proxy, or the replicas' own HTTP servers.

Through the proxy every request and every streamed chunk crosses one more process (the proxy, then a
Ray call to the replica). Ray Serve's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED``)
turns on direct ingress instead: each ingress replica serves HTTP itself, on a port from a range
this module pins, with the request handling on the replica's own event loop. These switches are
read when Ray Serve's processes start, so they go into the environment before Ray starts.
"""

from __future__ import annotations

import os

THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
DIRECT_INGRESS = "RAY_SERVE_ENABLE_DIRECT_INGRESS"
MIN_PORT = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
MAX_PORT = "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"
MIN_DRAINING = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


def replica_ingress_env(port: int, num_replicas: int) -> dict[str, str]:
    """The environment for replicas that listen on ``port`` .. ``port + num_replicas - 1`` themselves."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    # Serve hands out ports from [min, max): one per replica, lowest first. A stopping replica
    # otherwise keeps its port open for a minimum drain (30 s) so a load balancer can take it out
    # of rotation first; these replicas stop only with the whole server, so they stop at once
    # (each still finishes its requests in flight, up to the deployment's graceful shutdown timeout).
    return {
        THROUGHPUT_OPTIMIZED: "1",
        MIN_PORT: str(port),
        MAX_PORT: str(port + num_replicas),
        MIN_DRAINING: "0",
    }


def direct_ingress(env: dict[str, str] | None = None) -> bool:
    """Whether Serve started with ``env`` (default: this process's) has replicas serving HTTP."""
    env = os.environ if env is None else env
    return env.get(DIRECT_INGRESS, env.get(THROUGHPUT_OPTIMIZED, "0")) == "1"


def replica_http_ports(app_name: str) -> list[int]:
    """The HTTP ports of ``app_name``'s running ingress replicas (direct ingress; else the proxies').
    Asked of Serve's controller, whose target groups the dashboard also reports
    (``/api/serve/applications/``); ``msa serve`` runs without the dashboard."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    groups = ray.get(_get_global_client()._controller.get_target_groups.remote(app_name))
    return sorted(t.port for g in groups if g.protocol == RequestProtocol.HTTP for t in g.targets)
