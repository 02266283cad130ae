"""Single flight per cluster: at most one task copies a cluster, the others wait for it.

A claim is held only while the claimant copies; it never waits on another claim
while holding one, so claims cannot deadlock. Must never be used across threads:
claims live in the trio loop, the copying itself may run in a worker thread.
"""

import trio


class ClusterClaims:
    """Clusters being copied right now, each with an event set when its copy ends."""

    def __init__(self) -> None:
        self._events: dict[int, trio.Event] = {}

    def claim(self, cluster: int) -> bool:
        """Take `cluster` for copying; False if someone else is copying it."""
        if cluster in self._events:
            return False
        self._events[cluster] = trio.Event()
        return True

    def is_claimed(self, cluster: int) -> bool:
        return cluster in self._events

    def release(self, first: int, count: int) -> None:
        """End the claims on first..first+count-1 and wake whoever waits for them."""
        for cluster in range(first, first + count):
            self._events.pop(cluster).set()

    async def wait(self, cluster: int) -> None:
        """Wait until nobody copies `cluster` (at once if nobody does)."""
        event = self._events.get(cluster)
        if event is not None:
            await event.wait()

    def __len__(self) -> int:
        return len(self._events)
