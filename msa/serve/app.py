"""The Ray Serve application: ``build_app(args)`` for ``serve run msa.serve.app:build_app``.

Each replica creates its engine and awaits its start, then serves ``create_app`` around it. By
default a GPU engine runs in an actor of its own (``RemoteEngine``), so the replica's process only
serves HTTP; otherwise (``engine_process: false``, or a CPU engine) the replica runs ``MSAEngine``
itself. Either way the engine places its own shard actors when it has several. The FastAPI app is
built on the replica, after the engine is up (``serve.ingress`` in its late-bound form), because its
routes close over that engine.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from msa.cluster.engine import MSAEngine
from msa.cluster.protocol import Engine, EngineDeadError
from msa.cluster.remote import RemoteEngine
from msa.serve.api import create_app
from msa.serve.config import ServeConfig
from msa.serve.server import OpenAIServer

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "MSAOpenAIServer"
API_KEY_ENV = "MSA_API_KEY"


@serve.ingress()
class OpenAIDeployment:
    """One replica: an engine and the OpenAI app around it."""

    async def __init__(self, config: ServeConfig) -> None:
        self.config = config
        engine_config = config.engine_config()
        if config.runs_engine_process:
            self.engine: Engine = RemoteEngine(engine_config, config.engine_actor_options())
        else:
            self.engine = MSAEngine(engine_config)
        await self.engine.start()
        # Deployed from a manifest, the key comes from the node's environment (a Kubernetes Secret).
        api_key = config.api_key or os.environ.get(API_KEY_ENV) or None
        self.server = OpenAIServer(
            self.engine,
            self.engine.tokenizer,
            model_name=config.model_name,
            api_key=api_key,
            health_timeout_s=engine_config.health_timeout_s,
        )
        log.info(
            "serving %s as '%s' (tp=%d, sp=%d, %s)",
            config.model,
            config.model_name,
            config.tp,
            config.sp,
            engine_config.device,
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.server, owns_engine=True)

    async def check_health(self) -> None:
        """Serve's periodic replica check: cheap, from the engine's own state (GET /health runs a step)."""
        if not self.engine.stats().healthy:
            raise EngineDeadError("the engine reports unhealthy")


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder. ``args`` are ``ServeConfig`` fields: model, tp, sp, api_key,
    served_model_name, max_waiting, device, num_pages, num_replicas, ... ."""
    config = ServeConfig.from_args(dict(args))
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if config.device is None and not ray.is_initialized():
        log.warning("Ray is not initialized yet; device defaults to cpu unless 'device' is given")
    config = config.resolved(cluster_gpus)
    deployment = serve.deployment(
        OpenAIDeployment,
        name=DEPLOYMENT_NAME,
        num_replicas=config.num_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=config.replica_actor_options(),
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
    )
    return deployment.bind(config)
