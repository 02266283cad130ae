"""The copier's pacing and single flight: RateLimiter on trio's clock, ClusterClaims.

Why: `--speed` is a promise to the user (the copier must not eat the disk), and
ClusterClaims is what makes "no cluster is copied twice" and "concurrent operations
on one cluster wait for each other" true. Both are pure trio, so they are tested on
the virtual clock (`autojump_clock`): seconds of pacing cost microseconds here.
"""

import os
import random
from pathlib import Path

import pytest
import trio
import trio.testing

from cowfs.busypoll import BusyPoller
from cowfs.copier import copy_in_background
from cowfs.job import Job, JobOptions, JobState, SyncMode
from cowfs.locks import ClusterClaims
from cowfs.ratelimit import SLICE, RateLimiter
from cowfs.target import RawTarget

MiB = 1 << 20
EPS = 1e-6


# -- RateLimiter ------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [4096, 64 << 10, MiB, 3 * MiB])
@pytest.mark.parametrize("clock_start", [0.0, 1000.0])
async def test_rate_limit_takes_n_over_s(
    autojump_clock: trio.testing.MockClock, chunk: int, clock_start: float
) -> None:
    autojump_clock.jump(clock_start)
    speed = 10 * MiB
    total = 50 * MiB
    limiter = RateLimiter(speed)
    t0 = trio.current_time()
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        await limiter.account(n)
        sent += n
    elapsed = trio.current_time() - t0
    # At most SLICE of burst ahead of the budget, never slower than the budget.
    assert total / speed - SLICE - EPS <= elapsed <= total / speed + EPS


async def test_rate_limit_zero_means_unlimited(autojump_clock: trio.testing.MockClock) -> None:
    limiter = RateLimiter(0)
    t0 = trio.current_time()
    for _ in range(1000):
        await limiter.account(1 << 30)
    assert trio.current_time() == t0


async def test_rate_limit_burst_within_slice_does_not_sleep(
    autojump_clock: trio.testing.MockClock,
) -> None:
    autojump_clock.jump(100)
    speed = MiB
    limiter = RateLimiter(speed)
    t0 = trio.current_time()
    await limiter.account(int(speed * SLICE * 0.9))
    assert trio.current_time() == t0


async def test_rate_limit_idle_time_does_not_bank_budget(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An idle copier may not later run at unlimited speed for as long as it idled."""
    speed = MiB
    limiter = RateLimiter(speed)
    await limiter.account(MiB)
    await trio.sleep(60)
    t0 = trio.current_time()
    for _ in range(10):
        await limiter.account(MiB)
    assert trio.current_time() - t0 >= 10 - SLICE - EPS


async def test_copier_honours_speed(tmp_path: Path, autojump_clock: trio.testing.MockClock) -> None:
    autojump_clock.jump(1000)
    size = 6 * MiB + 12345
    speed = 2 * MiB
    source = tmp_path / "source.img"
    source.write_bytes(random.Random(3).randbytes(size))
    fd = os.open(source, os.O_RDWR)
    target = RawTarget.create(tmp_path / "target.img", size)
    job = Job(fd, str(source), target, JobOptions(SyncMode.FULL, 64 << 10, speed))
    try:
        t0 = trio.current_time()
        async with trio.open_nursery() as nursery:
            job.start()
            nursery.start_soon(copy_in_background, job)
            await job.complete()
        elapsed = trio.current_time() - t0
    finally:
        os.close(fd)
        target.close()
    assert job.state is JobState.COMPLETE
    assert job.copy.bytes_copier == size
    assert size / speed - SLICE - EPS <= elapsed <= size / speed + EPS
    assert (tmp_path / "target.img").read_bytes() == source.read_bytes()


# -- ClusterClaims ---------------------------------------------------------------


async def test_claims_single_flight() -> None:
    claims = ClusterClaims()
    assert claims.claim(3)
    assert not claims.claim(3)
    assert claims.is_claimed(3)
    assert not claims.is_claimed(4)
    assert claims.claim(4)
    assert len(claims) == 2
    claims.release(3, 2)
    assert len(claims) == 0
    assert not claims.is_claimed(3)
    assert claims.claim(3)  # claimable again after release


async def test_claims_wait_on_unclaimed_returns_at_once() -> None:
    claims = ClusterClaims()
    with trio.fail_after(1):
        await claims.wait(7)


async def test_claims_waiters_wake_on_release() -> None:
    claims = ClusterClaims()
    assert claims.claim(5)
    assert claims.claim(6)
    woke: list[int] = []

    async def waiter(cluster: int) -> None:
        await claims.wait(cluster)
        woke.append(cluster)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            for cluster in (5, 5, 5, 6):
                nursery.start_soon(waiter, cluster)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == []
            claims.release(5, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert woke == [5, 5, 5]  # only the waiters of the released cluster
            assert claims.is_claimed(6)
            claims.release(6, 1)
    assert woke == [5, 5, 5, 6]


async def test_busy_poller_spins_after_a_request_then_sleeps() -> None:
    """It must poll after a request (the point) and stop once a window passes (the cost)."""
    poller = BusyPoller(window=0.01)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        await trio.testing.wait_all_tasks_blocked()
        assert not poller.polling
        poller.request_seen()
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert poller.polling
        with trio.fail_after(5):
            while poller.polling:
                await trio.lowlevel.checkpoint()
        await trio.testing.wait_all_tasks_blocked()  # parked again: no spinning while idle
        assert not poller.polling
        nursery.cancel_scope.cancel()


async def test_a_new_speed_wakes_a_sleeping_copier(autojump_clock: trio.testing.MockClock) -> None:
    """`cowfs set-speed` must not wait until a batch paced at the old speed is slept out."""
    limiter = RateLimiter(1024)  # 1 MiB would take 1024 s
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limiter.account, MiB)
        await trio.sleep(1)
        start = trio.current_time()
        limiter.speed = 0
    assert trio.current_time() - start < 0.01
