"""The loop runner: no exception ends a loop, backoff with full jitter, timeouts, stuck detection, status."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.loops import Backoff, LoopState, Supervisor
from controlplane.store.errors import StoreUnavailable


class FakeTime:
    """A clock that only moves when told to, and a sleep that records what was asked."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def until(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.001)


async def test_a_failing_step_backs_off_with_full_jitter_and_recovers() -> None:
    t = FakeTime()
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls <= 5:
            raise StoreUnavailable(f"etcd away #{calls}")

    async with Supervisor(clock=t.clock, rng=lambda: 0.5, sleep=t.sleep) as sup:
        loop = sup.periodic("demand", step, interval_s=7.0, backoff=Backoff(base_s=1.0, max_s=4.0))
        await until(lambda: calls >= 6)
        await until(lambda: loop.state is LoopState.OK)
        status = loop.status()
    # rng 0.5 → half of each cap: caps 1, 2, 4, 4, 4 (max 4), then the interval once healthy
    assert t.sleeps[:6] == [0.5, 1.0, 2.0, 2.0, 2.0, 7.0]
    assert status.failures_total == 5 and status.consecutive_failures == 0
    assert status.last_error == "StoreUnavailable: etcd away #5"
    assert status.steps_total >= 6


async def test_status_is_failing_while_it_fails_and_no_exception_ends_the_loop() -> None:
    t = FakeTime()
    gate = asyncio.Event()
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls >= 3:
            await gate.wait()
        raise ZeroDivisionError("a bug")   # not an expected error: still not fatal

    async with Supervisor(clock=t.clock, rng=lambda: 0.0, sleep=t.sleep) as sup:
        loop = sup.periodic("buggy", step, interval_s=1.0)
        await until(lambda: calls >= 3)
        st_ = loop.status()
        assert st_.state is LoopState.FAILING and st_.consecutive_failures == 2 and loop.running
        assert [s.name for s in sup.problems()] == ["buggy"]


async def test_a_step_that_hangs_past_its_timeout_is_a_failure() -> None:
    hung = 0

    async def step() -> None:
        nonlocal hung
        hung += 1
        await asyncio.sleep(3600)

    async with Supervisor(rng=lambda: 0.0) as sup:
        loop = sup.periodic("probe", step, interval_s=1.0, timeout_s=0.05)
        await until(lambda: loop.status().failures_total >= 2)
        assert "timed out after 0.05s" in loop.status().last_error
        assert loop.state is LoopState.FAILING


async def test_wake_runs_the_step_early_and_a_returned_delay_sets_the_next_wait() -> None:
    t = FakeTime()
    runs = 0
    wake = asyncio.Event()

    async def step() -> float:
        nonlocal runs
        runs += 1
        return 42.0

    async def hold(seconds: float) -> None:  # intervals never pass by themselves here
        t.sleeps.append(seconds)
        await asyncio.sleep(3600)

    async with Supervisor(clock=t.clock, sleep=hold) as sup:
        sup.periodic("reconcile", step, interval_s=5.0, wake=wake)
        await until(lambda: runs == 1 and t.sleeps == [42.0])
        wake.set()
        await until(lambda: runs == 2)


async def test_cancel_stops_the_loop_but_a_cancelled_error_inside_a_step_is_a_failure() -> None:
    t = FakeTime()
    calls = 0

    async def step() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncio.CancelledError()  # e.g. a library future cancelled under us

    sup = Supervisor(clock=t.clock, rng=lambda: 0.0, sleep=t.sleep)
    loop = sup.periodic("flush", step, interval_s=1.0)
    await until(lambda: calls >= 3)
    assert loop.status().failures_total == 1 and loop.running
    await sup.close()
    assert not loop.running and loop.state is LoopState.STOPPED and sup.statuses() == []


async def test_a_continuous_step_that_stops_progressing_is_stuck_and_restarted() -> None:
    runs = 0
    healed = asyncio.Event()

    async def watch(progress) -> None:  # type: ignore[no-untyped-def]
        nonlocal runs
        runs += 1
        progress()
        await healed.wait()               # goes silent: a hung etcd
        while True:
            progress()
            await asyncio.sleep(0.01)

    async with Supervisor(rng=lambda: 0.99) as sup:  # STUCK lasts the backoff (~0.3 s) before the restart
        loop = sup.continuous("watch-instances", watch, stall_s=0.2, backoff=Backoff(base_s=0.3))
        await until(lambda: loop.state is LoopState.OK)
        await until(lambda: loop.state is LoopState.STUCK, timeout=3)
        assert "no progress for 0.2s" in loop.status().last_error
        await until(lambda: runs >= 2)      # cancelled and started again
        healed.set()
        await until(lambda: loop.state is LoopState.OK)
        await asyncio.sleep(0.3)            # progress keeps it OK past the stall bound
        assert loop.state is LoopState.OK and loop.status().consecutive_failures == 0


async def test_a_continuous_step_that_raises_is_restarted_and_one_that_returns_is_done() -> None:
    runs = 0

    async def flaky(progress) -> None:  # type: ignore[no-untyped-def]
        nonlocal runs
        runs += 1
        if runs < 3:
            raise StoreUnavailable("broken stream")

    async with Supervisor(rng=lambda: 0.0) as sup:
        loop = sup.continuous("once", flaky)
        await asyncio.wait_for(loop.wait(), 5)
        assert runs == 3 and loop.status().failures_total == 2
        assert sup.get("once") is None   # finished: not reported as a problem


async def test_metrics_show_each_loop() -> None:
    t = FakeTime()

    async def ok() -> None:
        return None

    async def bad() -> None:
        raise StoreUnavailable("down")

    registry = CollectorRegistry()
    async with Supervisor(clock=t.clock, rng=lambda: 0.0, sleep=t.sleep) as sup:
        registry.register(sup.collector())  # type: ignore[arg-type]
        a = sup.periodic("good", ok, interval_s=1.0)
        b = sup.periodic("bad", bad, interval_s=1.0)
        await until(lambda: a.state is LoopState.OK and b.status().failures_total >= 3)
        text = generate_latest(registry).decode()
    assert 'modelpool_loop_up{loop="good"} 1.0' in text
    assert 'modelpool_loop_up{loop="bad"} 0.0' in text
    assert 'modelpool_loop_state{loop="bad",state="failing"} 1.0' in text
    assert 'modelpool_loop_failures_total{loop="bad"}' in text
    assert 'modelpool_loop_step_duration_seconds_count{loop="good"}' in text


def test_two_running_loops_cannot_share_a_name() -> None:
    async def main() -> None:
        async def step() -> None:
            return None

        async with Supervisor() as sup:
            sup.periodic("x", step, interval_s=1.0)
            with pytest.raises(ValueError, match="already running"):
                sup.periodic("x", step, interval_s=1.0)

    asyncio.run(main())


@given(base=st.floats(0.001, 10), top=st.floats(0.01, 120), failures=st.integers(1, 10_000),
       r=st.floats(0, 1, exclude_max=True))
def test_backoff_is_bounded_by_its_cap_which_grows_to_the_maximum(base: float, top: float, failures: int,
                                                                  r: float) -> None:
    b = Backoff(base_s=base, max_s=top)
    assert 0.0 <= b.delay(failures, lambda: r) <= b.cap(failures) <= top
    assert b.cap(failures) <= b.cap(failures + 1)
    assert b.cap(failures) == min(top, base * 2 ** min(failures - 1, 62))
