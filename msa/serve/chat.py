"""POST /v1/chat/completions: render the messages (and tools) with the chat template, generate,
and answer with a ``chat.completion`` or a stream of ``chat.completion.chunk`` events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import jinja2
from fastapi.responses import JSONResponse, StreamingResponse

from msa.cluster.protocol import TokenOutput
from msa.platform.tokenizer import FinalMessageNotRendered
from msa.serve.errors import OpenAIError
from msa.serve.logprobs import chat_entries
from msa.serve.schemas import ChatCompletionRequest, new_id, now
from msa.serve.server import GenerationStream, OpenAIServer
from msa.serve.tools import ParsedToolCall, ToolCallParser, tool_call_prefill


def sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def render_prompt(server: OpenAIServer, req: ChatCompletionRequest) -> tuple[list[int], str]:
    """Prompt token ids and the prefill text they end with (see ``tool_call_prefill``). Tools are
    left out of the prompt when tool_choice is "none"."""
    tool_choice = req.effective_tool_choice
    use_tools = bool(req.tools) and tool_choice != "none"
    tools = [tool.model_dump(exclude_none=True) for tool in req.tools] if use_tools else None
    messages = [message.for_template() for message in req.messages]
    try:
        text = server.tokenizer.apply_chat_template(
            messages,
            tools=tools,
            add_generation_prompt=req.add_generation_prompt,
            continue_final_message=req.continue_final_message,
            **(req.chat_template_kwargs or {}),
        )
    except FinalMessageNotRendered as e:
        raise OpenAIError(400, str(e), param="continue_final_message") from e
    except (jinja2.TemplateError, ValueError) as e:
        raise OpenAIError(
            400, f"the messages do not fit the model's chat template: {e}", param="messages"
        ) from e
    prefill = tool_call_prefill(tool_choice) if use_tools else ""
    if prefill and not (req.add_generation_prompt or req.continue_final_message):
        raise OpenAIError(
            400,
            "a forced tool call (tool_choice 'required' or a named function) starts in the assistant's "
            "turn, which add_generation_prompt: false leaves unopened; send add_generation_prompt: true "
            "or continue_final_message: true",
            param="tool_choice",
        )
    return server.tokenizer.encode(text + prefill), prefill


class ChatChoice:
    """One choice as it streams: content, parsed tool calls, logprobs and token count."""

    def __init__(
        self,
        server: OpenAIServer,
        index: int,
        *,
        parse_tools: bool,
        prefill: str,
        top_logprobs: int | None,
        skip_special_tokens: bool = True,
    ) -> None:
        self.server, self.index, self.top_logprobs = server, index, top_logprobs
        self.parser = ToolCallParser() if parse_tools else None
        # Marker tokens are in the text already when special tokens are not skipped.
        self.restore_markers = parse_tools and skip_special_tokens
        if self.parser is not None and prefill:
            self.parser.feed(prefill)
        self.num_tokens = 0
        self.content: list[str] = []
        self.calls: list[ParsedToolCall] = []
        self.logprobs: list[dict] = []
        self.finish_reason: str | None = None

    def step(self, out: TokenOutput) -> tuple[str, list[ParsedToolCall], list[dict] | None]:
        """Take one output; return the content and tool calls that became certain, and its logprobs."""
        self.num_tokens += len(out.token_ids)
        piece = self.server.piece(out, restore_markers=self.restore_markers)
        if self.parser is None:
            content, calls = piece, []
        else:
            content, calls = self.parser.feed(piece)
            if out.finish_reason is not None:
                tail, more = self.parser.finish()
                content, calls = content + tail, calls + more
        logprobs = None
        if self.top_logprobs is not None:
            logprobs = chat_entries(out, self.top_logprobs, self.server)
            self.logprobs.extend(logprobs)
        self.content.append(content)
        self.calls.extend(calls)
        if out.finish_reason is not None:
            called = self.calls and out.finish_reason == "stop"
            self.finish_reason = "tool_calls" if called else out.finish_reason
        return content, calls, logprobs

    def message(self) -> dict:
        content = "".join(self.content)
        message: dict = {"role": "assistant", "content": content}
        if self.calls:
            message["content"] = content.strip() or None
            message["tool_calls"] = [call.to_openai() for call in self.calls]
        return message


async def create_chat_completion(
    server: OpenAIServer, req: ChatCompletionRequest, arrival: float
) -> JSONResponse | StreamingResponse:
    server.check_model(req.model)
    prompt_ids, prefill = render_prompt(server, req)
    top_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    params = server.request_params(
        req, len(prompt_ids), req.completion_limit, "messages", top_logprobs, req.completion_limit_field
    )
    timer = server.metrics.track(arrival, "chat")
    stream = await server.open_stream(prompt_ids, params, timer, "messages")
    parse_tools = bool(req.tools) and req.effective_tool_choice != "none"
    choices = [
        ChatChoice(
            server,
            i,
            parse_tools=parse_tools,
            prefill=prefill,
            top_logprobs=top_logprobs,
            skip_special_tokens=req.skip_special_tokens,
        )
        for i in range(req.n)
    ]
    response_id = new_id("chatcmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _chunks(server, stream, choices, response_id, include_usage)
        return StreamingResponse(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        async for out in stream:
            choices[out.index].step(out)
    finally:
        await stream.close()
    completion_tokens = sum(c.num_tokens for c in choices)
    return JSONResponse(
        {
            "id": response_id,
            "object": "chat.completion",
            "created": now(),
            "model": server.model_name,
            "choices": [
                {
                    "index": c.index,
                    "message": c.message(),
                    "finish_reason": c.finish_reason,
                    "logprobs": {"content": c.logprobs} if c.top_logprobs is not None else None,
                }
                for c in choices
            ],
            "usage": {
                "prompt_tokens": stream.num_prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": stream.num_prompt_tokens + completion_tokens,
            },
        }
    )


async def _chunks(
    server: OpenAIServer,
    stream: GenerationStream,
    choices: list[ChatChoice],
    response_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = now()

    def chunk(
        index: int, delta: dict, *, logprobs: list[dict] | None = None, finish: str | None = None
    ) -> str:
        body = {
            "id": response_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": server.model_name,
            "choices": [
                {
                    "index": index,
                    "delta": delta,
                    "finish_reason": finish,
                    "logprobs": {"content": logprobs} if logprobs is not None else None,
                }
            ],
        }
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        for choice in choices:
            yield chunk(choice.index, {"role": "assistant", "content": ""})
        async for out in stream:
            choice = choices[out.index]
            first_call = len(choice.calls)
            content, calls, logprobs = choice.step(out)
            delta: dict = {"content": content} if content else {}
            if calls:
                delta["tool_calls"] = [call.to_openai(first_call + k) for k, call in enumerate(calls)]
            if delta or logprobs:
                yield chunk(choice.index, delta, logprobs=logprobs)
            if out.finish_reason is not None:
                yield chunk(choice.index, {}, finish=choice.finish_reason)
        if include_usage:
            completion_tokens = sum(c.num_tokens for c in choices)
            usage = {
                "prompt_tokens": stream.num_prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": stream.num_prompt_tokens + completion_tokens,
            }
            yield sse(
                {
                    "id": response_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": server.model_name,
                    "choices": [],
                    "usage": usage,
                }
            )
    except OpenAIError as e:
        yield sse(e.body())
    finally:
        await stream.close()
    yield sse("[DONE]")
