"""The FastAPI app around an in-process MSAEngine (tiny preset): responses, streaming, usage,
logprobs, batched prompts, tools, errors, disconnects, health and metrics."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from msa.cluster.output import ChoiceStream
from msa.cluster.protocol import SamplingParams
from msa.platform.tokenizer import Tokenizer
from msa.serve.api import create_app
from msa.serve.chat import ChatChoice
from msa.serve.schemas import NamedToolChoice
from msa.serve.server import OpenAIServer
from msa.serve.tools import tool_call_prefill
from tests.serve.conftest import (
    TOOLS,
    USER,
    assert_error,
    call_then_disconnect,
    chat_prompt_tokens,
    engine_outputs,
    sse_events,
    tiny_engine,
    wait_until,
)


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, **body})


def test_chat_usage_counts_tokens_and_logprobs_cover_every_token(app_client):
    r = chat(app_client.client, max_tokens=7, seed=3, logprobs=True, top_logprobs=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    usage = body["usage"]
    assert usage["prompt_tokens"] == chat_prompt_tokens(USER)
    entries = choice["logprobs"]["content"]
    assert len(entries) == usage["completion_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 7
    assert all(len(e["top_logprobs"]) == 3 and e["logprob"] <= 0 for e in entries)
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)


def test_stream_matches_the_whole_response_for_a_seed(app_client):
    params = {"max_tokens": 12, "seed": 11, "temperature": 1.0, "n": 2}
    whole = chat(app_client.client, **params).json()
    r = chat(app_client.client, stream=True, stream_options={"include_usage": True}, **params)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] == whole["choices"][index]["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])
        text = "".join(c["delta"].get("content") or "" for c in mine)
        assert text == whole["choices"][index]["message"]["content"]


def test_completions_with_token_ids_n_stop_and_legacy_logprobs(app_client):
    prompt = [72, 101, 108, 108, 111]
    r = app_client.client.post("/v1/completions", json={
        "model": "tiny", "prompt": prompt, "max_tokens": 6, "n": 3, "logprobs": 2, "seed": 5, "stop": ["\n"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == len(prompt)
    counted = sum(len(c["logprobs"]["tokens"]) for c in body["choices"])
    assert body["usage"]["completion_tokens"] == counted
    for c in body["choices"]:
        lp = c["logprobs"]
        assert len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
        assert all(len(top) <= 3 for top in lp["top_logprobs"])  # the sampled token + 2 alternatives
        assert "\n" not in c["text"]


def test_completion_stream_of_a_text_batch(app_client):
    r = app_client.client.post("/v1/completions", json={
        "model": "tiny", "prompt": ["ab", "cde"], "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == (1 + 2) + (1 + 3)  # each text prompt starts with <bos>
    finished = {c["choices"][0]["index"] for c in events[:-2] if c["choices"][0]["finish_reason"]}
    assert finished == {0, 1}


def test_tools_are_rendered_only_when_a_tool_may_be_called(app_client):
    with_tools = chat(app_client.client, tools=TOOLS, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert with_tools == chat_prompt_tokens(USER, TOOLS)
    without = chat(app_client.client, tools=TOOLS, tool_choice="none", max_tokens=1).json()
    assert without["usage"]["prompt_tokens"] == chat_prompt_tokens(USER)


def test_named_tool_choice_prefills_the_call_and_a_cut_call_stays_content(app_client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(app_client.client, tools=TOOLS, tool_choice=choice, max_tokens=1, seed=1)
    body = r.json()
    prefill = tool_call_prefill(NamedToolChoice(function={"name": "get_weather"}))
    assert body["usage"]["prompt_tokens"] == chat_prompt_tokens(USER, TOOLS, prefill)
    message = body["choices"][0]["message"]
    assert "tool_calls" not in message and body["choices"][0]["finish_reason"] == "length"
    assert message["content"].startswith('<tool_call>{"name": "get_weather", "arguments": ')


TOO_LONG = "context_length_exceeded"


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "tiny"}, 400, "messages", "missing"),
    ({"model": "tiny", "messages": USER, "max_tokens": -3}, 400, "max_tokens", "greater_than_equal"),
    ({"model": "tiny", "messages": USER, "n": 10**6}, 400, "n", "less_than_equal"),
    ({"model": "tiny", "messages": []}, 400, "messages", "too_short"),
    ({"model": "tiny", "messages": "hello"}, 400, "messages", "list_type"),
    ({"model": "tiny", "messages": USER, "temperature": "hot"}, 400, "temperature", "float_parsing"),
    ({"model": "gpt-4", "messages": USER}, 404, "model", "model_not_found"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 5000}]}, 400, "messages", TOO_LONG),
    ({"model": "tiny", "messages": USER, "max_tokens": 4000}, 400, "max_tokens", TOO_LONG),
], ids=["missing", "negative-max", "huge-n", "empty", "wrong-type", "bad-float", "unknown-model",
        "oversize-prompt", "prompt-plus-max-too-long"])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(app_client, body, status, param, code):
    error = assert_error(app_client.client.post("/v1/chat/completions", json=body), status, param)
    assert error["code"] == code
    assert chat(app_client.client, max_tokens=2).status_code == 200


def test_oversize_prompt_message_gives_both_numbers(app_client):
    messages = [{"role": "user", "content": "y" * 2000}]
    error = assert_error(chat(app_client.client, messages=messages, max_tokens=10), 400, "messages")
    assert str(app_client.engine.max_context_length) in error["message"]
    assert str(chat_prompt_tokens(messages)) in error["message"]


def test_malformed_json_wrong_key_and_no_key(app_client):
    c = app_client.client
    error = assert_error(c.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                                headers={"content-type": "application/json"}), 400, None)
    assert error["code"] == "invalid_json"
    assert_error(c.post("/v1/chat/completions", json={"model": "tiny", "messages": USER},
                        headers={"Authorization": "Bearer nope"}), 401)
    no_key = c.build_request("GET", "/v1/models")
    del no_key.headers["authorization"]
    assert_error(c.send(no_key), 401)
    assert c.get("/v1/models").json()["data"][0]["id"] == "tiny"


def test_disconnect_mid_stream_aborts_and_frees_pages(app_client):
    body = {"model": "tiny", "messages": USER, "max_tokens": 900, "ignore_eos": True, "stream": True}
    portal = app_client.client.portal
    sent = portal.call(call_then_disconnect, app_client.app, "/v1/chat/completions", body, 4)
    assert sent[0]["status"] == 200
    assert not any(b"[DONE]" in m.get("body", b"") for m in sent)
    assert wait_until(lambda: app_client.engine.stats().pages_used == [0], timeout=5)
    assert app_client.engine.stats().running == 0


def test_disconnect_while_waiting_for_a_whole_response_aborts(app_client):
    body = {"model": "tiny", "messages": USER, "max_tokens": 900, "ignore_eos": True}
    portal = app_client.client.portal
    sent = portal.call(call_then_disconnect, app_client.app, "/v1/chat/completions", body, 0)
    assert sent[0]["status"] == 499
    assert wait_until(lambda: app_client.engine.stats().pages_used == [0], timeout=5)


def test_health_and_metrics(app_client):
    assert app_client.client.get("/health").json()["status"] == "ok"
    before = app_client.engine.stats()
    chat(app_client.client, max_tokens=3)
    assert chat(app_client.client, max_tokens=0).status_code == 400
    text = app_client.client.get("/metrics").text
    for name in ("msa_time_to_first_token_seconds_count", "msa_inter_token_latency_seconds_count",
                 "msa_e2e_request_latency_seconds_count", "msa_request_queue_time_seconds_count",
                 'msa_kv_pages_used{model="tiny",shard="0"}', "msa_requests_running", "msa_requests_waiting",
                 'msa_rejected_requests_total{model="tiny",status="400"}'):
        assert name in text, name
    lines = text.splitlines()
    ttft_count = next(line for line in lines if line.startswith("msa_time_to_first_token_seconds_count"))
    assert float(ttft_count.split()[-1]) >= 1

    def counter(line_start: str) -> float:
        return float(next(line for line in lines if line.startswith(line_start)).split()[-1])

    stats = app_client.engine.stats()  # the engine serves every test of this module: compare deltas
    assert counter('msa_engine_tokens_total{kind="decode",model="tiny"}') == stats.decode_tokens
    assert counter('msa_engine_tokens_total{kind="prefill",model="tiny"}') == stats.prefill_tokens
    assert counter('msa_engine_steps_total{model="tiny"}') == stats.steps
    assert counter('msa_engine_step_seconds_total{model="tiny"}') == pytest.approx(stats.step_seconds)
    assert stats.decode_tokens - before.decode_tokens == 2  # 3 tokens: the prompt's step gave the first
    assert stats.prefill_tokens > before.prefill_tokens and stats.steps - before.steps >= 3


def test_too_many_choices_is_400_a_full_queue_429_with_retry_after_and_a_dead_engine_503():
    engine = tiny_engine(max_waiting=1, max_num_seqs=1)
    server = OpenAIServer(engine, Tokenizer.byte_level_default(), model_name="tiny")
    with TestClient(create_app(server)) as client:
        client.portal.call(engine.start)
        body = {"model": "tiny", "messages": USER, "n": 2, "max_tokens": 2}
        error = assert_error(client.post("/v1/chat/completions", json=body), 400, "n")
        assert "max_waiting=1" in error["message"]
        # One request runs (max_num_seqs=1), one waits: the queue is full for a third, for now.
        long = {"model": "tiny", "prompt": "a", "max_tokens": 900, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(client.post, "/v1/completions", json=long)
            assert wait_until(lambda: engine.stats().running == 1)
            waiting = pool.submit(client.post, "/v1/completions", json=long | {"max_tokens": 2})
            assert wait_until(lambda: engine.stats().waiting == 1)
            r = client.post("/v1/chat/completions", json=body | {"n": 1})
            assert_error(r, 429)
            assert int(r.headers["Retry-After"]) >= 1
            assert [f.result().status_code for f in (running, waiting)] == [200, 200]
        assert client.post("/v1/chat/completions", json=body | {"n": 1}).status_code == 200
        assert client.get("/health").status_code == 200
        client.portal.call(engine.shutdown)
        assert_error(client.get("/health"), 503)
        body = {"model": "tiny", "messages": USER, "max_tokens": 2}
        assert assert_error(client.post("/v1/chat/completions", json=body), 503)["code"] == "engine_dead"


@pytest.mark.parametrize("prefill, generated", [
    ("", 'Checking.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'),
    ('<tool_call>{"name": "get_weather", "arguments": ', '{"city": "Paris"}}</tool_call>'),
], ids=["auto", "named-prefill"])
def test_model_format_tokens_through_the_engine_detokenizer_become_tool_calls(prefill, generated):
    tok = Tokenizer.byte_level_default()
    server = OpenAIServer(tiny_engine(), tok, model_name="tiny")
    stream = ChoiceStream("r", 0, 1, SamplingParams(max_tokens=500), tok, tok.eos_token_ids)
    choice = ChatChoice(server, 0, parse_tools=True, prefill=prefill, top_logprobs=None)
    streamed_calls = []
    for token in tok.encode(generated) + tok.encode("<|im_end|>"):
        _, calls, _ = choice.step(stream.append(token, -1.0, None, 0))
        streamed_calls += calls
    message = choice.message()
    assert choice.finish_reason == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Paris"}]
    assert [c.name for c in streamed_calls] == ["get_weather"]
    assert message["content"] == ("Checking." if not prefill else None)


def test_ignore_eos_generates_exactly_max_tokens(app_client):
    r = app_client.client.post("/v1/completions", json={
        "model": "tiny", "prompt": "a", "max_tokens": 40, "n": 4, "ignore_eos": True, "seed": 2})
    body = r.json()
    assert body["usage"]["completion_tokens"] == 4 * 40
    assert {c["finish_reason"] for c in body["choices"]} == {"length"}


def test_a_tokenizer_without_chat_template_gets_the_documented_default():
    tok = Tokenizer.byte_level_default()
    tok.chat_template = None
    server = OpenAIServer(tiny_engine(), tok, model_name="tiny")
    default = Tokenizer.byte_level_default().apply_chat_template(USER)
    assert server.tokenizer.apply_chat_template(USER) == default
    assert tok.chat_template is None


def test_legacy_top_logprobs_hold_the_sampled_token_and_the_likelier_of_equal_texts(app_client):
    prompt, n_top = list(b"Once upon"), 2
    sampling = {"max_tokens": 24, "seed": 1, "logprobs": n_top, "ignore_eos": True}
    r = app_client.client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, **sampling})
    lp = r.json()["choices"][0]["logprobs"]
    outs = engine_outputs(app_client, prompt, SamplingParams(**sampling))
    steps = [(t, top) for o in outs for t, top in zip(o.token_ids, o.top_logprobs, strict=True)]
    text = app_client.server.token_text
    assert lp["tokens"] == [text(t) for t, _ in steps]
    collisions = 0
    for token, logprob, top, (sampled, alternatives) in zip(lp["tokens"], lp["token_logprobs"],
                                                            lp["top_logprobs"], steps, strict=True):
        assert top[token] == logprob and len(top) <= n_top + 1
        want = {token: logprob}
        for alternative, alt_lp in alternatives.items():
            key = text(alternative)
            collisions += key == token and alternative != sampled
            if key != token:
                want[key] = max(alt_lp, want.get(key, -float("inf")))
        assert top == pytest.approx(want)
    assert collisions > 0  # byte tokens decode alike: the case where an alternative shares the sampled text


def test_context_errors_state_the_limit_that_models_reports(app_client):
    c = app_client.client
    max_model_len = c.get("/v1/models").json()["data"][0]["max_model_len"]
    assert max_model_len == app_client.engine.max_context_length == 1024  # KV pages, tighter than 4096
    for max_tokens in (5000, 4000):
        r = c.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": max_tokens})
        error = assert_error(r, 400, "max_tokens")
        assert error["code"] == TOO_LONG and "4096" not in error["message"]
        assert f"at most {max_model_len} tokens" in error["message"]
        assert f"max_tokens to at most {max_model_len - 2}" in error["message"]  # "a" is <bos> a
    r = chat(c, max_tokens=5, max_completion_tokens=max_model_len)
    assert f"at most {max_model_len} tokens" in assert_error(r, 400, "max_completion_tokens")["message"]
    r = c.post("/v1/completions", json={"model": "tiny", "prompt": "b" * max_model_len, "max_tokens": 1})
    assert f"at most {max_model_len} tokens" in assert_error(r, 400, "prompt")["message"]
    assert app_client.engine.stats().running == 0


def test_a_batch_of_prompts_answers_every_choice_in_order(app_client):
    prompts = ["ab", "Hello there", "Once upon"]
    body = {"model": "tiny", "max_tokens": 5, "temperature": 0, "n": 2}
    alone = [app_client.client.post("/v1/completions", json={**body, "prompt": p, "n": 1}).json()
             for p in prompts]
    batch = app_client.client.post("/v1/completions", json={**body, "prompt": prompts}).json()
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    for i, choice in enumerate(batch["choices"]):
        assert choice["text"] == alone[i // 2]["choices"][0]["text"]
    assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone)
    assert batch["usage"]["completion_tokens"] == 2 * sum(a["usage"]["completion_tokens"] for a in alone)


def test_a_prompt_of_a_batch_refused_at_admission_aborts_the_others():
    engine = tiny_engine(max_waiting=2)
    server = OpenAIServer(engine, Tokenizer.byte_level_default(), model_name="tiny")
    with TestClient(create_app(server)) as client:
        client.portal.call(engine.start)
        body = {"model": "tiny", "max_tokens": 50, "ignore_eos": True}
        r = client.post("/v1/completions", json={**body, "prompt": ["a", "b", "c"]})
        assert assert_error(r, 429)["code"] == "queue_full"  # all three wait at once; two fit the queue
        assert engine.stats().rejected == 1
        assert wait_until(lambda: engine.stats().pages_used == [0], timeout=5)
        stats = engine.stats()
        assert (stats.running, stats.waiting) == (0, 0) and engine.request_ids() == []
        two = client.post("/v1/completions", json={**body, "prompt": ["a", "b"]}).json()
        assert [c["finish_reason"] for c in two["choices"]] == ["length", "length"]
        client.portal.call(engine.shutdown)
