"""Sandbox slots are shared fairly between projects (unit tests of `FairSlots`; the sandbox itself is not started)."""

import asyncio

import pytest

from threadline_core.slots import FairSlots


class Holders:
    """Tasks that take a slot and keep it until released, recording the order in which slots were granted."""

    def __init__(self, slots: FairSlots) -> None:
        self.slots = slots
        self.granted: list[str] = []
        self._release: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    async def _hold(self, name: str) -> None:
        async with self.slots.slot(name.split("-")[0]):
            self.granted.append(name)
            await self._release[name].wait()

    async def start(self, *names: str) -> None:
        """Queue a holder per name (`<tenant>-<n>`), in that order."""
        for name in names:
            self._release[name] = asyncio.Event()
            self.tasks[name] = asyncio.create_task(self._hold(name))
            await asyncio.sleep(0)
        await asyncio.sleep(0)

    def release_soon(self, name: str) -> None:
        """Let one holder finish when the loop next runs it."""
        self._release[name].set()

    async def release(self, name: str) -> None:
        """Let one holder finish and its slot go to the next."""
        self.release_soon(name)
        await self.tasks[name]
        await asyncio.sleep(0)


async def test_a_freed_slot_goes_to_the_project_holding_fewest() -> None:
    """A plain semaphore served project B only after all of A's queued calls."""
    holders = Holders(FairSlots(2))
    await holders.start("a-1", "a-2", "a-3", "a-4", "b-1")
    assert holders.granted == ["a-1", "a-2"]
    await holders.release("a-1")
    assert holders.granted == ["a-1", "a-2", "b-1"]
    await holders.release("a-2")
    assert holders.granted[-1] == "a-3"
    assert holders.slots.held == {"a": 1, "b": 1}


async def test_among_equals_the_earliest_waiter_goes_first() -> None:
    holders = Holders(FairSlots(1))
    await holders.start("a-1", "c-1", "b-1")
    await holders.release("a-1")
    await holders.release("c-1")
    assert holders.granted == ["a-1", "c-1", "b-1"]


async def test_a_project_holds_no_more_than_its_cap_even_with_slots_free() -> None:
    holders = Holders(FairSlots(3, per_tenant=2))
    await holders.start("a-1", "a-2", "a-3")
    assert holders.granted == ["a-1", "a-2"], "the third slot stays free for another project"
    await holders.start("b-1")
    assert holders.granted[-1] == "b-1"
    await holders.release("a-1")
    assert holders.granted[-1] == "a-3"


async def test_a_cancelled_waiter_takes_no_slot() -> None:
    holders = Holders(FairSlots(1))
    await holders.start("a-1", "b-1", "c-1")
    holders.release_soon("a-1")  # a leaves before b's task sees its cancellation: b's turn comes, cancelled
    holders.tasks["b-1"].cancel()
    await holders.tasks["a-1"]
    await asyncio.sleep(0)
    with pytest.raises(asyncio.CancelledError):
        await holders.tasks["b-1"]
    assert holders.granted == ["a-1", "c-1"]
    await holders.release("c-1")
    assert holders.slots.held == {}


async def test_a_waiter_cancelled_just_after_its_grant_gives_the_slot_back() -> None:
    slots = FairSlots(1)
    entered: list[str] = []

    async def take(tenant: str) -> None:
        async with slots.slot(tenant):
            entered.append(tenant)
            await asyncio.sleep(3600)

    first = asyncio.create_task(take("a"))
    await asyncio.sleep(0)
    second = asyncio.create_task(take("b"))
    await asyncio.sleep(0)
    first.cancel()  # a's release grants b's future; b is cancelled before it resumes
    await asyncio.sleep(0)
    second.cancel()
    for task in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert entered == ["a"] and slots.held == {}
    async with slots.slot("c"):
        assert slots.held == {"c": 1}
