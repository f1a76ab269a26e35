"""OpenAI request and response bodies, validated at the HTTP boundary.

Requests reject out-of-range values here, so malformed input never reaches the engine; the field
limits mirror ``msa.cluster.protocol.SamplingParams``. Unknown request fields are ignored, as
OpenAI's clients send optional fields this server does not use. Known parameters this engine does
not implement (penalties, logit_bias, structured output, ...) are accepted only at the values that
change nothing, so a request never silently gets other output than it asked for.
"""

from __future__ import annotations

import functools
import json
import time
import typing
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from msa.platform.tokenizer import RESERVED_TEMPLATE_VARIABLES

MAX_N = 128
MAX_STOP = 16
MAX_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """An explicit null for an optional field whose type has no null (``temperature``, ``n``,
        ``stream``, ...) means its default: OpenAI's API marks them nullable, and its clients send
        null for a parameter given as None."""
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items() if v is not None or k not in _defaulted_non_null(cls)}


@functools.cache
def _defaulted_non_null(model: type[BaseModel]) -> frozenset[str]:
    """The fields of ``model`` that have a default and whose type does not admit None."""
    return frozenset(
        name
        for name, field in model.model_fields.items()
        if not field.is_required()
        and field.annotation is not Any
        and type(None) not in typing.get_args(field.annotation)
    )


def no_op_only(*accepted: Any) -> AfterValidator:
    """A field's validator for a parameter this engine does not implement: null and ``accepted``
    (the values that change nothing, which clients send by default) pass; any other is refused."""

    def check(value: Any, info: ValidationInfo) -> Any:
        if value is None or value in accepted:
            return value
        send = " or ".join(json.dumps(a) for a in accepted)
        instead = f"send {send} or leave it out" if accepted else "leave it out"
        raise ValueError(f"this server does not support {info.field_name}; {instead}")

    return AfterValidator(check)


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Request):
    """Fields shared by chat and legacy completions."""

    model: str = Field(min_length=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, description="0 or -1 turns it off")
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Not in OpenAI's API; vLLM's extensions of the same names. ignore_eos is for benchmarks that
    # need fixed lengths; stop_token_ids end a choice like EOS (checked against the vocabulary by
    # the server, which knows it); include_stop_str_in_output keeps the stop string (or stop
    # token's text) that ended a choice in its text.
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None  # checked against the vocabulary by the engine
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # Parameters of OpenAI's API and vLLM's extensions that this engine does not implement.
    frequency_penalty: Annotated[float | None, no_op_only(0.0)] = None
    presence_penalty: Annotated[float | None, no_op_only(0.0)] = None
    logit_bias: Annotated[dict[str, float] | None, no_op_only({})] = None
    response_format: dict[str, Any] | None = None
    repetition_penalty: Annotated[float | None, no_op_only(1.0)] = None
    min_p: Annotated[float | None, no_op_only(0.0)] = None
    min_tokens: Annotated[int | None, no_op_only(0)] = None
    use_beam_search: Annotated[bool | None, no_op_only(False)] = None
    guided_json: Annotated[Any, no_op_only()] = None
    guided_regex: Annotated[Any, no_op_only()] = None
    guided_choice: Annotated[Any, no_op_only()] = None
    guided_grammar: Annotated[Any, no_op_only()] = None
    structured_outputs: Annotated[Any, no_op_only()] = None
    best_of: int | None = None  # only best_of == n, which samples n and returns them all
    bad_words: Annotated[list[str] | None, no_op_only([])] = None
    prompt_logprobs: Annotated[int | None, no_op_only()] = None
    truncate_prompt_tokens: Annotated[int | None, no_op_only()] = None
    length_penalty: Annotated[float | None, no_op_only(1.0)] = None
    priority: Annotated[int | None, no_op_only(0)] = None
    return_tokens_as_token_ids: Annotated[bool | None, no_op_only(False)] = None
    # guided_decoding_backend and guided_whitespace_pattern only tune guided decoding, which the
    # guided_* fields above refuse; alone they change nothing, so they pass as unknown fields.

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if best_of is not None and best_of != n:
            raise ValueError(f"this server does not support best_of other than n; send {n} or leave it out")
        return best_of

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"stop must be at most {MAX_STOP} non-empty strings")
        return stops

    # Checks of one field against an earlier one are field validators (reading ``info.data``), so
    # the error's location, and the error body's param, is the field to fix.
    @field_validator("stream_options")
    @classmethod
    def _check_stream_options(
        cls, options: StreamOptions | None, info: ValidationInfo
    ) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return options

    @field_validator("response_format")
    @classmethod
    def _check_response_format(cls, response_format: dict[str, Any] | None) -> dict[str, Any] | None:
        if response_format is not None and response_format.get("type") != "text":
            raise ValueError(
                f"this server does not support response_format of type {response_format.get('type')!r}; "
                'send {"type": "text"} or leave it out'
            )
        return response_format


# Chat requests -----------------------------------------------------------------------------------


class TextPart(_Request):
    type: Literal["text"]
    text: str


class FunctionCall(_Request):
    name: str = Field(min_length=1)
    arguments: str


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_part_types(cls, content: Any) -> Any:
        # Checked before the union is tried, so an image part gets this message rather than one
        # error per union member.
        parts = content if isinstance(content, list) else []
        kinds = [part.get("type") for part in parts if isinstance(part, dict)]
        other = next((kind for kind in kinds if isinstance(kind, str) and kind != "text"), None)
        if other is not None:
            raise ValueError(f"{other} content parts are not supported by this model; send text parts")
        return content

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages may carry tool_calls")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it (developer turns render as system turns)."""
        message = self.model_dump(exclude_none=True)
        if self.role == "developer":
            message["role"] = "system"
        return message


class FunctionDefinition(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # vLLM's chat extensions. add_generation_prompt opens the assistant's turn after the messages;
    # continue_final_message instead ends the prompt inside the final message (of any role, as in
    # vLLM), so the model goes on writing it; chat_template_kwargs are further variables of the chat template.
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's chat extensions this server does not implement: a request's own template (vLLM too
    # refuses it unless its server is started to trust them), echoing the final message, special
    # tokens added to the rendered prompt, retrieval documents for the template.
    chat_template: Annotated[str | None, no_op_only()] = None
    echo: Annotated[bool | None, no_op_only(False)] = None
    add_special_tokens: Annotated[bool | None, no_op_only(False)] = None
    documents: Annotated[list[dict[str, Any]] | None, no_op_only()] = None

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, top_logprobs: int | None, info: ValidationInfo) -> int | None:
        if top_logprobs is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return top_logprobs

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, tool_choice: Any, info: ValidationInfo) -> Any:
        names = [tool.function.name for tool in info.data.get("tools") or []]
        if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in names:
            raise ValueError(
                f"tool_choice names function {tool_choice.function.name!r}, "
                f"which is not among the tools {names}"
            )
        if tool_choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs at least one tool")
        return tool_choice

    @field_validator("continue_final_message")
    @classmethod
    def _check_continue_final_message(cls, continue_final: bool, info: ValidationInfo) -> bool:
        if not continue_final:
            return continue_final
        if info.data.get("add_generation_prompt"):
            raise ValueError(
                "continue_final_message and add_generation_prompt cannot both be true; "
                "send add_generation_prompt: false to continue the final message"
            )
        return continue_final

    @field_validator("chat_template_kwargs")
    @classmethod
    def _check_chat_template_kwargs(cls, kwargs: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = sorted(RESERVED_TEMPLATE_VARIABLES.intersection(kwargs or {}))
        if reserved:
            raise ValueError(
                f"chat_template_kwargs may not set {reserved}: the server sets them itself "
                "(from messages, tools, add_generation_prompt and the tokenizer)"
            )
        return kwargs

    @property
    def completion_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def completion_limit_field(self) -> str:
        """The field ``completion_limit`` comes from, for errors about it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def effective_tool_choice(self) -> str | NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, "none" otherwise."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"


# Completion requests -----------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: Annotated[bool, no_op_only(False)] = False
    suffix: Annotated[str | None, no_op_only("")] = None
    max_tokens: int | None = Field(default=16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and (not prompt or any(isinstance(p, list) and not p for p in prompt)):
            raise ValueError("prompt must not be empty")
        if isinstance(prompt, list):
            # A flat list is one prompt of token ids; a nested list, a batch of them.
            ids = [t for p in prompt for t in (p if isinstance(p, list) else [p]) if isinstance(t, int)]
            if any(t < 0 for t in ids):
                raise ValueError("token ids must be >= 0")
        return prompt

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token-id list each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


# Responses ---------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "msa"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
