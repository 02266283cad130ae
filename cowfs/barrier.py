"""The barrier: what fixes one point in time for several images under running writers.

Every mutating request (write, truncate) passes the gate; `hold()` closes it,
waits for the requests in flight to finish, and then lets its caller fix the
point in time of every image of a job at once before the gate opens again. So a
write that returned before the hold began is before the point in time, one that
arrives during it waits and lands after, and none straddles it. Across the
images of a group: if write A returned before write B was issued and B is in the
backup, A is in it too.
Guests wait only as long as the writes in flight take. The gate's hot path costs
two integer updates and no checkpoint.
"""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


class Barrier:
    def __init__(self) -> None:
        self._open = trio.Event()
        self._open.set()
        self._in_flight = 0
        self._drained = trio.Event()
        self._holding = trio.Lock()

    @asynccontextmanager
    async def mutating(self) -> AsyncIterator[None]:
        """Around one mutating request: waits while a hold is on."""
        while not self._open.is_set():
            await self._open.wait()
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._drained.set()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """No mutating request runs inside: fix the point in time here, without awaiting."""
        async with self._holding:
            self._open = trio.Event()
            try:
                while self._in_flight:
                    self._drained = trio.Event()
                    await self._drained.wait()
                yield
            finally:
                self._open.set()
