"""The app around a real in-process ``MSAEngine`` on the tiny preset, and helpers shared by the
in-process and the Ray Serve tests."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from msa.cluster.engine import EngineConfig, MSAEngine
from msa.cluster.protocol import SamplingParams, TokenOutput
from msa.platform.tokenizer import Tokenizer
from msa.serve.api import create_app
from msa.serve.schemas import new_id
from msa.serve.server import OpenAIServer

API_KEY = "test-key"
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def tiny_engine(**overrides) -> MSAEngine:
    fields = {"model": "tiny", "num_pages": 256, "max_num_seqs": 16, "max_num_batched_tokens": 256}
    return MSAEngine(EngineConfig(**(fields | overrides)))


def chat_prompt_tokens(messages: list[dict], tools: list[dict] | None = None, prefill: str = "") -> int:
    tok = Tokenizer.byte_level_default()
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    return len(tok.encode(text + prefill))


def engine_outputs(app_client, prompt: list[int], params: SamplingParams) -> list[TokenOutput]:
    """The engine's own outputs for a request, bypassing the HTTP layer."""

    async def collect() -> list[TokenOutput]:
        return [out async for out in app_client.engine.generate(new_id("direct"), prompt, params)]

    return app_client.client.portal.call(collect)


def sse_events(text: str) -> list[dict | str]:
    """The data payloads of an SSE body; "[DONE]" stays a string."""
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def assert_error(response, status: int, param: str | None = "unset") -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param != "unset":
        assert error["param"] == param
    return error


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def app_client():
    """A TestClient on the app; the engine runs on the client's event loop."""
    engine = tiny_engine()
    server = OpenAIServer(engine, Tokenizer.byte_level_default(), model_name="tiny", api_key=API_KEY)
    app = create_app(server, owns_engine=True)
    with TestClient(app, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        client.portal.call(engine.start)
        yield SimpleNamespace(client=client, engine=engine, server=server, app=app)


async def call_then_disconnect(app, path: str, body: dict, after_body_messages: int) -> list[dict]:
    """Drive the ASGI app directly: send ``body``, then report a client disconnect once the app
    has sent ``after_body_messages`` body messages (0: right after the request)."""
    sent: list[dict] = []
    enough = asyncio.Event()
    if after_body_messages == 0:
        enough.set()
    requested = False

    async def receive() -> dict:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await enough.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        bodies = sum(m["type"] == "http.response.body" for m in sent)
        if bodies >= after_body_messages:
            enough.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {API_KEY}".encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    await asyncio.wait_for(app(scope, receive, send), 120)
    return sent
