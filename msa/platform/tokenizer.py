"""Tokenizer: a checkpoint's ``tokenizer.json`` + chat template, or the byte-level default of the tiny model.

The default has the 256 bytes as ids 0..255 (no merges, so every text encodes byte by byte) and
eight special tokens after them, 264 ids in all, which is ``tiny().vocab_size``.
"""

from __future__ import annotations

import functools
import json
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

SPECIAL_TOKENS = (
    "<bos>",
    "<eos>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)

CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
CHAT_TEMPLATE_JSON = "chat_template.json"

# Names the renderer sets itself, or takes as its own arguments: extra template variables may not
# take them.
RESERVED_TEMPLATE_VARIABLES = frozenset(
    {
        "messages",
        "tools",
        "add_generation_prompt",
        "continue_final_message",
        "chat_template",
        "bos_token",
        "eos_token",
        "raise_exception",
        "strftime_now",
    }
)

# ChatML turns: "<|im_start|>{role}\n{content}<|im_end|>\n". Tools are listed as JSON in the system
# turn; an assistant's tool calls follow its content, each as
# <tool_call>{"name": ..., "arguments": {...}}</tool_call>; tool results are turns of role "tool"
# wrapped in <tool_response>. Content may be a string or a list of OpenAI-style parts, of which the
# text parts are kept.
DEFAULT_CHAT_TEMPLATE = r"""
{%- macro text(content) -%}
{%- if content is string -%}{{ content }}
{%- elif content -%}{%- for part in content if part.type == 'text' -%}{{ part.text }}{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- set system = messages[0].content if messages and messages[0].role == 'system' else none -%}
{%- if system is not none or tools -%}
{{- '<|im_start|>system\n' + text(system) -}}
{%- if tools -%}
{%- if system -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\nYou may call the functions below. For each call, reply with '
    + '<tool_call>{"name": <function name>, "arguments": <JSON object>}</tool_call>.\n<tools>\n' -}}
{%- for tool in tools -%}
{{- (tool.function if tool.function is defined else tool) | tojson + '\n' -}}
{%- endfor -%}
{{- '</tools>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role == 'tool' -%}
{{- '<|im_start|>tool\n<tool_response>' + text(message.content) + '</tool_response><|im_end|>\n' -}}
{%- elif not (loop.first and message.role == 'system') -%}
{{- '<|im_start|>' + message.role + '\n' + text(message.content) -}}
{%- for call in message.tool_calls or [] -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- set args = fn.arguments if fn.arguments is string else fn.arguments | tojson -%}
{{- '<tool_call>{"name": ' + fn.name | tojson + ', "arguments": ' + args + '}</tool_call>' -}}
{%- endfor -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte: the alphabet of the ByteLevel pre-tokenizer."""
    printable = {
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    }
    mapping, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    """The byte each character of the ByteLevel alphabet stands for."""
    return {char: byte for byte, char in _bytes_to_unicode().items()}


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own tojson escapes HTML characters; templates written for chat models expect plain
    # JSON, with the keyword arguments of transformers' filter.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class GenerationBlock(Extension):
    """``{% generation %}...{% endgeneration %}``, which transformers' templates put around the
    text the assistant generates (to build an assistant-token mask). Without a mask to build, the
    block renders its body as it is, in a scope of its own as transformers' macro call gives it."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=8)
def _compile_template(source: str) -> jinja2.Template:
    """The template in the environment transformers renders chat templates in, sandboxed."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", GenerationBlock]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _parse_chat_template(value: Any, source: str) -> str | dict[str, str] | None:
    """A ``chat_template`` entry as read: one template, or several by name, either as the list of
    ``{"name", "template"}`` that tokenizer_config.json holds or as a ``{name: template}`` object."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
        for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    if isinstance(value, dict) and all(isinstance(t, str) for t in value.values()):
        return dict(value)
    raise ValueError(
        f"{source}: 'chat_template' must be a string or a list of {{'name': ..., 'template': ...}}, "
        f"got {value!r:.80}"
    )


def _read_chat_template(directory: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """The checkpoint's chat template(s), in transformers' order: ``chat_template.jinja`` (the
    default) and ``additional_chat_templates/<name>.jinja`` replace what the config files hold;
    else the ``chat_template`` of ``chat_template.json``, else that of ``tokenizer_config.json``."""
    files: dict[str, str] = {}
    if (directory / CHAT_TEMPLATE_FILE).exists():
        files["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    for path in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja")):
        files[path.stem] = path.read_text(encoding="utf-8")
    if files:
        return files["default"] if list(files) == ["default"] else files
    json_path = directory / CHAT_TEMPLATE_JSON
    if json_path.exists():
        entry = json.loads(json_path.read_text(encoding="utf-8"))
        if not isinstance(entry, dict) or "chat_template" not in entry:
            raise ValueError(f"{json_path} must hold an object with a 'chat_template' entry")
        return _parse_chat_template(entry["chat_template"], str(json_path))
    return _parse_chat_template(config.get("chat_template"), str(directory / "tokenizer_config.json"))


def _token_text(entry: Any) -> str | None:
    """tokenizer_config.json writes a token as a string or as {"content": ...}."""
    return entry.get("content") if isinstance(entry, dict) else entry


class FinalMessageNotRendered(ValueError):
    """continue_final_message was asked for, but the final message's text is not in the prompt."""


def _mark_final_message(messages: list[dict[str, Any]], mark: str) -> tuple[list[dict[str, Any]], str]:
    """``messages`` with ``mark`` after the final message's text (its last text part), and that
    text."""
    final = dict(messages[-1]) if messages else {}
    content = final.get("content")
    text = None
    if isinstance(content, str):
        text, final["content"] = content, content + mark
    elif isinstance(content, list):
        # Parts render one after another, so the last text part ends the message.
        at = [i for i, part in enumerate(content) if isinstance(part, dict) and "text" in part]
        if at:
            parts = list(content)
            text = parts[at[-1]]["text"]
            parts[at[-1]] = {**parts[at[-1]], "text": text + mark}
            final["content"] = parts
    if not isinstance(text, str) or not text.strip():
        raise FinalMessageNotRendered("continue_final_message needs a final message with text to continue")
    return [*messages[:-1], final], text


def _cut_after_final_message(text: str, marked: str, mark: str, final_text: str) -> str:
    """The prompt ``text`` up to the end of the final message's text, located by rendering it with
    ``mark`` after that text (``marked``), so text of the same letters elsewhere (an earlier turn,
    the end-of-turn markup) is never taken for it. Trailing whitespace of the message stays where
    the template keeps it."""
    at = marked.find(mark)
    prefix = marked[:at]
    trailing = final_text[len(final_text.rstrip()) :]
    if at >= 0 and trailing and not text.startswith(prefix):
        prefix = prefix[: len(prefix) - len(trailing)]  # the template trims the message
    if at < 0 or not prefix.rstrip().endswith(final_text.strip()) or not text.startswith(prefix):
        raise FinalMessageNotRendered(
            "continue_final_message: the chat template does not render the final message's text "
            "as it is, so the prompt cannot end inside it"
        )
    return prefix


class Tokenizer:
    """Text <-> token ids, chat rendering and stop tokens of one model. ``chat_template`` is one
    template or, as in transformers, several by name (``{"default": ..., "tool_use": ...}``)."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        stop_token_ids: Sequence[int] = (),
        chat_template: str | dict[str, str] | None = None,
    ) -> None:
        self._tok = tokenizer
        self.bos_token, self.eos_token, self.chat_template = bos_token, eos_token, chat_template
        self.bos_token_id = self._id_of(bos_token)
        eos = [self._id_of(eos_token)] if eos_token is not None else []
        self.eos_token_ids: list[int] = list(dict.fromkeys([*eos, *stop_token_ids]))

    def _id_of(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    @classmethod
    def byte_level_default(cls) -> Tokenizer:
        """The tiny model's tokenizer: bytes 0..255, then ``SPECIAL_TOKENS`` at 256..263; ChatML template."""
        alphabet = _bytes_to_unicode()
        tok = _HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
        im_end = tok.token_to_id("<|im_end|>")
        return cls(
            tok,
            bos_token="<bos>",
            eos_token="<eos>",
            stop_token_ids=[im_end],
            chat_template=DEFAULT_CHAT_TEMPLATE,
        )

    @classmethod
    def from_directory(cls, directory: str | Path) -> Tokenizer:
        """Read ``tokenizer.json``, ``tokenizer_config.json`` (bos/eos tokens, chat_template), the
        chat template files that override its chat_template (``_read_chat_template``) and, if
        present, ``generation_config.json`` (its ``eos_token_id`` list adds stop tokens)."""
        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        tok = _HFTokenizer.from_file(str(directory / "tokenizer.json"))
        config_path = directory / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
        generation_path = directory / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
        stops = generation.get("eos_token_id")
        stops = [stops] if isinstance(stops, int) else list(stops or [])
        return cls(
            tok,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            stop_token_ids=stops,
            chat_template=_read_chat_template(directory, config),
        )

    def save(self, directory: str | Path) -> None:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``generation_config.json`` (stop ids)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
        }
        if isinstance(self.chat_template, dict):
            config["chat_template"] = [{"name": k, "template": t} for k, t in self.chat_template.items()]
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")
        generation = {"bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_ids}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids. With
        ``add_special_tokens`` the bos id (if the tokenizer has one) goes first."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; bytes that do not complete a UTF-8 character decode to U+FFFD."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes one token adds to decoded text: raw bytes, also where they are only part of a
        UTF-8 character (which ``decode`` shows as U+FFFD), for byte-level BPE tokens (GPT-2's byte
        alphabet, the default's) and byte-fallback tokens (``<0xE6>``); else the UTF-8 of the
        token's decoded text. A special token gives its text, or nothing with
        ``skip_special_tokens``."""
        text = self.decode([token_id], skip_special_tokens=skip_special_tokens)
        if "\ufffd" not in text:
            return text.encode()
        piece = self._tok.id_to_token(token_id) or ""
        alphabet = _unicode_to_bytes()
        if match := _BYTE_FALLBACK.fullmatch(piece):
            raw = bytes.fromhex(match[1])
        elif piece and all(char in alphabet for char in piece):
            raw = bytes(alphabet[char] for char in piece)
        else:
            raw = b""
        # Taken only where they decode to the token's text, so the piece was read as the decoder reads it.
        return raw if raw and raw.decode("utf-8", "replace") == text else text.encode()

    def _template_source(self, tools: list[dict[str, Any]] | None, name: str | None) -> str:
        """The template to render, chosen as transformers does: ``name`` when it names one of
        several templates (otherwise it is template source itself); else "tool_use" when tools
        are given and there is one, else "default"."""
        templates = self.chat_template
        if isinstance(templates, dict):
            if name is not None:
                return templates.get(name, name)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ValueError(
                f"this tokenizer has several chat templates and none named 'default'; pass "
                f"chat_template=<name>, one of {sorted(templates)}"
            )
        if name is not None:
            return name
        if not templates:
            raise ValueError("this tokenizer has no chat_template")
        return templates

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """Render OpenAI-style ``messages`` (and ``tools``) to the prompt text the model was trained on.
        ``chat_template`` picks one of several named templates, or is a template to use instead.
        ``continue_final_message`` ends the prompt right after the final message's text, without
        its end of turn, so the model goes on writing it. ``extra`` are further template variables
        (not among ``RESERVED_TEMPLATE_VARIABLES``)."""
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES.intersection(extra))
        if reserved:
            raise ValueError(f"the template variables {reserved} are set by the renderer itself")
        template = _compile_template(self._template_source(tools, chat_template))

        def render(messages: list[dict[str, Any]]) -> str:
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **extra,
            )

        if not continue_final_message:
            return render(messages)
        # Digits and @ read the same through case changes, trimming and escaping.
        mark = f"@@{secrets.randbelow(10**30):030d}@@"
        marked, final_text = _mark_final_message(messages, mark)
        return _cut_after_final_message(render(messages), render(marked), mark, final_text)

    def stream_decoder(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)


class StreamDecoder:
    """Incremental detokenisation: feed ids as they are sampled, get the newly printable text.

    Text is held back while it ends in an incomplete UTF-8 character (a multi-byte character split
    over byte tokens), and a short window of earlier ids is re-decoded each step so decoders that
    depend on the left context (leading spaces) still read right."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already printed

    def _pending(self) -> tuple[str, str]:
        printed = self._tokenizer.decode(self._ids[self._prefix : self._read], self._skip)
        return printed, self._tokenizer.decode(self._ids[self._prefix :], self._skip)

    def feed(self, ids: int | Iterable[int]) -> str:
        """Add one id or several; return the text that became printable (may be empty)."""
        self._ids.extend([ids] if isinstance(ids, int) else ids)
        printed, full = self._pending()
        if len(full) <= len(printed) or full.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return full[len(printed) :]

    def flush(self) -> str:
        """The text still held back (an incomplete character shows as U+FFFD); call once at the end."""
        printed, full = self._pending()
        self._prefix = self._read = len(self._ids)
        return full[len(printed) :]
