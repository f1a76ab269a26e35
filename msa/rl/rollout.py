"""Agentic rollouts on the msa engine: many episodes at once (asyncio), G per prompt.

Each episode alternates engine turns and environment steps. It keeps the exact sampled tokens,
their log-probabilities and the weight version of every turn; the glue the chat template adds
(tool results, turn headers) is appended with loss mask 0. An episode whose turns came from more
than one weight version is dropped and regenerated. An episode that raises or overruns its time
is retried; when the retries are spent its whole group fails and is reported, never scored.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from msa.cluster.protocol import EngineDeadError, SamplingParams
from msa.platform.aio import wait_within
from msa.rl.chat import ChatTokens
from msa.rl.config import RolloutSection
from msa.rl.data import Prompt
from msa.rl.envs.base import Environment


class VersionMixedError(RuntimeError):
    """The episode's tokens span several weight versions."""


@dataclass(kw_only=True, slots=True)
class Episode:
    """One finished episode. ``response_ids``, ``loss_mask`` and ``logprobs`` are aligned and cover
    everything after the prompt; logprobs are the engine's (0 where masked)."""

    uid: int
    index: int
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    weight_version: int
    reward: float
    turns: int
    attempts: int
    regenerations: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class GroupResult:
    """The G episodes of one prompt, or the error that failed the group."""

    uid: int
    episodes: list[Episode] = field(default_factory=list)
    error: str | None = None


@dataclass(kw_only=True, slots=True)
class RolloutBatch:
    """A step's groups (successful ones first in prompt order) and what happened on the way."""

    groups: list[GroupResult]
    failed: list[GroupResult]
    seconds: float
    retries: int
    regenerations: int


def episode_seed(run_seed: int, step: int, slot: int, uid: int, index: int, attempt: int) -> int:
    """A stable 62-bit sampling seed, so a resumed run samples what an uninterrupted one would.
    ``slot``: the group's position in the step's prompts, which tells apart two draws of one prompt."""
    key = f"{run_seed}/{step}/{slot}/{uid}/{index}/{attempt}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


class RolloutWorker:
    """Runs episodes on ``engine`` (any ``msa.cluster.protocol.Engine``) with environments from
    ``make_env``."""

    def __init__(
        self,
        engine: Any,
        chat: ChatTokens,
        make_env: Callable[[], Environment],
        section: RolloutSection,
        *,
        run_seed: int,
    ) -> None:
        self.engine, self.chat, self.make_env = engine, chat, make_env
        self.section, self.run_seed = section, run_seed
        self._slots = asyncio.Semaphore(section.max_concurrency)
        self._retries = self._regenerations = 0

    async def run_step(self, step: int, prompts: list[Prompt]) -> RolloutBatch:
        """All groups of one step, concurrently; a prompt listed twice makes two independent groups."""
        start = time.perf_counter()
        self._retries = self._regenerations = 0
        results = await asyncio.gather(*[self._group(step, slot, p) for slot, p in enumerate(prompts)])
        ok = [g for g in results if g.error is None]
        failed = [g for g in results if g.error is not None]
        return RolloutBatch(
            groups=ok,
            failed=failed,
            seconds=time.perf_counter() - start,
            retries=self._retries,
            regenerations=self._regenerations,
        )

    async def _group(self, step: int, slot: int, prompt: Prompt) -> GroupResult:
        tasks = [
            asyncio.ensure_future(self._episode_with_retries(step, slot, prompt, i))
            for i in range(self.section.group_size)
        ]
        try:
            episodes = await asyncio.gather(*tasks)
        except EngineDeadError:
            raise
        except Exception as e:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return GroupResult(uid=prompt.uid, error=str(e))
        return GroupResult(uid=prompt.uid, episodes=list(episodes))

    async def _episode_with_retries(self, step: int, slot: int, prompt: Prompt, index: int) -> Episode:
        failures: list[str] = []
        regenerations = 0
        attempt = 0
        while True:
            try:
                async with self._slots:
                    seed = episode_seed(self.run_seed, step, slot, prompt.uid, index, attempt)
                    episode = await wait_within(
                        self.run_episode(prompt, index, seed), self.section.episode_timeout_s
                    )
                episode.attempts, episode.regenerations = attempt + 1, regenerations
                return episode
            except EngineDeadError:
                raise
            except VersionMixedError as e:
                regenerations += 1
                self._regenerations += 1
                if regenerations > self.section.max_regenerations:
                    raise RuntimeError(
                        f"prompt {prompt.uid} sample {index}: {e} on every one of {regenerations} generations"
                    ) from e
            except Exception as e:  # asyncio.TimeoutError included
                reason = "timed out" if isinstance(e, asyncio.TimeoutError) else f"{type(e).__name__}: {e}"
                failures.append(reason)
                if len(failures) > self.section.max_retries:
                    raise RuntimeError(
                        f"prompt {prompt.uid} sample {index} failed {len(failures)} times "
                        f"({'; '.join(failures)})"
                    ) from e
                self._retries += 1
            attempt += 1

    async def run_episode(self, prompt: Prompt, index: int, seed: int) -> Episode:
        """One episode from reset to done (or ``max_turns``)."""
        env = self.make_env()
        messages = await asyncio.to_thread(env.reset, prompt.sample)
        prompt_ids = self.chat.prompt_ids(messages, env.tools)
        response: list[int] = []
        mask: list[int] = []
        logprobs: list[float] = []
        versions: set[int] = set()
        reward, info, turns = 0.0, {}, 0
        while turns < self.section.max_turns:
            turns += 1
            ids, lps, turn_versions = await self._turn(prompt_ids + response, seed, prompt.uid, index, turns)
            versions |= turn_versions
            response += ids
            mask += [1] * len(ids)
            logprobs += lps
            result = await asyncio.to_thread(env.step, self.chat.reply_text(ids))
            reward, info = float(result.reward), dict(result.info)
            if result.done or turns == self.section.max_turns:
                break
            glue = self.chat.glue_ids(ids, result.observations)
            response += glue
            mask += [0] * len(glue)
            logprobs += [0.0] * len(glue)
        if len(versions) != 1:
            raise VersionMixedError(f"episode tokens came from weight versions {sorted(versions)}")
        return Episode(
            uid=prompt.uid,
            index=index,
            prompt_ids=prompt_ids,
            response_ids=response,
            loss_mask=mask,
            logprobs=logprobs,
            weight_version=versions.pop(),
            reward=reward,
            turns=turns,
            attempts=1,
            regenerations=0,
            info=info,
        )

    async def _turn(
        self, ids: list[int], seed: int, uid: int, index: int, turn: int
    ) -> tuple[list[int], list[float], set[int]]:
        limit = self.engine.max_context_length - len(ids)
        if limit < 1:
            raise RuntimeError(
                f"the conversation ({len(ids)} tokens) has no room left in the engine's "
                f"context ({self.engine.max_context_length})"
            )
        params = SamplingParams(
            max_tokens=min(self.section.max_tokens, limit),
            temperature=self.section.temperature,
            top_p=self.section.top_p,
            seed=(seed + turn) & ((1 << 62) - 1),
            logprobs=0,
        )
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: set[int] = set()
        request_id = f"rl-{uid}-{index}-{seed:x}-{turn}"
        async for out in self.engine.generate(request_id, ids, params):
            tokens += out.token_ids
            logprobs += out.logprobs
            if out.token_ids:
                versions.add(out.weight_version)
            if out.finish_reason == "abort":
                raise RuntimeError(f"request {request_id} was aborted by the engine")
        return tokens, logprobs, versions
