"""Asyncio helpers shared by the engine, the server and the RL rollouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def wait_within(aw: Awaitable[T], timeout: float) -> T:
    """``await aw`` for at most ``timeout`` seconds, else cancel it, let its cleanup run and raise
    ``asyncio.TimeoutError``. A cancellation of the caller always reaches the caller (and cancels
    ``aw``): before Python 3.12 ``asyncio.wait_for`` drops it when ``aw`` finishes in the same
    loop iteration and returns the result instead, which left a cancelled engine loop running."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # retrieved: its failure is the timeout's cause, not a stray warning
    raise asyncio.TimeoutError(f"no answer within {timeout:g} s")
