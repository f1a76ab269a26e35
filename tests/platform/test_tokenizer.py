"""The byte-level default tokenizer: exact UTF-8 round trips, streaming over split characters, the
chat template with tools, continuing a final message, transformers' template extensions, and
saving to / reading from a checkpoint directory."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from jinja2.exceptions import SecurityError
from tokenizers import pre_tokenizers

from msa.platform.config import tiny
from msa.platform.tokenizer import SPECIAL_TOKENS, FinalMessageNotRendered, Tokenizer, _bytes_to_unicode

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


USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}}]


def _checkpoint_dir(tok, directory, chat_template):
    """A saved tokenizer whose tokenizer_config.json holds ``chat_template`` (dropped when None)."""
    tok.save(directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_chat_template_jinja_file_is_read(tok, tmp_path):
    _checkpoint_dir(tok, tmp_path, None)
    source = "{{ bos_token }}{{ messages[0].content }}|"
    (tmp_path / "chat_template.jinja").write_text(source, encoding="utf-8")
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.chat_template == source
    assert loaded.apply_chat_template(USER) == "<bos>hi|"


def test_chat_template_files_override_the_config_entry(tok, tmp_path):
    _checkpoint_dir(tok, tmp_path, "config:{{ messages[0].content }}")
    assert Tokenizer.from_directory(tmp_path).apply_chat_template(USER) == "config:hi"
    legacy = {"chat_template": "json:{{ messages[0].content }}"}
    (tmp_path / "chat_template.json").write_text(json.dumps(legacy))
    assert Tokenizer.from_directory(tmp_path).apply_chat_template(USER) == "json:hi"
    (tmp_path / "chat_template.jinja").write_text("jinja:{{ messages[0].content }}")
    assert Tokenizer.from_directory(tmp_path).apply_chat_template(USER) == "jinja:hi"


def test_additional_chat_template_files_are_named_templates(tok, tmp_path):
    _checkpoint_dir(tok, tmp_path, "config")
    (tmp_path / "chat_template.jinja").write_text("plain")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools:{{ tools | length }}")
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.chat_template == {"default": "plain", "tool_use": "tools:{{ tools | length }}"}
    assert loaded.apply_chat_template(USER) == "plain"
    assert loaded.apply_chat_template(USER, tools=TOOLS) == "tools:1"


def test_malformed_chat_template_json_is_named(tok, tmp_path):
    _checkpoint_dir(tok, tmp_path, None)
    (tmp_path / "chat_template.json").write_text(json.dumps({"template": "x"}))
    with pytest.raises(ValueError, match=r"chat_template.json must hold an object with a 'chat_template'"):
        Tokenizer.from_directory(tmp_path)


NAMED = [{"name": "default", "template": "default:{{ messages[0].content }}"},
         {"name": "tool_use", "template": "tool_use:{{ tools[0].function.name }}"},
         {"name": "rag", "template": "rag:{{ documents | length }}"}]


def test_named_templates_pick_tool_use_with_tools_else_default(tok, tmp_path):
    loaded = Tokenizer.from_directory(_checkpoint_dir(tok, tmp_path, NAMED))
    assert loaded.apply_chat_template(USER) == "default:hi"
    assert loaded.apply_chat_template(USER, tools=TOOLS) == "tool_use:météo"
    assert loaded.apply_chat_template(USER, chat_template="rag", documents=[1, 2]) == "rag:2"
    assert loaded.apply_chat_template(USER, chat_template="inline:{{ messages | length }}") == "inline:1"


def test_named_templates_without_tool_use_render_default_with_tools(tok, tmp_path):
    loaded = Tokenizer.from_directory(_checkpoint_dir(tok, tmp_path, NAMED[:1]))
    assert loaded.apply_chat_template(USER, tools=TOOLS) == "default:hi"


def test_named_templates_without_default_name_the_choices(tok, tmp_path):
    loaded = Tokenizer.from_directory(_checkpoint_dir(tok, tmp_path, NAMED[1:]))
    with pytest.raises(ValueError, match=r"none named 'default'.*\['rag', 'tool_use'\]"):
        loaded.apply_chat_template(USER)
    assert loaded.apply_chat_template(USER, tools=TOOLS) == "tool_use:météo"


def test_named_templates_survive_save(tok, tmp_path):
    loaded = Tokenizer.from_directory(_checkpoint_dir(tok, tmp_path / "a", NAMED))
    loaded.save(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "tokenizer_config.json").read_text())["chat_template"] == NAMED
    assert Tokenizer.from_directory(tmp_path / "b").chat_template == {t["name"]: t["template"] for t in NAMED}


@pytest.mark.parametrize("entry", [[{"name": "default"}], {"default": 1}, 3], ids=repr)
def test_malformed_chat_template_entry_is_named(tok, tmp_path, entry):
    with pytest.raises(ValueError, match=r"tokenizer_config.json: 'chat_template' must be a string or a"):
        Tokenizer.from_directory(_checkpoint_dir(tok, tmp_path, entry))


def _render(tok, source: str, messages=USER, **extra) -> str:
    return Tokenizer(tok._tok, bos_token="<bos>", chat_template=source).apply_chat_template(messages, **extra)


@pytest.mark.parametrize("source, expected", [
    ("{{ tools[0] | tojson }}",
     '{"type": "function", "function": {"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}}'),
    ("{{ tools[0].function | tojson(ensure_ascii=False) }}",
     '{"name": "météo", "parameters": {"b": 1, "a": [1, 2]}}'),
    ("{{ tools[0].function | tojson(ensure_ascii=True) }}",
     '{"name": "m\\u00e9t\\u00e9o", "parameters": {"b": 1, "a": [1, 2]}}'),
    ("{{ tools[0].function.parameters | tojson(sort_keys=True) }}", '{"a": [1, 2], "b": 1}'),
    ("{{ tools[0].function.parameters | tojson(separators=(',', ':')) }}", '{"b":1,"a":[1,2]}'),
    ("{{ tools[0].function.parameters.a | tojson(indent=2) }}", "[\n  1,\n  2\n]"),
    ("{{ '<b>&' | tojson }}", '"<b>&"'),  # no HTML escaping
], ids=["plain", "ensure_ascii=False", "ensure_ascii=True", "sort_keys", "separators", "indent", "html"])
def test_tojson_takes_transformers_arguments(tok, source, expected):
    assert _render(tok, source, tools=TOOLS) == expected


def test_loop_controls(tok):
    messages = [{"role": "user", "content": c} for c in "abcde"]
    source = ("{% for m in messages %}{% if m.content == 'b' %}{% continue %}{% endif %}"
              "{% if m.content == 'd' %}{% break %}{% endif %}{{ m.content }}{% endfor %}")
    assert _render(tok, source, messages) == "ac"


def test_strftime_now_is_today(tok):
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = _render(tok, "{{ strftime_now('%Y-%m-%d') }}|{{ strftime_now('%d %b %Y') }}")
    after = datetime.now().strftime("%Y-%m-%d")
    day, text = rendered.split("|")
    assert day in (before, after)
    assert text == datetime.strptime(day, "%Y-%m-%d").strftime("%d %b %Y")


def test_template_stays_sandboxed(tok):
    with pytest.raises(SecurityError):
        _render(tok, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        _render(tok, "{% set x = messages.append(1) %}")


CHAT = [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes. "},
        {"role": "user", "content": "Yes. Again?"}]


@pytest.mark.parametrize("source, expected", [
    # transformers' templates mark the assistant's text with the block, with whitespace control...
    ("{%- for m in messages -%}\n"
     "{%- if m.role == 'assistant' -%}\n"
     "{{- '<|im_start|>assistant\\n' -}}\n"
     "{%- generation -%}\n"
     "{{- m.content + '<|im_end|>' -}}\n"
     "{%- endgeneration -%}\n"
     "{{- '\\n' -}}\n"
     "{%- else -%}\n"
     "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}\n"
     "{%- endif -%}\n"
     "{%- endfor -%}",
     "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\nYes. <|im_end|>\n"
     "<|im_start|>user\nYes. Again?<|im_end|>\n"),
    # ...or on lines of their own, which trim_blocks and lstrip_blocks take away as for any block tag.
    ("{% for m in messages %}\n"
     "{{ m.role }}:\n"
     "  {% generation %}\n"
     "{{ m.content }}|\n"
     "  {% endgeneration %}\n"
     "{% endfor %}",
     "user:\nSay yes.|\nassistant:\nYes. |\nuser:\nYes. Again?|\n"),
], ids=["whitespace-control", "own-lines"])
def test_generation_blocks_render_their_body_as_it_is(tok, source, expected):
    assert _render(tok, source, CHAT) == expected
    without_blocks = "\n".join(line for line in source.split("\n") if "generation" not in line)
    assert _render(tok, without_blocks, CHAT) == expected


def test_a_generation_block_is_a_scope_of_its_own_and_stays_sandboxed(tok):
    source = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% generation %}{% set inner = 1 %}"
              "{% set ns.n = ns.n + 1 %}{{ loop.index }}{% endgeneration %}{% endfor %}"
              "|{{ ns.n }}|{{ inner is defined }}")
    assert _render(tok, source, CHAT) == "123|3|False"
    with pytest.raises(SecurityError):
        _render(tok, "{% generation %}{{ messages.__class__.__mro__[1] }}{% endgeneration %}")


@pytest.mark.parametrize("source, final, expected_end", [
    (None, "Sure, ", "<|im_start|>user\nYes. Again?<|im_end|>\n<|im_start|>assistant\nSure, "),
    ("{% for m in messages %}[{{ m.content | trim }}]{% endfor %}", " Sure, ", "[Yes. Again?][Sure,"),
    (None, "Yes.", "<|im_start|>user\nYes. Again?<|im_end|>\n<|im_start|>assistant\nYes."),
    (None, [{"type": "text", "text": "Well, "}, {"type": "text", "text": "yes"}], "assistant\nWell, yes"),
    (None, "im", "<|im_start|>assistant\nim"),  # also in the end-of-turn markup after it
    (None, "<", "<|im_start|>assistant\n<"),
    (None, "Again?", "<|im_start|>assistant\nAgain?"),
], ids=["trailing-space-kept", "trimmed-by-the-template", "last-occurrence", "text-parts", "in-the-markup",
        "markup-character", "in-an-earlier-turn"])
def test_continue_final_message_ends_inside_the_final_message(tok, source, final, expected_end):
    messages = [*CHAT, {"role": "assistant", "content": final}]
    text = tok.apply_chat_template(messages, add_generation_prompt=False, chat_template=source,
                                   continue_final_message=True)
    assert text.endswith(expected_end)
    whole = tok.apply_chat_template(messages, add_generation_prompt=False, chat_template=source)
    assert whole.startswith(text) and len(whole) > len(text)


@pytest.mark.parametrize("source, final, needle", [
    (None, None, "needs a final message with text"),
    (None, "   ", "needs a final message with text"),
    ("{% for m in messages %}{{ m.content | upper }}{% endfor %}", "Sure", "does not render"),
], ids=["no-content", "blank", "changed-by-the-template"])
def test_continue_final_message_without_the_text_in_the_prompt_is_refused(tok, source, final, needle):
    messages = [*CHAT[:1], {"role": "assistant", "content": final}]
    with pytest.raises(FinalMessageNotRendered, match=needle):
        tok.apply_chat_template(messages, add_generation_prompt=False, chat_template=source,
                                continue_final_message=True)


def test_extra_template_variables_reach_the_template_but_may_not_set_the_renderers(tok):
    source = "{{ messages | length }}{% if enable_thinking %}<think>{% endif %}"
    assert tok.apply_chat_template(CHAT, chat_template=source, enable_thinking=True) == "3<think>"
    assert tok.apply_chat_template(CHAT, chat_template=source, enable_thinking=False) == "3"
    with pytest.raises(ValueError, match=r"\['bos_token', 'strftime_now'\] are set by the renderer"):
        tok.apply_chat_template(CHAT, chat_template=source, bos_token="x", strftime_now=1)
