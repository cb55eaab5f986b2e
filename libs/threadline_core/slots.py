"""Slots shared fairly between tenants (projects): one tenant's burst must not queue everyone else (sandboxes, and the
records of a consumer that handles several at once)."""

import asyncio
import contextlib
import itertools
from collections import Counter, deque
from collections.abc import AsyncIterator


class FairSlots:
    """At most `slots` holders at once, at most `per_tenant` of them one tenant's; a freed slot goes to the waiting
    tenant that holds the fewest, the earliest waiter first among equals (a plain semaphore serves in arrival order,
    so one project's queued calls delayed every other project's by all of theirs)."""

    def __init__(self, slots: int, per_tenant: int | None = None) -> None:
        self._slots = max(1, slots)
        self._per_tenant = max(1, min(self._slots, per_tenant or self._slots))
        self._held: Counter[str] = Counter()
        self._waiting: dict[str, deque[tuple[int, asyncio.Future[None]]]] = {}
        self._arrivals = itertools.count()

    @property
    def held(self) -> dict[str, int]:
        """Slots held now, by tenant."""
        return dict(self._held)

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one slot for `tenant` while the block runs."""
        await self._acquire(tenant)
        try:
            yield
        finally:
            self._release(tenant)

    async def _acquire(self, tenant: str) -> None:
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._waiting.setdefault(tenant, deque())
        queue.append((next(self._arrivals), granted))
        self._grant()
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():  # given a slot, then cancelled before it resumed
                self._release(tenant)
            else:
                self._forget(tenant, granted)
            raise

    def _forget(self, tenant: str, granted: asyncio.Future[None]) -> None:
        queue = self._waiting.get(tenant)
        if queue is None:
            return
        self._waiting[tenant] = deque(entry for entry in queue if entry[1] is not granted)
        if not self._waiting[tenant]:
            del self._waiting[tenant]

    def _release(self, tenant: str) -> None:
        self._held[tenant] -= 1
        if self._held[tenant] <= 0:
            del self._held[tenant]
        self._grant()

    def _grant(self) -> None:
        while self._held.total() < self._slots:
            eligible = [(self._held[tenant], queue[0][0], tenant) for tenant, queue in self._waiting.items()
                        if self._held[tenant] < self._per_tenant]
            if not eligible:
                return
            tenant = min(eligible)[2]
            queue = self._waiting[tenant]
            _, granted = queue.popleft()
            if not queue:
                del self._waiting[tenant]
            if granted.done():  # its waiter was cancelled and has not left the queue yet
                continue
            self._held[tenant] += 1
            granted.set_result(None)
