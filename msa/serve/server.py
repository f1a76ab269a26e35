"""``OpenAIServer``: what the HTTP routes share around one engine — its tokenizer, the served
model name and key, metrics, the request budget checks, and engine calls that abort when abandoned.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import time
from collections.abc import AsyncIterator

from msa.cluster.protocol import Engine, EngineError, InvalidRequestError, SamplingParams, TokenOutput
from msa.platform.aio import wait_within
from msa.platform.tokenizer import DEFAULT_CHAT_TEMPLATE, Tokenizer
from msa.serve.errors import OpenAIError, from_engine_error, request_field
from msa.serve.metrics import RequestTimer, ServeMetrics
from msa.serve.schemas import ChatCompletionRequest, CompletionRequest, new_id
from msa.serve.tools import special_marker_ids


class OpenAIServer:
    """Serves ``engine`` (already started) under ``model_name``; ``api_key`` None means no auth."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: Tokenizer,
        *,
        model_name: str,
        api_key: str | None = None,
        health_timeout_s: float = 30.0,
    ) -> None:
        self.engine = engine
        if not tokenizer.chat_template:
            # A checkpoint without a chat template gets the documented default (ChatML + <tool_call>).
            tokenizer = copy.copy(tokenizer)
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        self.tokenizer = tokenizer
        self.model_name, self.api_key = model_name, api_key
        self.health_timeout_s = health_timeout_s
        self.metrics = ServeMetrics(engine.stats, model_name)
        self.marker_ids = special_marker_ids(tokenizer)
        self._token_texts: dict[int, str] = {}
        self._token_bytes: dict[tuple[int, bool], bytes] = {}

    # Checks ------------------------------------------------------------------------------------

    def check_api_key(self, authorization: str | None) -> None:
        if self.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        matches = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not matches:
            raise OpenAIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"
            )

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def completion_budget(
        self, num_prompt_tokens: int, requested: int | None, prompt_field: str, limit_field: str
    ) -> int:
        """max_tokens for the engine: the request's, or all the context the prompt leaves. The limit
        is the engine's, the ``max_model_len`` that /v1/models reports; ``limit_field`` names the
        request field that asked for ``requested`` tokens."""
        limit = self.engine.max_context_length
        if num_prompt_tokens >= limit:
            raise OpenAIError(
                400,
                f"the prompt has {num_prompt_tokens} tokens, but this model's context "
                f"holds at most {limit} tokens (prompt + completion)",
                param=prompt_field,
                code="context_length_exceeded",
            )
        if requested is not None and num_prompt_tokens + requested > limit:
            raise OpenAIError(
                400,
                f"this request needs {num_prompt_tokens} prompt + {requested} completion tokens = "
                f"{num_prompt_tokens + requested}, but this model's context holds at most {limit} "
                f"tokens; set {limit_field} to at most {limit - num_prompt_tokens}",
                param=limit_field,
                code="context_length_exceeded",
            )
        return requested if requested is not None else limit - num_prompt_tokens

    def stop_token_ids(self, token_ids: list[int] | None) -> list[int]:
        """The request's stop_token_ids, each checked to be in the vocabulary."""
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in token_ids or [] if not 0 <= t < vocab), None)
        if bad is not None:
            raise OpenAIError(
                400,
                f"stop_token_ids holds token id {bad}, outside the vocabulary [0, {vocab})",
                param="stop_token_ids",
                code="invalid_value",
            )
        return list(token_ids or [])

    def request_params(
        self,
        req: ChatCompletionRequest | CompletionRequest,
        num_prompt_tokens: int,
        requested_max_tokens: int | None,
        prompt_field: str,
        logprobs: int | None,
        limit_field: str = "max_tokens",
    ) -> SamplingParams:
        """The engine's sampling parameters for one prompt of a chat or completions request;
        ``prompt_field`` and ``limit_field`` name the request's prompt and max-tokens fields."""
        max_tokens = self.completion_budget(
            num_prompt_tokens, requested_max_tokens, prompt_field, limit_field
        )
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=req.temperature,
                top_p=req.top_p,
                top_k=max(0, req.top_k),
                seed=req.seed,
                n=req.n,
                stop=req.stop,
                stop_token_ids=self.stop_token_ids(req.stop_token_ids),
                ignore_eos=req.ignore_eos,
                logprobs=logprobs,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens,
                allowed_token_ids=req.allowed_token_ids,
            )
        except InvalidRequestError as e:
            raise OpenAIError(400, str(e), param=request_field(e, prompt_field), code="invalid_value") from e

    # Tokens as text ----------------------------------------------------------------------------

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def token_bytes(self, token_id: int, skip_special_tokens: bool = False) -> bytes:
        """The bytes the token adds to text, raw where they are part of a character (logprobs' ``bytes``)."""
        key = (token_id, skip_special_tokens)
        raw = self._token_bytes.get(key)
        if raw is None:
            raw = self._token_bytes[key] = self.tokenizer.token_bytes(token_id, skip_special_tokens)
        return raw

    def piece(self, out: TokenOutput, restore_markers: bool) -> str:
        """The output's text; with ``restore_markers`` the tool-call markers that decoding skipped
        are put back, each after the text of the engine step that made it (a step's text precedes
        its own tokens), also where a reader that fell behind got several steps in one output."""
        if not restore_markers or not self.marker_ids:
            return out.text
        return "".join(
            text + "".join(self.marker_ids.get(t, "") for t in token_ids) for token_ids, text in out.steps()
        )

    # Engine calls ------------------------------------------------------------------------------

    async def open_stream(
        self, prompt_ids: list[int], params: SamplingParams, timer: RequestTimer, prompt_field: str
    ) -> GenerationStream:
        (stream,) = await self.open_streams([(prompt_ids, params, timer)], prompt_field)
        return stream

    async def open_streams(
        self, requests: list[tuple[list[int], SamplingParams, RequestTimer]], prompt_field: str
    ) -> list[GenerationStream]:
        """One stream per (prompt ids, params, timer), opened at once so the engine admits (and
        prefills) the prompts together. If any fails, every stream is closed, which aborts the
        engine requests already admitted, and the failure of the first such prompt is raised."""
        if not self.engine.stats().healthy:
            raise OpenAIError(503, "the engine is not running", code="engine_dead")
        streams = [
            GenerationStream(self, ids, params, timer, prompt_field) for ids, params, timer in requests
        ]
        try:
            opened = await asyncio.gather(*(s.open() for s in streams), return_exceptions=True)
            failure = next((result for result in opened if isinstance(result, BaseException)), None)
            if failure is not None:
                raise failure
        except BaseException:
            for stream in streams:
                await stream.close()
            raise
        return streams

    async def health(self) -> None:
        try:
            await wait_within(self.engine.check_health(), self.health_timeout_s)
        except asyncio.TimeoutError as e:
            raise OpenAIError(
                503,
                f"the engine did not answer a health step within {self.health_timeout_s} s",
                code="engine_unhealthy",
            ) from e
        except EngineError as e:
            raise OpenAIError(503, f"the engine is unhealthy: {e}", code="engine_dead") from e


class GenerationStream:
    """One engine request. ``open`` waits for its first output so admission errors become an HTTP
    status before any byte is sent; closing it before every choice finished aborts the request,
    which frees its KV pages (a client that went away)."""

    def __init__(
        self,
        server: OpenAIServer,
        prompt_ids: list[int],
        params: SamplingParams,
        timer: RequestTimer,
        prompt_field: str,
    ) -> None:
        self.server, self.params, self.timer = server, params, timer
        self.request_id = new_id("req")
        self.num_prompt_tokens = len(prompt_ids)
        self._prompt_field = prompt_field
        self._outputs = server.engine.generate(self.request_id, prompt_ids, params)
        self._first: TokenOutput | None = None
        self._finished = 0

    async def _next(self) -> TokenOutput:
        try:
            out = await self._outputs.__anext__()
        except EngineError as e:
            status_error = from_engine_error(e, self._prompt_field)
            raise status_error from e
        self.timer.output(out.index, len(out.token_ids))
        if out.finish_reason is not None:
            self._finished += 1
            if self._finished == self.params.n:
                self.timer.finished(out.finish_reason)
        return out

    async def open(self) -> None:
        self.timer.submitted(self.num_prompt_tokens)
        self._first = await self._next()  # on failure the caller (``open_streams``) closes it

    async def __aiter__(self) -> AsyncIterator[TokenOutput]:
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        while self._finished < self.params.n:
            yield await self._next()

    @property
    def done(self) -> bool:
        return self._finished >= self.params.n

    async def close(self) -> None:
        if not self.done:
            with contextlib.suppress(EngineError):
                await self.server.engine.abort(self.request_id)
        await self._outputs.aclose()


async def merge_streams(streams: list[GenerationStream]) -> AsyncIterator[tuple[int, TokenOutput]]:
    """Outputs of several requests as they come, each with the position of its stream."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(position: int, stream: GenerationStream) -> None:
        try:
            async for out in stream:
                await queue.put((position, out))
        except BaseException as e:  # handed to the consumer, which re-raises it
            await queue.put(e)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def arrival_time() -> float:
    return time.perf_counter()
