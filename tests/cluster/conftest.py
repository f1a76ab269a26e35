"""Shared pieces of the engine tests: the tiny model as a single process sees it, and helpers to
drive an engine."""

from __future__ import annotations

import asyncio

import pytest
import torch

from msa.cluster.protocol import InvalidRequestError, SamplingParams, TokenOutput
from msa.model import MiniMaxM3ForCausalLM, cache_free_batch
from msa.model.generate import generate_stream
from msa.platform.checkpoint import load_model


def tiny_model(seed: int = 0) -> MiniMaxM3ForCausalLM:
    model, _ = load_model("tiny", dtype=torch.float32, seed=seed, progress=False)
    return model


@pytest.fixture(scope="session")
def reference() -> MiniMaxM3ForCausalLM:
    return tiny_model(0)


def prompt(length: int, salt: int = 0) -> list[int]:
    """A deterministic prompt of byte tokens."""
    return [(37 * i + 11 * salt + 5) % 250 for i in range(length)]


_greedy_memo: dict[tuple, tuple[MiniMaxM3ForCausalLM, list[int]]] = {}


def greedy_reference(model: MiniMaxM3ForCausalLM, ids: list[int], max_tokens: int) -> list[int]:
    """Single-process greedy tokens, memoised per model object (the memo keeps the model alive, so
    its id is never reused by another) since several tests ask for the same ones."""
    key = (id(model), tuple(ids), max_tokens)
    if key not in _greedy_memo:
        _greedy_memo[key] = (model, list(generate_stream(model, ids, max_tokens=max_tokens, temperature=0.0)))
    return list(_greedy_memo[key][1])


def full_logprobs(model: MiniMaxM3ForCausalLM, ids: list[int]) -> torch.Tensor:
    """log_softmax of a cache-free forward over ``ids``: ``[len(ids), vocab]``."""
    with torch.no_grad():
        logits = model(torch.tensor(ids), cache_free_batch([len(ids)], model.config.sparse.block_size))
    return torch.log_softmax(logits.float(), -1)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


async def collect(engine, request_id: str, ids: list[int],
                  params: SamplingParams) -> dict[int, list[TokenOutput]]:
    """All outputs of a request, by choice index."""
    outs: dict[int, list[TokenOutput]] = {}
    async for out in engine.generate(request_id, ids, params):
        outs.setdefault(out.index, []).append(out)
    return outs


async def until_finished(engine, request_id: str, ids: list[int], params: SamplingParams) -> list[int]:
    """Read a stream up to its final output and stop iterating, leaving the stream open (as a caller
    that breaks on finish_reason does); returns its tokens."""
    tokens = []
    async for out in engine.generate(request_id, ids, params):
        tokens += out.token_ids
        if out.finish_reason is not None:
            break
    return tokens


async def within(stream, seconds: float):
    """``stream``'s outputs, failing if one takes longer than ``seconds``."""
    while True:
        try:
            yield await asyncio.wait_for(stream.__anext__(), seconds)
        except StopAsyncIteration:
            return


async def reuse_a_finished_id(engine) -> tuple[TokenOutput, list[TokenOutput]]:
    """Finish request "same" but leave its stream open, start a newer "same" (20 greedy tokens of
    ``prompt(6, 1)``), check that a third is refused while it runs, then close the old stream:
    the newer request's first output and the rest of its outputs, read after the close."""
    old = engine.generate("same", prompt(5), greedy(3))
    async for out in old:
        if out.finish_reason is not None:
            break
    new = engine.generate("same", prompt(6, 1), greedy(20))
    first = await asyncio.wait_for(new.__anext__(), 30)
    with pytest.raises(InvalidRequestError, match="already in flight"):
        await collect(engine, "same", prompt(4), greedy(2))
    await old.aclose()
    return first, [out async for out in within(new, 30)]


def tokens_of(outs: list[TokenOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def run(coro):
    return asyncio.run(coro)
