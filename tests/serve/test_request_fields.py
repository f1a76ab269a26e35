"""Request fields through the app: vLLM's stop_token_ids, the parameters this engine refuses unless
they change nothing, and 400s that name the field to fix. vLLM's fields that shape the prompt and
the text are in test_vllm_fields.py."""

import pytest

from msa.cluster.protocol import SamplingParams
from tests.serve.conftest import TOOLS, USER, assert_error, engine_outputs

PROMPT = list(b"Once upon")


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body})


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, **body})


def test_a_stop_token_id_ends_the_choice_without_its_text_but_counted(app_client):
    greedy = engine_outputs(app_client, PROMPT, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    first, second = [t for out in greedy for t in out.token_ids]
    assert first != second
    r = complete(app_client.client, max_tokens=8, temperature=0, logprobs=0, stop_token_ids=[second])
    body = r.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == app_client.server.tokenizer.decode([first])
    assert body["usage"]["completion_tokens"] == 2 == len(choice["logprobs"]["tokens"])
    streamed = complete(app_client.client, max_tokens=8, temperature=0, stop_token_ids=[second], stream=True)
    assert '"finish_reason": "stop"' in streamed.text


@pytest.mark.parametrize("stop_token_ids", [[5, 264], [-1]], ids=["beyond-vocab", "negative"])
def test_stop_token_ids_outside_the_vocabulary_are_refused(app_client, stop_token_ids):
    error = assert_error(chat(app_client.client, max_tokens=2, stop_token_ids=stop_token_ids), 400,
                         "stop_token_ids")
    assert str(stop_token_ids[-1]) in error["message"] and "[0, 264)" in error["message"]


REFUSED = [
    ("chat", "logit_bias", {"65": 100}, "{}"),
    ("chat", "frequency_penalty", 2.0, "0.0"),
    ("chat", "presence_penalty", -1.0, "0.0"),
    ("completions", "repetition_penalty", 1.3, "1.0"),
    ("chat", "min_p", 0.1, "0.0"),
    ("completions", "min_tokens", 4, "0"),
    ("chat", "response_format", {"type": "json_object"}, '{"type": "text"}'),
    ("chat", "response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, '{"type": "text"}'),
    ("completions", "best_of", 3, "send 1"),
    ("chat", "best_of", 2, "send 1"),
    ("chat", "use_beam_search", True, "false"),
    ("chat", "guided_json", {"type": "object"}, "leave it out"),
    ("completions", "guided_regex", "[a-z]+", "leave it out"),
    ("chat", "guided_choice", ["yes", "no"], "leave it out"),
    ("chat", "guided_grammar", "root ::= 'a'", "leave it out"),
    ("chat", "structured_outputs", {"choice": ["yes", "no"]}, "leave it out"),
    ("completions", "echo", True, "false"),
    ("completions", "suffix", "z", '""'),
    ("completions", "bad_words", ["upon"], "[]"),
    ("completions", "prompt_logprobs", 0, "leave it out"),
    ("chat", "prompt_logprobs", 2, "leave it out"),
    ("chat", "truncate_prompt_tokens", 8, "leave it out"),
    ("completions", "length_penalty", 0.5, "1.0"),
    ("chat", "priority", 1, "0"),
    ("completions", "return_tokens_as_token_ids", True, "false"),
    ("chat", "chat_template", "{{ messages[0].content }}", "leave it out"),
    ("chat", "echo", True, "false"),
    ("chat", "add_special_tokens", True, "false"),
    ("chat", "documents", [{"title": "t", "text": "x"}], "leave it out"),
]


@pytest.mark.parametrize("path, field, value, accepted", REFUSED, ids=[f"{p}-{f}" for p, f, *_ in REFUSED])
def test_parameters_the_engine_does_not_implement_are_refused(app_client, path, field, value, accepted):
    send = chat if path == "chat" else complete
    error = assert_error(send(app_client.client, max_tokens=2, **{field: value}), 400, field)
    assert f"this server does not support {field}" in error["message"]
    assert accepted in error["message"]


NULLABLE = ["temperature", "top_p", "n", "top_k", "stream", "ignore_eos", "logprobs", "skip_special_tokens"]


@pytest.mark.parametrize("path", ["chat", "completions"])
def test_null_sampling_fields_mean_their_defaults(app_client, path):
    """OpenAI's clients send null for a parameter given as None; it means the default, as in vLLM."""
    send = chat if path == "chat" else complete
    nulls = {field: None for field in NULLABLE if path == "chat" or field != "logprobs"}
    plain = send(app_client.client, max_tokens=4, seed=7)
    with_nulls = send(app_client.client, max_tokens=4, seed=7, **nulls)
    assert plain.status_code == with_nulls.status_code == 200, with_nulls.text
    assert with_nulls.json()["choices"] == plain.json()["choices"]
    assert_error(send(app_client.client, model=None), 400, "model")  # a required field stays required


def test_values_that_change_nothing_and_unknown_fields_are_accepted(app_client):
    no_ops = {"logit_bias": {}, "frequency_penalty": 0, "presence_penalty": 0, "repetition_penalty": 1,
              "min_p": 0, "min_tokens": 0, "use_beam_search": False, "guided_json": None,
              "stop_token_ids": None, "allowed_token_ids": None, "bad_words": [], "prompt_logprobs": None,
              "truncate_prompt_tokens": None, "length_penalty": 1.0, "include_stop_str_in_output": False,
              "skip_special_tokens": True, "guided_decoding_backend": "xgrammar",
              "guided_whitespace_pattern": None, "some_future_field": {"x": 1}}
    no_ops |= {"priority": 0, "return_tokens_as_token_ids": False}
    chat_defaults = {"add_generation_prompt": True, "continue_final_message": False,
                     "chat_template_kwargs": {}, "chat_template": None, "echo": False,
                     "add_special_tokens": False, "documents": None}
    plain = chat(app_client.client, max_tokens=4, temperature=0).json()
    with_no_ops = chat(app_client.client, max_tokens=4, temperature=0, response_format={"type": "text"},
                       **no_ops, **chat_defaults).json()
    assert with_no_ops["choices"][0]["message"] == plain["choices"][0]["message"]
    r = complete(app_client.client, max_tokens=4, n=2, best_of=2, echo=False, suffix="", **no_ops)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.mark.parametrize("path, body, param", [
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ("chat", {"tool_choice": "required"}, "tool_choice"),
    ("chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}, "messages.0.content"),
    ("completions", {"echo": True}, "echo"),
    ("completions", {"suffix": "end"}, "suffix"),
    ("completions", {"prompt": [[5, 6], [5, -1]]}, "prompt"),
    ("completions", {"n": 2, "best_of": 1}, "best_of"),
    ("chat", {"continue_final_message": True}, "continue_final_message"),
    ("chat", {"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
], ids=["stream-options", "top-logprobs", "unknown-tool", "required-no-tools", "image-part", "echo", "suffix",
        "nested-negative-id", "best-of-below-n", "continue-and-generation-prompt", "reserved-template-kwarg"])
def test_cross_field_errors_name_their_field(app_client, path, body, param):
    send = chat if path == "chat" else complete
    error = assert_error(send(app_client.client, max_tokens=2, **body), 400, param)
    assert error["message"].startswith(f"{param}: ") and "more error" not in error["message"]
    assert app_client.engine.stats().running == 0


def test_an_image_part_is_refused_plainly_and_text_parts_are_served(app_client):
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [image]}]
    error = assert_error(chat(app_client.client, messages=messages), 400, "messages.1.content")
    assert error["message"] == (
        "messages.1.content: image_url content parts are not supported by this model; send text parts")
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": "?"}]
    text_parts = [{"role": "user", "content": parts}]
    r = chat(app_client.client, messages=text_parts, max_tokens=2)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("prompt", [[5, 264], [[5], [7, 9999]]], ids=["one-prompt", "batch"])
def test_prompt_ids_outside_the_vocabulary_are_refused_naming_the_prompt(app_client, prompt):
    error = assert_error(complete(app_client.client, prompt=prompt, max_tokens=2), 400, "prompt")
    assert "outside the vocabulary [0, 264)" in error["message"]
    assert app_client.engine.stats().running == 0
