"""Tool-call parsing on text in the model's format, whole and streamed in every split."""

import json

import pytest

from msa.platform.tokenizer import Tokenizer
from msa.serve.schemas import NamedToolChoice
from msa.serve.tools import (
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    ToolCallParser,
    parse_tool_calls,
    special_marker_ids,
    tool_call_prefill,
)

CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}}</tool_call>'


def test_single_call_becomes_tool_call_without_content():
    content, calls = parse_tool_calls(CALL)
    assert content is None
    parsed = [(c.name, json.loads(c.arguments)) for c in calls]
    assert parsed == [("get_weather", {"city": "Zürich", "days": 2})]
    assert calls[0].id.startswith("call_")


def test_text_around_calls_is_content_and_several_calls_keep_order():
    text = "Let me check.\n" + CALL + "\n" + CALL.replace("get_weather", "get_time") + "\n"
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize("body", [
    '{"name": "f", "arguments": {"x": 1}',  # truncated JSON
    '{"arguments": {"x": 1}}',  # no name
    '["f", {"x": 1}]',  # not an object
    '{"name": "f", "arguments": [1, 2]}',  # arguments not an object
    'call f(x=1)',
], ids=["truncated", "no-name", "array", "array-arguments", "not-json"])
def test_malformed_call_stays_content_with_its_markers(body):
    text = f"before {TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE} after"
    content, calls = parse_tool_calls(text)
    assert calls == []
    assert content == text


def test_arguments_given_as_json_string_are_accepted():
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert json.loads(calls[0].arguments) == {"x": 1}


def test_unclosed_call_counts_only_when_its_json_is_complete():
    content, calls = parse_tool_calls('<tool_call>{"name": "f", "arguments": {}}')
    assert content is None and [c.name for c in calls] == ["f"]
    content, calls = parse_tool_calls('<tool_call>{"name": "f", "argu')
    assert calls == [] and content == '<tool_call>{"name": "f", "argu'


def test_plain_text_is_untouched_even_when_it_looks_like_a_marker_prefix():
    for text in ["hello <tool", "a < b", "  spaced  ", "</tool_call> stray close"]:
        assert parse_tool_calls(text) == (text, [])


@pytest.mark.parametrize("text", [
    "Sure.\n" + CALL + "\nDone.",
    CALL + CALL,
    "x <tool_call>not json</tool_call> y " + CALL,
    "a <tool_ca b",
])
def test_streaming_in_every_split_agrees_with_the_whole_parse(text):
    whole_content, whole_calls = parse_tool_calls(text)
    for step in (1, 2, 3, 7, 13):
        parser = ToolCallParser()
        content, names = "", []
        for start in range(0, len(text), step):
            piece, calls = parser.feed(text[start:start + step])
            content += piece
            names += [c.name for c in calls]
        tail, calls = parser.finish()
        content += tail
        names += [c.name for c in calls]
        assert names == [c.name for c in whole_calls]
        if whole_calls:
            assert content.strip() == (whole_content or "")
        else:
            assert content == whole_content


def test_marker_prefix_is_held_back_until_it_resolves():
    parser = ToolCallParser()
    assert parser.feed("Hi <tool") == ("Hi ", [])
    assert parser.feed("box>") == ("<toolbox>", [])


def test_prefill_for_each_tool_choice():
    named = NamedToolChoice(function={"name": "get_weather"})
    assert tool_call_prefill("auto") == "" and tool_call_prefill("none") == ""
    assert tool_call_prefill("required") == TOOL_CALL_OPEN
    prefill = tool_call_prefill(named)
    _, calls = parse_tool_calls(prefill + '{"city": "Oslo"}}' + TOOL_CALL_CLOSE)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"})]


def test_marker_tokens_that_decoding_drops_are_known_to_the_server():
    tok = Tokenizer.byte_level_default()
    markers = special_marker_ids(tok)
    assert sorted(markers.values()) == sorted([TOOL_CALL_OPEN, TOOL_CALL_CLOSE])
    for token_id, marker in markers.items():
        assert tok.decode([token_id], skip_special_tokens=False) == marker


@pytest.mark.parametrize("behind", [1, 2, 5, 1000])
def test_a_call_in_marker_tokens_parses_the_same_however_the_reader_got_the_steps(behind):
    """The engine streams one output per step; a reader ``behind`` steps gets them folded together
    (``coalesce``). The markers, special tokens that decoding drops, go back where they were made."""
    from msa.cluster.output import ChoiceStream
    from msa.cluster.protocol import SamplingParams, coalesce
    from msa.serve.chat import ChatChoice
    from msa.serve.server import OpenAIServer
    from tests.serve.conftest import tiny_engine

    tok = Tokenizer.byte_level_default()
    server = OpenAIServer(tiny_engine(), tok, model_name="tiny")
    ids = tok.encode("Sure." + CALL + "Done.")
    assert len(ids) < 1000 and set(special_marker_ids(tok)) <= set(ids)
    stream = ChoiceStream("r", 0, 1, SamplingParams(max_tokens=len(ids)), tok, tok.eos_token_ids)
    outputs = [stream.append(t, -1.0, None, 0) for t in ids]
    choice = ChatChoice(server, 0, parse_tools=True, prefill="", top_logprobs=None)
    for start in range(0, len(outputs), behind):
        for out in coalesce(outputs[start : start + behind]):
            choice.step(out)
    message = choice.message()
    assert message["content"] == "Sure.Done."
    calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]]
    assert calls == [("get_weather", {"city": "Zürich", "days": 2})]
    assert choice.finish_reason == "length" and choice.num_tokens == len(ids)
