"""Tool calling: how tool_choice shapes the prompt, and parsing the model's
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` text into OpenAI tool calls.

The same incremental parser serves streaming and whole responses, so both agree on what is a
call. A call whose JSON does not parse (or lacks a name) stays content, markers included.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from msa.platform.tokenizer import Tokenizer
from msa.serve.schemas import NamedToolChoice

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"


def tool_call_prefill(tool_choice: str | NamedToolChoice) -> str:
    """Text appended after the generation prompt so the model starts inside a call: "required"
    opens one, a named function also writes its name. "auto" and "none" leave the model free."""
    if isinstance(tool_choice, NamedToolChoice):
        return f'{TOOL_CALL_OPEN}{{"name": {json.dumps(tool_choice.function.name)}, "arguments": '
    return TOOL_CALL_OPEN if tool_choice == "required" else ""


def special_marker_ids(tokenizer: Tokenizer) -> dict[int, str]:
    """Ids of single tokens spelling a tool-call marker that decoding with special tokens skipped
    drops; the server puts their text back so the parser sees the markers."""
    markers = {}
    for marker in (TOOL_CALL_OPEN, TOOL_CALL_CLOSE):
        ids = tokenizer.encode(marker)
        if len(ids) == 1 and tokenizer.decode(ids) == "":
            markers[ids[0]] = marker
    return markers


@dataclass(slots=True)
class ParsedToolCall:
    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        function = {"name": self.name, "arguments": self.arguments}
        call = {"id": self.id, "type": "function", "function": function}
        return call if index is None else {"index": index, **call}


def parse_call_body(body: str) -> ParsedToolCall | None:
    """The call in the JSON between the markers, or None if it is malformed."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) or not payload["name"]:
        return None
    arguments = payload.get("arguments", payload.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(payload["name"], json.dumps(arguments, ensure_ascii=False))


def _partial_marker_len(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolCallParser:
    """Splits generated text, fed in pieces, into content and complete tool calls.

    ``feed`` returns (content, calls) that became certain; text that may still be the start of a
    marker is held back, and a call's body is buffered until its closing marker."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self.calls: list[ParsedToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        self._buffer += text
        content, calls = [], []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_OPEN)
                if start < 0:
                    keep = _partial_marker_len(self._buffer, TOOL_CALL_OPEN)
                    content.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_CALL_OPEN) :]
                self._in_call = True
            end = self._buffer.find(TOOL_CALL_CLOSE)
            if end < 0:
                break
            body, self._buffer = self._buffer[:end], self._buffer[end + len(TOOL_CALL_CLOSE) :]
            self._in_call = False
            call = parse_call_body(body)
            if call is None:
                content.append(TOOL_CALL_OPEN + body + TOOL_CALL_CLOSE)
            else:
                calls.append(call)
        self.calls.extend(calls)
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """Flush at the end of generation. An unclosed call still counts if its JSON is complete
        (the model may stop right after it); otherwise its text is content."""
        rest, self._buffer = self._buffer, ""
        if not self._in_call:
            return rest, []
        self._in_call = False
        call = parse_call_body(rest)
        if call is None:
            return TOOL_CALL_OPEN + rest, []
        self.calls.append(call)
        return "", [call]


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """Whole-text parse: (content or None when only calls remain, calls)."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    content, calls = content + tail, calls + more
    return (content.strip() or None) if calls else content, calls
