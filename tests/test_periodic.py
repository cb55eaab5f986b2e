"""PeriodicPass: the loop behind retention, the webhook catch-up and ingestion's re-send sweep."""

import asyncio
import itertools

import asyncpg
import pytest

from threadline_core.periodic import PeriodicPass

pytestmark = pytest.mark.unit


async def test_a_pass_with_more_to_do_runs_again_at_once_and_a_failed_one_at_the_next_interval() -> None:
    calls: list[float] = []
    outcomes: list[bool | Exception] = [True, True, False, RuntimeError("boom"),
                                        asyncpg.exceptions.ConnectionDoesNotExistError("gone"), False]
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def run_pass() -> bool:
        calls.append(loop.time())
        outcome = outcomes.pop(0) if outcomes else False
        if not outcomes:
            done.set()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    periodic = PeriodicPass("test-pass", run_pass, 0.5)
    await periodic.start()
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await periodic.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(calls)]
    assert len(calls) == 6
    assert gaps[0] < 0.25 and gaps[1] < 0.25  # more to do: again at once
    assert all(gap >= 0.45 for gap in gaps[2:])  # otherwise (and after a failure, logged or not) an interval later


async def test_wait_first_waits_an_interval_before_the_first_pass_and_stop_ends_the_loop() -> None:
    calls: list[float] = []
    loop = asyncio.get_running_loop()

    async def run_pass() -> bool:
        calls.append(loop.time())
        return False

    started = loop.time()
    periodic = PeriodicPass("test-pass", run_pass, 0.1, wait_first=True)
    await periodic.start()
    await asyncio.sleep(0.05)
    assert calls == []
    await asyncio.sleep(0.1)
    await periodic.stop()
    count = len(calls)
    assert count == 1 and calls[0] - started >= 0.1
    await asyncio.sleep(0.15)
    assert len(calls) == count  # stopped: no more passes
