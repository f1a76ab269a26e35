"""The Ray Serve application: ``build_app(args)`` for ``serve run msa.serve.app:build_app``.

Each replica creates its engine and awaits its start, then serves ``create_app`` around it. By
default a GPU engine runs in an actor of its own (``RemoteEngine``), so the replica's process only
serves HTTP; otherwise (``engine_process: false``, or a CPU engine) the replica runs ``MSAEngine``
itself. Either way the engine places its own shard actors when it has several. With
``api_servers`` > 1 the replicas are API servers of one engine: it runs in a deployment-scoped
actor (Serve starts it before the replicas and stops it with the deployment) and each replica
connects to it. The FastAPI app is built on the replica, after the engine is up (``serve.ingress``
in its late-bound form), because its routes close over that engine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.config import DeploymentActorConfig

from msa.cluster.engine import MSAEngine
from msa.cluster.protocol import Engine, EngineDeadError
from msa.cluster.remote import ENGINE_CORE_CONCURRENCY, EngineCore, RemoteEngine
from msa.serve.api import create_app
from msa.serve.config import ServeConfig
from msa.serve.server import OpenAIServer

log = logging.getLogger(__name__)

DEPLOYMENT_NAME = "MSAOpenAIServer"
API_KEY_ENV = "MSA_API_KEY"
ENGINE_ACTOR = "engine"  # the API servers' shared engine (deployment-scoped actor)
# How long a replica waits for the shared engine's name to resolve (it is started before the
# replicas, and is briefly unresolvable while Serve recreates it).
ENGINE_LOOKUP_TIMEOUT_S = 60.0


class SharedEngineCore(EngineCore):
    """``EngineCore`` as the deployment-scoped actor of the API servers. Serve pickles such an
    actor's class with its module by value; as a subclass here, ``msa.cluster.remote``, whose
    message classes cross the connections, stays imported by name in the actor's process."""


async def shared_engine_actor() -> Any:
    deadline = time.monotonic() + ENGINE_LOOKUP_TIMEOUT_S
    while True:
        try:
            return serve.get_deployment_actor(ENGINE_ACTOR)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


@serve.ingress()
class OpenAIDeployment:
    """One replica: an engine and the OpenAI app around it."""

    async def __init__(self, config: ServeConfig) -> None:
        self.config = config
        engine_config = config.engine_config()
        if config.shares_engine:
            self.engine: Engine = RemoteEngine(engine_config, actor=await shared_engine_actor())
        elif config.runs_engine_process:
            self.engine = RemoteEngine(engine_config, config.engine_actor_options())
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
    served_model_name, max_waiting, device, num_pages, num_replicas, api_servers, ... ."""
    config = ServeConfig.from_args(dict(args))
    cluster_gpus = ray.cluster_resources().get("GPU", 0) if ray.is_initialized() else 0
    if config.device is None and not ray.is_initialized():
        log.warning("Ray is not initialized yet; device defaults to cpu unless 'device' is given")
    config = config.resolved(cluster_gpus)
    shared: dict[str, Any] = {}
    if config.shares_engine:
        engine = DeploymentActorConfig(
            name=ENGINE_ACTOR,
            actor_class=ray.remote(SharedEngineCore),
            init_args=(config.engine_config(),),
            actor_options={**config.engine_actor_options(), "max_concurrency": ENGINE_CORE_CONCURRENCY},
        )
        shared["deployment_actors"] = [engine]
    deployment = serve.deployment(
        OpenAIDeployment,
        name=DEPLOYMENT_NAME,
        num_replicas=config.deployment_replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        ray_actor_options=config.replica_actor_options(),
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=20,
        **shared,
    )
    return deployment.bind(config)
