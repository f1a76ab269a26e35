"""Tool calls in the model's format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A parsed call; ``error`` is set (and name/arguments empty) when the call was malformed."""

    name: str
    arguments: dict[str, Any]
    error: str | None = None


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every ``<tool_call>`` block of ``text`` in order; malformed ones come back with ``error``."""
    calls = []
    for body in _CALL.findall(text):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", {}, f"tool call is not valid JSON: {e.msg}"))
            continue
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            calls.append(ToolCall("", {}, 'tool call must be an object with a string "name"'))
            continue
        arguments = value.get("arguments", {})
        if not isinstance(arguments, dict):
            calls.append(ToolCall(value["name"], {}, '"arguments" must be an object'))
            continue
        calls.append(ToolCall(value["name"], arguments))
    return calls


def strip_tool_calls(text: str) -> str:
    """The reply without its tool-call blocks (the part a final answer is read from)."""
    return _CALL.sub("", text)


def tool_message(content: str) -> dict[str, Any]:
    return {"role": "tool", "content": content}


def function_schema(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": parameters, "required": sorted(parameters)},
        },
    }
