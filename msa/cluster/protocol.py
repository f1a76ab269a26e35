"""The engine interface that serving and RL drive, and the values that cross it.

Shaped after Ray Serve LLM's engine protocol: start, generate (an async stream), abort,
check_health, update_weights, shutdown. Implementations live in ``msa.cluster.engine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from msa.platform.config import is_int, is_real


class EngineError(RuntimeError):
    """Base of the errors an engine raises to its callers. They pickle with their message and
    attributes (whatever their constructor takes), so they cross from an engine process intact."""

    def __reduce__(self):
        return _rebuild_error, (type(self), str(self), dict(self.__dict__))


def _rebuild_error(cls: type[EngineError], message: str, state: dict) -> EngineError:
    error = cls.__new__(cls)
    RuntimeError.__init__(error, message)
    error.__dict__.update(state)
    return error


class InvalidRequestError(EngineError, ValueError):
    """A request's parameters are invalid; the message names the field, and ``param`` holds its
    name where it is one of the request's (a SamplingParams field, ``prompt_token_ids``)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class RequestTooLongError(InvalidRequestError):
    """The prompt plus max_tokens can never fit this engine's context or KV memory."""

    def __init__(self, prompt_tokens: int, max_tokens: int, limit: int, reason: str) -> None:
        self.prompt_tokens, self.max_tokens, self.limit = prompt_tokens, max_tokens, limit
        super().__init__(
            f"this request needs {prompt_tokens} prompt + {max_tokens} completion tokens = "
            f"{prompt_tokens + max_tokens}, but the longest context that fits is {limit} tokens "
            f"({reason})"
        )


class EngineOverloadedError(EngineError):
    """The waiting queue is full; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineDeadError(EngineError):
    """A shard failed; in-flight requests fail with this and the engine reports unhealthy."""


class WeightUpdateError(EngineError):
    """A weight update was rejected (a bucket failed its checksum, a name or shape is unknown);
    the message names the bucket or tensor. The engine keeps running on its previous weights."""


# Seeds the sampler tells apart: it keeps 63 bits of a seed (``msa.cluster.sampler``).
SEED_LIMIT = 1 << 63


def _token_ids(value: object) -> bool:
    """A list of integers >= 0."""
    return isinstance(value, list) and all(is_int(i) and i >= 0 for i in value)


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    """Per-request sampling, with OpenAI's meanings. ``logprobs``: None for none, else how many
    top alternatives to report per token (0 = only the chosen token's logprob). As in vLLM,
    ``stop`` may be one string (``"END"`` means ``["END"]``), and ``stop`` and ``stop_token_ids``
    may be None or tuples; they are stored as lists. ``include_stop_str_in_output`` keeps the stop
    string (or the text of the stop token) that ended a choice in its text; ``skip_special_tokens``
    leaves special tokens out of the text. ``allowed_token_ids`` (vLLM's): when given, every token
    is drawn from these alone (the reported logprobs stay those of the model's whole distribution)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Normalise ``stop`` and ``stop_token_ids`` to lists and check every field's type, then
        its range; raises InvalidRequestError naming the field. Engines call it again on admission:
        the fields may have been set after construction, and unpickling skips ``__post_init__``."""
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None or isinstance(self.stop, tuple):
            self.stop = list(self.stop or [])
        if self.stop_token_ids is None or isinstance(self.stop_token_ids, tuple):
            self.stop_token_ids = list(self.stop_token_ids or [])
        if isinstance(self.allowed_token_ids, tuple):
            self.allowed_token_ids = list(self.allowed_token_ids)
        allowed = self.allowed_token_ids
        t, p, stop, stop_ids = self.temperature, self.top_p, self.stop, self.stop_token_ids
        checks = [
            ("max_tokens", is_int(self.max_tokens) and self.max_tokens >= 1, "an integer >= 1"),
            ("temperature", is_real(t) and 0.0 <= t <= 2.0, "a number in [0, 2]"),
            ("top_p", is_real(p) and 0.0 < p <= 1.0, "a number in (0, 1]"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 = off)"),
            (
                "seed",
                self.seed is None or (is_int(self.seed) and 0 <= self.seed < SEED_LIMIT),
                "None or an integer in [0, 2**63)",
            ),
            ("n", is_int(self.n) and 1 <= self.n <= 128, "an integer in [1, 128]"),
            (
                "stop",
                isinstance(stop, list) and len(stop) <= 16 and all(isinstance(s, str) and s for s in stop),
                "a non-empty string or a list of at most 16 non-empty strings",
            ),
            ("stop_token_ids", _token_ids(stop_ids), "a list of integers >= 0"),
            (
                "logprobs",
                self.logprobs is None or (is_int(self.logprobs) and 0 <= self.logprobs <= 20),
                "None or an integer in [0, 20]",
            ),
            (
                "allowed_token_ids",
                allowed is None or (_token_ids(allowed) and len(allowed) > 0),
                "None or a non-empty list of integers >= 0",
            ),
            *(
                (flag, isinstance(getattr(self, flag), bool), "True or False")
                for flag in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")
            ),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise InvalidRequestError(
                    f"sampling parameter '{name}' must be {allowed}, got {getattr(self, name)!r}", name
                )


@dataclass(kw_only=True, slots=True)
class TokenOutput:
    """One streamed step of one choice of a request. ``token_ids``/``logprobs`` are the new tokens
    of this step; ``text`` is their new detokenized text (held back while it may still grow into a
    stop string). ``finish_reason`` is set on the last step: "stop", "length" or "abort"."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[dict[int, float]] | None
    text: str
    finish_reason: str | None
    num_prompt_tokens: int
    weight_version: int
    # Where each step folded into this output ended, but the last: (tokens, characters of text).
    folded: list[tuple[int, int]] = field(default_factory=list)

    def steps(self) -> Iterator[tuple[list[int], str]]:
        """The engine steps this output holds, each as (its token ids, its text): one unless
        outputs were folded together (``coalesce``)."""
        tokens = chars = 0
        for end_tokens, end_chars in (*self.folded, (len(self.token_ids), len(self.text))):
            yield self.token_ids[tokens:end_tokens], self.text[chars:end_chars]
            tokens, chars = end_tokens, end_chars

    def can_absorb(self, later: TokenOutput) -> bool:
        """Whether ``later`` (the next output of the same request) may be folded into this one:
        same choice and weight version, and this one is not the choice's last."""
        return (
            later.index == self.index
            and later.weight_version == self.weight_version
            and self.finish_reason is None
        )

    def absorb(self, later: TokenOutput) -> None:
        """Append ``later``'s tokens, logprobs and text, keeping where each step ends (``steps``);
        its finish_reason becomes this one's."""
        tokens, chars = len(self.token_ids), len(self.text)
        self.folded.append((tokens, chars))
        self.folded += [(t + tokens, c + chars) for t, c in later.folded]
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        if self.top_logprobs is not None and later.top_logprobs is not None:
            self.top_logprobs += later.top_logprobs
        self.text += later.text
        self.finish_reason = later.finish_reason


def coalesce(outputs: list[TokenOutput]) -> list[TokenOutput]:
    """Fold each choice's outputs into as few as its weight versions allow, in the order each
    choice's outputs came. A consumer that fell behind the engine then gets one output per choice
    instead of one per step, as vLLM's output collector merges the deltas a slow reader has not
    taken yet."""
    merged: list[TokenOutput] = []
    open_by_choice: dict[int, TokenOutput] = {}
    for out in outputs:
        into = open_by_choice.get(out.index)
        if into is not None and into.can_absorb(out):
            into.absorb(out)
        else:
            merged.append(out)
            open_by_choice[out.index] = out
    return merged


async def stream_queue(queue: asyncio.Queue, n: int) -> AsyncIterator[TokenOutput]:
    """A request's outputs from the queue its engine feeds, until its ``n`` choices finished; an
    exception in the queue is raised. Everything queued since the last read goes out at once,
    ``coalesce``d: a reader behind the engine pays per read, not per token."""
    finished = 0
    while finished < n:
        items = [await queue.get()]
        while not queue.empty():
            items.append(queue.get_nowait())
        failure = next((i for i in items if isinstance(i, BaseException)), None)
        for out in coalesce([i for i in items if not isinstance(i, BaseException)]):
            finished += out.finish_reason is not None
            yield out
        if failure is not None:
            raise failure


@dataclass(kw_only=True, slots=True)
class EngineStats:
    """A snapshot for metrics and admission: request counts and KV pages per shard, and counters
    since the engine started: steps run, the seconds spent in them (the rest of the time the engine
    had no work), and the tokens they computed: prompt tokens (prefill) and generated ones (decode;
    a sequence recomputed after preemption counts its generated tokens here again)."""

    running: int
    waiting: int
    pages_used: list[int]
    pages_total: list[int]
    rejected: int
    weight_version: int
    healthy: bool
    steps: int = 0
    step_seconds: float = 0.0
    decode_tokens: int = 0
    prefill_tokens: int = 0


class Engine(Protocol):
    """What Serve and the RL rollout workers call. All methods are coroutines on the caller's loop."""

    @property
    def max_context_length(self) -> int: ...

    async def start(self) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[TokenOutput]:
        """Stream the request's outputs; raises InvalidRequestError/RequestTooLongError before the
        first output, EngineOverloadedError when the queue is full, EngineDeadError if a shard dies."""
        ...

    async def abort(self, request_id: str) -> None:
        """Cancel a request (its stream ends with finish_reason "abort") and free its pages."""

    async def check_health(self) -> None:
        """Return if every shard answers a real step; raise EngineDeadError otherwise."""

    async def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load full (unsharded) tensors by the model's state_dict names into every shard without
        restarting them; afterwards every new step runs on ``version``."""

    def stats(self) -> EngineStats: ...

    async def shutdown(self) -> None: ...
