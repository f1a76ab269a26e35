"""Request validation and the mapping of engine errors to OpenAI error bodies and statuses."""

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from msa.cluster.protocol import (
    EngineDeadError,
    EngineOverloadedError,
    InvalidRequestError,
    RequestTooLongError,
)
from msa.serve.errors import from_engine_error, validation_error
from msa.serve.schemas import ChatCompletionRequest, CompletionRequest

USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def error_for(model, body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = [{**e, "loc": ("body", *e["loc"])} for e in info.value.errors()]
    error = validation_error(RequestValidationError(errors))
    assert error.status == 400
    return error.body()["error"]


@pytest.mark.parametrize("body, param", [
    ({"messages": USER}, "model"),
    ({"model": "m"}, "messages"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": USER, "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "messages": USER, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"model": "m", "messages": USER, "n": 100000}, "n"),
    ({"model": "m", "messages": USER, "temperature": 3}, "temperature"),
    ({"model": "m", "messages": USER, "top_p": 0}, "top_p"),
    ({"model": "m", "messages": USER, "top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"model": "m", "messages": USER, "max_tokens": "many"}, "max_tokens"),
    ({"model": "m", "messages": USER, "stop": ["a"] * 17}, "stop"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_invalid_chat_fields_name_their_param(body, param):
    error = error_for(ChatCompletionRequest, body)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)


@pytest.mark.parametrize("body, param, needle", [
    ({"model": "m", "messages": USER, "tool_choice": "required"}, "tool_choice", "needs at least one tool"),
    ({"model": "m", "messages": USER, "tools": TOOLS,
      "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "not among the tools"),
    ({"model": "m", "messages": USER, "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
    ({"model": "m", "messages": USER, "stream_options": {"include_usage": True}}, "stream_options",
     "only allowed when stream"),
])
def test_inconsistent_chat_requests_are_rejected(body, param, needle):
    error = error_for(ChatCompletionRequest, body)
    assert error["param"] == param and needle in error["message"]


@pytest.mark.parametrize("body, param", [
    ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": []}, "prompt"),
    ({"model": "m", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "m", "prompt": "x", "max_tokens": -5}, "max_tokens"),
    ({"model": "m", "prompt": [[1], [2, -3]]}, "prompt"),
    ({"model": "m", "prompt": "x", "echo": True}, "echo"),
    ({"model": "m", "prompt": "x", "suffix": "y"}, "suffix"),
    ({"model": "m", "prompt": "x", "n": 2, "best_of": 3}, "best_of"),
])
def test_invalid_completion_fields_name_their_param(body, param):
    assert error_for(CompletionRequest, body)["param"] == param


def test_defaults_and_tool_choice():
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "max_tokens": 5, "stop": "x"})
    assert req.stop == ["x"] and req.completion_limit == 5 and req.effective_tool_choice == "none"
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": USER, "tools": TOOLS,
                                                "max_tokens": 5, "max_completion_tokens": 7})
    assert req.completion_limit == 7 and req.effective_tool_choice == "auto"
    batch = CompletionRequest.model_validate({"model": "m", "prompt": [[1, 2], [3]]})
    assert batch.prompts() == [[1, 2], [3]]
    assert CompletionRequest.model_validate({"model": "m", "prompt": [1, 2]}).prompts() == [[1, 2]]


def test_malformed_json_is_a_400_without_param():
    error = validation_error(RequestValidationError(
        [{"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {"error": "bad"}}]))
    assert (error.status, error.param, error.code) == (400, None, "invalid_json")


@pytest.mark.parametrize("exc, status, code", [
    (RequestTooLongError(5000, 16, 4096, "max_position_embeddings"), 400, "context_length_exceeded"),
    (InvalidRequestError("sampling parameter 'n' must be ..."), 400, "invalid_value"),
    (EngineOverloadedError("queue full", retry_after=2.5), 429, "queue_full"),
    (EngineDeadError("shard 1 died"), 503, "engine_dead"),
], ids=["too-long", "invalid", "overloaded", "dead"])
def test_engine_errors_map_to_statuses(exc, status, code):
    error = from_engine_error(exc, "messages")
    assert (error.status, error.code) == (status, code)
    assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    if status == 429:
        assert error.headers == {"Retry-After": "3"}
    if code == "context_length_exceeded":
        assert "5000" in error.message and "4096" in error.message and error.param == "messages"
