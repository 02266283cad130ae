"""The copier's speed limit: a token bucket over trio's clock (so tests can use autojump)."""

import trio

SLICE = 0.1
"""Seconds of budget the copier may run ahead; short enough that a limit feels steady,
long enough that 1 MiB batches at 100 MiB/s need no sleep per batch."""


class RateLimiter:
    """Paces callers to `speed` bytes per second; 0 means unlimited. `speed` may change live."""

    def __init__(self, speed: int) -> None:
        self.speed = speed
        self._next = 0.0

    async def account(self, nbytes: int) -> None:
        """Record `nbytes` just copied and sleep if the copier is ahead of its budget."""
        if self.speed <= 0:
            return
        now = trio.current_time()
        self._next = max(self._next, now - SLICE) + nbytes / self.speed
        if self._next > now:
            await trio.sleep_until(self._next)
