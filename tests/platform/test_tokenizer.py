"""The byte-level default tokenizer: exact UTF-8 round trips, streaming over split characters, the
chat template with tools, and saving to / reading from a checkpoint directory."""

from __future__ import annotations

import json

import pytest
from tokenizers import pre_tokenizers

from msa.platform.config import tiny
from msa.platform.tokenizer import SPECIAL_TOKENS, Tokenizer, _bytes_to_unicode

TEXTS = ["héllo 世界 🙂", "", " leading and trailing  ", "tabs\tand\nnewlines\r\n",
         "👩‍👩‍👧 ZWJ", "\x00\x7f\xff"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.byte_level_default()


def test_layout_matches_tiny_config(tok):
    config = tiny()
    assert tok.vocab_size == config.vocab_size == 264
    assert tok.bos_token_id == config.bos_token_id == 256
    assert tok.eos_token_ids[0] == config.eos_token_id == 257
    assert [tok.encode(t)[0] for t in SPECIAL_TOKENS] == list(range(256, 264))
    assert set(_bytes_to_unicode().values()) == set(pre_tokenizers.ByteLevel.alphabet())


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_byte_level_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode(text, add_special_tokens=True) == [256, *ids]


def test_special_tokens_in_text_encode_as_one_id_and_are_skipped(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 258 and ids[-1] == 259 and len(ids) == 2 + len("user\nhi")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_stream_decoder_holds_back_split_characters(tok, step):
    text = "héllo 世界 🙂!"
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.feed(ids[i:i + step]) for i in range(0, len(ids), step)]
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_prints_emoji_only_when_complete(tok):
    stream = tok.stream_decoder()
    emoji = list("🙂".encode())
    assert [stream.feed(b) for b in emoji] == ["", "", "", "🙂"]
    assert stream.feed(tok.eos_token_ids[0]) == ""
    assert stream.flush() == ""


def test_stream_decoder_flush_shows_a_truncated_character(tok):
    stream = tok.stream_decoder()
    assert stream.feed(ord("a")) == "a"
    assert stream.feed([0xF0, 0x9F]) == ""
    assert stream.flush() == "\ufffd"


def _conversation() -> tuple[list[dict], list[dict]]:
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "assistant", "content": "18 C and sunny."},
    ]
    return messages, tools


def test_chat_template_with_system_tools_and_tool_call(tok):
    messages, tools = _conversation()
    text = tok.apply_chat_template(messages, tools=tools)
    tool_json = json.dumps(tools[0]["function"], ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nBe brief.\n\n"
        "# Tools\nYou may call the functions below. For each call, reply with "
        '<tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>.\n'
        f"<tools>\n{tool_json}\n</tools><|im_end|>\n"
        "<|im_start|>user\nWeather in Zürich?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Zürich"}}</tool_call><|im_end|>\n'
        "<|im_start|>tool\n<tool_response>18 C</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n18 C and sunny.<|im_end|>\n"
        "<|im_start|>assistant\n")
    ids = tok.encode(text)
    assert ids.count(258) == ids.count(259) + 1 == 6
    assert ids.count(260) == ids.count(261) == 2  # the instruction in the system turn, then the call


def test_chat_template_string_arguments_and_no_system(tok):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"x": 1}'}}]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert text == ('<|im_start|>user\nhi<|im_end|>\n'
                    '<|im_start|>assistant\n'
                    '<tool_call>{"name": "f", "arguments": {"x": 1}}</tool_call><|im_end|>\n')


def test_save_and_read_back(tok, tmp_path):
    tok.save(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    messages, tools = _conversation()
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.bos_token_id == tok.bos_token_id and loaded.eos_token_ids == tok.eos_token_ids
    assert loaded.apply_chat_template(messages, tools=tools) == tok.apply_chat_template(messages, tools=tools)
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
        assert loaded.decode(loaded.encode(text)) == text


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_directory(tmp_path)
