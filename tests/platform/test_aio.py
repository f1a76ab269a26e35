"""wait_within: a timeout that never drops the caller's cancellation."""

from __future__ import annotations

import asyncio

import pytest

from msa.platform.aio import wait_within


def test_returns_the_result_and_raises_the_awaitables_error():
    async def value():
        await asyncio.sleep(0)
        return 7

    async def failing():
        raise ValueError("inner")

    assert asyncio.run(wait_within(value(), 1.0)) == 7
    with pytest.raises(ValueError, match="inner"):
        asyncio.run(wait_within(failing(), 1.0))


def test_a_timeout_cancels_the_awaitable_and_waits_for_its_cleanup():
    cleaned = []

    async def forever():
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits
            cleaned.append(True)

    with pytest.raises(asyncio.TimeoutError, match="within 0.05 s"):
        asyncio.run(wait_within(forever(), 0.05))
    assert cleaned == [True]


def test_a_cancellation_in_the_iteration_the_awaitable_finishes_reaches_the_caller():
    """The awaitable's result and the caller's cancellation land in the same loop iteration:
    the caller must be cancelled (asyncio.wait_for before 3.12 returns the result instead)."""

    async def main():
        inner = asyncio.get_running_loop().create_future()
        caller = asyncio.create_task(wait_within(inner, 10.0))
        await asyncio.sleep(0)  # the caller is now waiting on inner
        inner.set_result("late")
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        return caller.cancelled()

    assert asyncio.run(main())


def test_a_cancelled_caller_cancels_the_awaitable():
    async def main():
        started, stopped = asyncio.Event(), []

        async def work():
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                stopped.append(True)
                raise

        caller = asyncio.create_task(wait_within(work(), 10.0))
        await started.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0)  # the awaitable's cancellation runs
        return stopped

    assert asyncio.run(main()) == [True]
