"""POST /v1/completions: raw prompts (text or token ids, one or a batch), answered with a
``text_completion`` or a stream of them. Choice ``i`` of prompt ``p`` has index ``p * n + i``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, StreamingResponse

from msa.serve.chat import sse
from msa.serve.errors import OpenAIError
from msa.serve.logprobs import LegacyLogprobs
from msa.serve.schemas import CompletionRequest, new_id, now
from msa.serve.server import GenerationStream, OpenAIServer, merge_streams

MAX_PROMPTS = 64


class TextChoice:
    def __init__(self, index: int, logprobs: int | None, skip_special_tokens: bool = True) -> None:
        self.index = index
        self.text: list[str] = []
        self.logprobs = LegacyLogprobs(logprobs, skip_special_tokens) if logprobs is not None else None
        self.num_tokens = 0
        self.finish_reason: str | None = None


def _prompt_ids(server: OpenAIServer, prompt: str | list[int], position: int) -> list[int]:
    if isinstance(prompt, str):
        return server.tokenizer.encode(prompt, add_special_tokens=True)
    vocab = server.tokenizer.vocab_size
    bad = next((t for t in prompt if t >= vocab), None)
    if bad is not None:
        raise OpenAIError(
            400,
            f"prompt {position} holds token id {bad}, outside the vocabulary [0, {vocab})",
            param="prompt",
            code="invalid_value",
        )
    return list(prompt)


async def create_completion(
    server: OpenAIServer, req: CompletionRequest, arrival: float
) -> JSONResponse | StreamingResponse:
    server.check_model(req.model)
    prompts = req.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(
            400, f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt"
        )
    prompt_ids = [_prompt_ids(server, p, i) for i, p in enumerate(prompts)]
    params = [
        server.request_params(req, len(ids), req.max_tokens, "prompt", req.logprobs) for ids in prompt_ids
    ]
    timers = [server.metrics.track(arrival, "completions") for _ in prompt_ids]
    streams = await server.open_streams(list(zip(prompt_ids, params, timers, strict=True)), "prompt")
    choices = [TextChoice(i, req.logprobs, req.skip_special_tokens) for i in range(len(prompts) * req.n)]
    response_id = new_id("cmpl")
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = _chunks(server, streams, choices, req.n, response_id, include_usage)
        return StreamingResponse(
            events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    try:
        async for position, out in merge_streams(streams):
            _step(server, choices[position * req.n + out.index], out)
    finally:
        for stream in streams:
            await stream.close()
    return JSONResponse(
        {
            "id": response_id,
            "object": "text_completion",
            "created": now(),
            "model": server.model_name,
            "choices": [
                {
                    "index": c.index,
                    "text": "".join(c.text),
                    "finish_reason": c.finish_reason,
                    "logprobs": c.logprobs.as_dict() if c.logprobs else None,
                }
                for c in choices
            ],
            "usage": _usage(streams, choices),
        }
    )


def _step(server: OpenAIServer, choice: TextChoice, out) -> dict | None:
    choice.text.append(out.text)
    choice.num_tokens += len(out.token_ids)
    if out.finish_reason is not None:
        choice.finish_reason = out.finish_reason
    return choice.logprobs.add(out, server) if choice.logprobs else None


def _usage(streams: list[GenerationStream], choices: list[TextChoice]) -> dict:
    prompt = sum(s.num_prompt_tokens for s in streams)
    completion = sum(c.num_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _chunks(
    server: OpenAIServer,
    streams: list[GenerationStream],
    choices: list[TextChoice],
    n: int,
    response_id: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    created = now()

    def chunk(choice_body: dict) -> str:
        body = {
            "id": response_id,
            "object": "text_completion",
            "created": created,
            "model": server.model_name,
            "choices": [choice_body],
        }
        if include_usage:
            body["usage"] = None
        return sse(body)

    try:
        async for position, out in merge_streams(streams):
            choice = choices[position * n + out.index]
            logprobs = _step(server, choice, out)
            if out.text or logprobs or out.finish_reason is not None:
                yield chunk(
                    {
                        "index": choice.index,
                        "text": out.text,
                        "logprobs": logprobs,
                        "finish_reason": out.finish_reason,
                    }
                )
        if include_usage:
            yield sse(
                {
                    "id": response_id,
                    "object": "text_completion",
                    "created": created,
                    "model": server.model_name,
                    "choices": [],
                    "usage": _usage(streams, choices),
                }
            )
    except OpenAIError as e:
        yield sse(e.body())
    finally:
        for stream in streams:
            await stream.close()
    yield sse("[DONE]")
