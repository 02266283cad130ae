"""The copier's speed limit: a token bucket over trio's clock (so tests can use autojump)."""

import trio

SLICE = 0.1
"""Seconds of budget the copier may run ahead; short enough that a limit feels steady,
long enough that 1 MiB batches at 100 MiB/s need no sleep per batch."""


class RateLimiter:
    """Paces callers to `speed` bytes per second; 0 means unlimited.

    Changing `speed` takes effect at once: a caller asleep on the old budget wakes
    and is paced by the new one (`cowfs set-speed 0` must not wait out a slow batch)."""

    def __init__(self, speed: int) -> None:
        self._speed = speed
        self._next = 0.0
        self._changed = trio.Event()

    @property
    def speed(self) -> int:
        return self._speed

    @speed.setter
    def speed(self, speed: int) -> None:
        self._speed = speed
        self._next = 0.0  # forget the old budget
        self._changed.set()
        self._changed = trio.Event()

    async def account(self, nbytes: int) -> None:
        """Record `nbytes` just copied and sleep if the copier is ahead of its budget."""
        if self._speed <= 0:
            return
        now = trio.current_time()
        self._next = max(self._next, now - SLICE) + nbytes / self._speed
        with trio.move_on_at(self._next):
            await self._changed.wait()
