"""vLLM's request fields that shape the prompt (add_generation_prompt, continue_final_message,
chat_template_kwargs) and the returned text (include_stop_str_in_output, skip_special_tokens),
through the app around the tiny engine."""

import json

import pytest

from msa.cluster.output import ChoiceStream
from msa.cluster.protocol import SamplingParams
from msa.platform.tokenizer import Tokenizer
from msa.serve.chat import ChatChoice
from msa.serve.server import OpenAIServer
from tests.serve.conftest import USER, assert_error, engine_outputs, sse_events, tiny_engine

PROMPT = list(b"Once upon")
GREEDY = {"temperature": 0, "ignore_eos": True}
PARTIAL = [*USER, {"role": "assistant", "content": "In Paris it is "}]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": USER, **body})


def complete(client, **body):
    return client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **body})


@pytest.fixture
def prompts(app_client, monkeypatch):
    """The prompt text of each request the engine gets during the test."""
    seen = []
    generate = app_client.engine.generate

    def recording(request_id, prompt_token_ids, params):
        seen.append(app_client.server.tokenizer.decode(prompt_token_ids, skip_special_tokens=False))
        return generate(request_id, prompt_token_ids, params)

    monkeypatch.setattr(app_client.engine, "generate", recording)
    return seen


# The prompt ------------------------------------------------------------------------------------


def test_continue_final_message_ends_the_prompt_inside_the_assistant_message(app_client, prompts):
    r = chat(app_client.client, messages=PARTIAL, max_tokens=3, add_generation_prompt=False,
             continue_final_message=True)
    assert r.status_code == 200, r.text
    assert prompts == ["<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
                       "<|im_start|>assistant\nIn Paris it is "]


def test_continue_final_message_continues_a_final_message_of_any_role(app_client, prompts):
    """As in vLLM: a final user message is continued too, ending the prompt inside it."""
    r = chat(app_client.client, max_tokens=2, add_generation_prompt=False, continue_final_message=True)
    assert r.status_code == 200, r.text
    assert prompts == ["<|im_start|>user\nWhat is the weather in Paris?"]


def test_continue_final_message_with_text_parts_ends_after_the_last_part(app_client, prompts):
    parts = [{"type": "text", "text": "Paris: "}, {"type": "text", "text": "sunny, "}]
    messages = [*USER, {"role": "assistant", "content": parts}]
    r = chat(app_client.client, messages=messages, max_tokens=2, add_generation_prompt=False,
             continue_final_message=True, stream=True)
    assert r.status_code == 200 and sse_events(r.text)[-1] == "[DONE]"
    assert prompts[0].endswith("<|im_end|>\n<|im_start|>assistant\nParis: sunny, ")


def test_add_generation_prompt_false_ends_the_prompt_after_the_last_turn(app_client, prompts):
    assert chat(app_client.client, max_tokens=2, add_generation_prompt=False).status_code == 200
    assert chat(app_client.client, max_tokens=2).status_code == 200
    assert prompts == ["<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n",
                       "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n<|im_start|>assistant\n"]


@pytest.mark.parametrize("body, needle", [
    ({"messages": PARTIAL, "continue_final_message": True}, "cannot both be true"),
    ({"messages": PARTIAL, "continue_final_message": True, "add_generation_prompt": True},
     "cannot both be true"),
    ({"messages": [*USER, {"role": "assistant", "content": "  "}], "continue_final_message": True,
      "add_generation_prompt": False}, "needs a final message with text"),
], ids=["default-generation-prompt", "both-true", "blank-assistant"])
def test_continue_final_message_errors_name_it(app_client, body, needle):
    error = assert_error(chat(app_client.client, max_tokens=2, **body), 400, "continue_final_message")
    assert needle in error["message"]
    assert app_client.engine.stats().running == 0


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize("tool_choice", ["required", NAMED], ids=["required", "named"])
def test_a_forced_tool_call_needs_an_open_assistant_turn(app_client, prompts, tool_choice):
    """The forced call's opening is written where the assistant's turn begins: after the messages
    with add_generation_prompt: false there is none, so the request is refused naming tool_choice."""
    body = dict(tools=[WEATHER_TOOL], tool_choice=tool_choice, max_tokens=2)
    error = assert_error(chat(app_client.client, add_generation_prompt=False, **body), 400, "tool_choice")
    assert "add_generation_prompt: false" in error["message"] and prompts == []
    assert chat(app_client.client, **body).status_code == 200
    opening = "<tool_call>" + ("" if tool_choice == "required" else '{"name": "get_weather", "arguments": ')
    assert prompts[-1].endswith("<|im_start|>assistant\n" + opening)


# A template that branches on a variable of chat_template_kwargs, shouts assistant turns when asked
# to, and marks the assistant's text with transformers' generation block.
THINKING_TEMPLATE = """\
{% for m in messages %}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' %}{% generation %}{{ m.content | upper if shout else m.content | trim }}\
{% endgeneration %}{% else %}{{ m.content }}{% endif %}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}
{% endif %}"""


@pytest.fixture
def thinking_template(app_client, monkeypatch):
    monkeypatch.setattr(app_client.server.tokenizer, "chat_template", THINKING_TEMPLATE)


def test_chat_template_kwargs_reach_the_template(app_client, prompts, thinking_template):
    for kwargs in (None, {"enable_thinking": True}, {"enable_thinking": False}):
        assert chat(app_client.client, max_tokens=2, chat_template_kwargs=kwargs).status_code == 200
    user = "<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
    assert prompts == [f"{user}<|im_start|>assistant\n", f"{user}<|im_start|>assistant\n",
                       f"{user}<|im_start|>assistant\n<think></think>"]


def test_continue_final_message_through_a_generation_block(app_client, prompts, thinking_template):
    r = chat(app_client.client, messages=PARTIAL, max_tokens=2, add_generation_prompt=False,
             continue_final_message=True)
    assert r.status_code == 200, r.text
    assert prompts == ["<|im_start|>user\nWhat is the weather in Paris?<|im_end|>\n"
                       "<|im_start|>assistant\nIn Paris it is"]  # the template trims the message


def test_continue_final_message_whose_text_the_template_changes_is_refused(app_client, thinking_template):
    r = chat(app_client.client, messages=PARTIAL, max_tokens=2, add_generation_prompt=False,
             continue_final_message=True, chat_template_kwargs={"shout": True})
    assert "does not render the final message's text" in assert_error(r, 400, "continue_final_message")[
        "message"]
    assert app_client.engine.stats().running == 0


@pytest.mark.parametrize("kwargs", [{"messages": []}, {"add_generation_prompt": False}, {"tools": None},
                                    {"bos_token": "x", "enable_thinking": False}, {"chat_template": "x"},
                                    {"raise_exception": 1}])
def test_chat_template_kwargs_may_not_set_the_renderers_variables(app_client, kwargs):
    error = assert_error(chat(app_client.client, max_tokens=2, chat_template_kwargs=kwargs), 400,
                         "chat_template_kwargs")
    reserved = sorted(set(kwargs) - {"enable_thinking"})
    assert f"may not set {reserved}" in error["message"]


# The text --------------------------------------------------------------------------------------


def first_letter_after_the_start(text: str) -> str:
    return next(c for c in text[1:] if c.isascii() and c.isalnum())


@pytest.mark.parametrize("path", ["completions", "chat"])
def test_include_stop_str_in_output_keeps_the_stop_string(app_client, path):
    send = complete if path == "completions" else chat

    def texts(**body) -> tuple[str, str]:
        """The whole response's text and the streamed one's."""
        whole = send(app_client.client, max_tokens=24, **GREEDY, **body).json()["choices"][0]
        events = sse_events(send(app_client.client, max_tokens=24, stream=True, **GREEDY, **body).text)
        choices = [c for e in events[:-1] for c in e["choices"]]
        streamed = "".join(c["text"] if path == "completions" else c["delta"].get("content", "")
                           for c in choices)
        assert whole["finish_reason"] == choices[-1]["finish_reason"]
        return (whole["text"] if path == "completions" else whole["message"]["content"]), streamed

    plain, _ = texts()
    stop = first_letter_after_the_start(plain)
    at = plain.index(stop)
    assert texts(stop=stop) == (plain[:at], plain[:at])
    assert texts(stop=[stop], include_stop_str_in_output=True) == (plain[: at + 1], plain[: at + 1])
    assert texts(stop=[stop], include_stop_str_in_output=False) == (plain[:at], plain[:at])


def test_include_stop_str_in_output_keeps_a_stop_tokens_text(app_client):
    greedy = engine_outputs(app_client, PROMPT, SamplingParams(max_tokens=2, **GREEDY))
    first, second = [t for out in greedy for t in out.token_ids]
    decode = app_client.server.tokenizer.decode
    for include, text in ((False, decode([first])), (True, decode([first, second]))):
        body = complete(app_client.client, max_tokens=8, temperature=0, stop_token_ids=[second],
                        include_stop_str_in_output=include).json()
        assert body["choices"][0]["text"] == text and body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("path", ["chat", "completions"])
def test_allowed_token_ids_restrict_the_text_to_their_tokens(app_client, path):
    """The byte-level tiny model: ids 72 and 105 are the bytes of "H" and "i"."""
    send = chat if path == "chat" else complete
    r = send(app_client.client, max_tokens=12, seed=3, allowed_token_ids=[72, 105], ignore_eos=True)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] if path == "chat" else choice["text"]
    assert len(text) == 12 and set(text) <= {"H", "i"}
    error = assert_error(send(app_client.client, max_tokens=2, allowed_token_ids=[72, 10**6]), 400,
                         "allowed_token_ids")
    assert "outside the vocabulary" in error["message"]
    assert_error(send(app_client.client, max_tokens=2, allowed_token_ids=[]), 400, "allowed_token_ids")


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(app_client):
    greedy = engine_outputs(app_client, PROMPT, SamplingParams(max_tokens=48, **GREEDY))
    ids = [t for out in greedy for t in out.token_ids]
    specials = [t for t in ids if t >= 256]
    assert specials, "the premise: the tiny model's greedy completion holds a special token"
    tok = app_client.server.tokenizer
    for skip in (True, False):
        r = complete(app_client.client, max_tokens=48, skip_special_tokens=skip, **GREEDY)
        text = r.json()["choices"][0]["text"]
        assert text == tok.decode(ids, skip_special_tokens=skip)
        assert (tok.decode(specials[:1], skip_special_tokens=False) in text) == (not skip)
        streamed = sse_events(complete(app_client.client, max_tokens=48, skip_special_tokens=skip,
                                       stream=True, **GREEDY).text)
        assert "".join(e["choices"][0]["text"] for e in streamed[:-1]) == text


def test_tool_calls_parse_once_when_special_tokens_stay_in_the_text():
    tok = Tokenizer.byte_level_default()
    server = OpenAIServer(tiny_engine(), tok, model_name="tiny")
    params = SamplingParams(max_tokens=500, skip_special_tokens=False)
    stream = ChoiceStream("r", 0, 1, params, tok, tok.eos_token_ids)
    choice = ChatChoice(server, 0, parse_tools=True, prefill="", top_logprobs=None, skip_special_tokens=False)
    generated = 'Sure.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    for token in tok.encode(generated) + tok.encode("<|im_end|>"):
        choice.step(stream.append(token, -1.0, None, 0))
    message = choice.message()
    assert message["content"] == "Sure." and choice.finish_reason == "tool_calls"
    assert [json.loads(c["function"]["arguments"]) for c in message["tool_calls"]] == [{"city": "Paris"}]
