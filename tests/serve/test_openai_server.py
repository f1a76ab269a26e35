"""The official ``openai`` client against a real Ray Serve app (``build_app`` on the tiny preset)
listening on 127.0.0.1: the same requests a user sends, over HTTP, through Serve's proxy."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import ray
from ray import serve

from msa.cluster.shard import free_port
from msa.serve.app import build_app
from tests.serve.conftest import (
    API_KEY,
    TOOLS,
    USER,
    assert_error,
    chat_prompt_tokens,
    wait_until,
)


@pytest.fixture(scope="module")
def base_url():
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({"model": "tiny", "num_pages": 512, "api_key": API_KEY, "max_num_seqs": 32,
                         "engine": {"max_num_batched_tokens": 512}})
        serve.run(app, name="msa", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def engine_gauge(base_url: str, name: str) -> float:
    for line in httpx.get(f"{base_url}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_chat_whole_and_streamed(client):
    whole = client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, seed=7,
                                           logprobs=True, top_logprobs=2)
    assert whole.usage.prompt_tokens == chat_prompt_tokens(USER)
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 2 for entry in whole.choices[0].logprobs.content)
    chunks = list(client.chat.completions.create(model="tiny", messages=USER, max_tokens=8, seed=7,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content


def test_completions_whole_and_streamed_with_logprobs(client):
    whole = client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, n=2, logprobs=1, seed=3)
    assert whole.usage.prompt_tokens == 1 + len("Once upon")
    assert sum(len(c.logprobs.tokens) for c in whole.choices) == whole.usage.completion_tokens
    streamed = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=6, n=2, seed=3,
                                              stream=True))
    for index in (0, 1):
        text = "".join(c.choices[0].text for c in streamed if c.choices[0].index == index)
        assert text == whole.choices[index].text


def test_tools_reach_the_prompt_and_tool_choice_none_keeps_them_out(client):
    auto = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, max_tokens=1)
    assert auto.usage.prompt_tokens == chat_prompt_tokens(USER, TOOLS)
    none = client.chat.completions.create(model="tiny", messages=USER, tools=TOOLS, tool_choice="none",
                                          max_tokens=1)
    assert none.usage.prompt_tokens == chat_prompt_tokens(USER)
    named = client.chat.completions.create(
        model="tiny", messages=USER, tools=TOOLS, max_tokens=2,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    # Two random tokens cannot complete the arguments: the cut call is returned as content.
    assert named.choices[0].message.tool_calls is None
    assert named.choices[0].message.content.startswith('<tool_call>{"name": "get_weather"')


def test_concurrent_requests(client):
    def one(i: int):
        messages = [{"role": "user", "content": "q" * (i + 1)}]
        return client.chat.completions.create(model="tiny", messages=messages, max_tokens=5 + i % 3, seed=i)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(12)))
    for i, r in enumerate(results):
        assert r.usage.prompt_tokens == chat_prompt_tokens([{"role": "user", "content": "q" * (i + 1)}])
        assert r.usage.completion_tokens <= 5 + i % 3


def test_client_disconnect_mid_stream_frees_the_kv_pages(base_url):
    body = {"model": "tiny", "messages": USER, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.status_code == 200
        lines = 0
        for line in r.iter_lines():
            lines += bool(line)
            if lines == 5:
                assert engine_gauge(base_url, "msa_kv_pages_used") > 0
                break
    assert wait_until(lambda: engine_gauge(base_url, "msa_kv_pages_used") == 0, timeout=10)
    assert engine_gauge(base_url, "msa_requests_running") == 0


def test_client_giving_up_on_a_whole_response_frees_the_kv_pages(base_url):
    body = {"model": "tiny", "messages": USER, "max_tokens": 2000, "ignore_eos": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers, timeout=1.5)
    assert wait_until(lambda: engine_gauge(base_url, "msa_kv_pages_used") == 0, timeout=10)
    assert engine_gauge(base_url, "msa_requests_running") == 0


@pytest.mark.parametrize("body, status, param", [
    ({"model": "tiny"}, 400, "messages"),
    ({"model": "tiny", "messages": USER, "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": USER, "n": 100000}, 400, "n"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "nope", "messages": USER}, 404, "model"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "z" * 3000}]}, 400, "messages"),
], ids=["missing", "negative-max", "wrong-type", "huge-n", "empty", "unknown-model", "oversize"])
def test_bad_inputs_through_serve(base_url, client, body, status, param):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    assert_error(httpx.post(f"{base_url}/v1/chat/completions", json=body, headers=headers), status, param)
    after = client.chat.completions.create(model="tiny", messages=USER, max_tokens=2)
    assert after.usage.completion_tokens >= 1


def test_malformed_json_and_keys_through_serve(base_url, client):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    bad_json = b'{"model": "tiny", "messages": [}'
    r = httpx.post(f"{base_url}/v1/chat/completions", content=bad_json, headers=headers)
    assert assert_error(r, 400, None)["code"] == "invalid_json"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert_error(httpx.get(f"{base_url}/v1/models"), 401)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="other", messages=USER, max_tokens=2)
    assert info.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=USER, max_tokens=100_000)
    assert info.value.body["code"] == "context_length_exceeded"
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_health_and_metrics_through_serve(base_url, client):
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    client.chat.completions.create(model="tiny", messages=USER, max_tokens=3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="unknown", messages=USER, max_tokens=3)
    text = httpx.get(f"{base_url}/metrics").text
    assert 'msa_rejected_requests_total{model="tiny",status="404"}' in text
    for name in ("msa_time_to_first_token_seconds_bucket", "msa_inter_token_latency_seconds_bucket",
                 "msa_e2e_request_latency_seconds_bucket", "msa_request_queue_time_seconds_bucket",
                 "msa_kv_pages_total", "msa_requests_waiting", "msa_rejected_requests_total"):
        assert name in text, name
    assert json.loads(httpx.get(f"{base_url}/health").text)["model"] == "tiny"


def shard_pages_used(base_url: str, model: str) -> list[float]:
    prefix = f'msa_kv_pages_used{{model="{model}",shard='
    return [float(line.split()[-1]) for line in httpx.get(f"{base_url}/metrics").text.splitlines()
            if line.startswith(prefix)]


def test_sequence_sharded_replica_through_serve(base_url):
    """sp=2: the replica's engine places two shard actors; a disconnect frees pages on both."""
    serve.run(build_app({"model": "tiny", "sp": 2, "num_pages": 256, "served_model_name": "tiny-sp2",
                         "api_key": API_KEY}), name="msa-sp2", route_prefix="/sp2")
    try:
        url = f"{base_url}/sp2"
        sharded = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        r = sharded.chat.completions.create(model="tiny-sp2", messages=USER, max_tokens=6, logprobs=True)
        assert r.usage.prompt_tokens == chat_prompt_tokens(USER)
        assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
        body = {"model": "tiny-sp2", "messages": USER, "max_tokens": 2000, "ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i == 20:
                    break
        assert wait_until(lambda: shard_pages_used(url, "tiny-sp2") == [0, 0], timeout=10)
    finally:
        serve.delete("msa-sp2")


@pytest.mark.parametrize("api_servers", [1, 2], ids=["own-engine-actor", "two-api-servers-share-one"])
def test_engine_in_its_own_process_through_serve(base_url, api_servers):
    """engine_process on: the engine runs in an actor beside the replica (RemoteEngine); streaming,
    usage and a disconnect that frees the pages work the same. With two API servers both replicas
    serve, over one engine: Serve's deployment-scoped actor, the app's only named actor besides
    the replicas."""
    serve.run(build_app({"model": "tiny", "num_pages": 256, "served_model_name": "tiny-proc",
                         "api_key": API_KEY, "engine_process": True, "api_servers": api_servers,
                         "replica_num_cpus": 0.5}), name="msa-proc", route_prefix="/proc")
    try:
        replicas = serve.status().applications["msa-proc"].deployments["MSAOpenAIServer"].replica_states
        assert replicas == {"RUNNING": api_servers}
        named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if "msa-proc" in a["name"] and not a["name"].startswith("SERVE_REPLICA")]
        assert len(named) == (api_servers > 1)
        url = f"{base_url}/proc"
        own = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        chunks = list(own.chat.completions.create(model="tiny-proc", messages=USER, max_tokens=5,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].usage.completion_tokens == 5
        # Concurrent requests spread over the API servers; each gets its own whole answer.
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda seed: own.completions.create(
                model="tiny-proc", prompt=f"story {seed}", max_tokens=7, seed=seed), range(6)))
        assert [a.usage.completion_tokens for a in answers] == [7] * 6
        assert len({a.id for a in answers}) == 6
        body = {"model": "tiny-proc", "messages": USER, "max_tokens": 2000, "ignore_eos": True,
                "stream": True}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as s:
            for i, _ in enumerate(s.iter_lines()):
                if i == 20:
                    break
        assert wait_until(lambda: shard_pages_used(url, "tiny-proc") == [0], timeout=10)
    finally:
        serve.delete("msa-proc")
