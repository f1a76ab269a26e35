"""The FastAPI app around one ``OpenAIServer``: plain ASGI, testable without Ray Serve.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (all behind the API key
when one is set), GET /health (runs a real engine step), GET /metrics (Prometheus text).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from msa.serve.chat import create_chat_completion
from msa.serve.completions import create_completion
from msa.serve.errors import OpenAIError, install_error_handlers
from msa.serve.metrics import CONTENT_TYPE
from msa.serve.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from msa.serve.server import OpenAIServer, arrival_time

# nginx's code for "client closed the request": nobody reads it, but logs show why it ended.
CLIENT_CLOSED = 499


class GatewayMiddleware:
    """Checks the API key on /v1 before the body is read (so a wrong key is a 401 whatever the
    body), and counts every /v1 answer with an error status."""

    def __init__(self, app: ASGIApp, server: OpenAIServer) -> None:
        self.app, self.server = app, server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        authorization = headers.get(b"authorization", b"").decode("latin-1") or None
        try:
            self.server.check_api_key(authorization)
        except OpenAIError as e:
            self.server.metrics.reject(e.status)
            await e.response()(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.server.metrics.reject(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run ``work``, cancelling it if the client goes away first (its stream's cleanup then aborts
    the engine request). A streamed answer watches for the disconnect itself once it has started."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=CLIENT_CLOSED)
    finally:
        for pending in (task, watcher):
            pending.cancel()


def create_app(server: OpenAIServer, *, owns_engine: bool = False) -> FastAPI:
    """The OpenAI-compatible app serving ``server``'s engine; with ``owns_engine`` the app shuts the
    engine down when it stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if owns_engine:
            await server.engine.shutdown()

    app = FastAPI(
        title="msa: MiniMax-M3 OpenAI-compatible API", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.server = server
    install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, server=server)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        card = ModelCard(id=server.model_name, max_model_len=server.engine.max_context_length)
        return ModelList(data=[card])

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await until_disconnect(request, create_chat_completion(server, body, arrival_time()))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await until_disconnect(request, create_completion(server, body, arrival_time()))

    @app.get("/health")
    async def health() -> dict:
        await server.health()
        return {"status": "ok", "model": server.model_name}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    return app
