"""Fakes for the in-process unit tests: a clock that moves only when a test says so, and the
timers set on it.

The objects under test are given `clock` and `call_later` instead of reaching for the loop, so
these stand in for the loop's: `FakeTime.advance(s)` runs, in order, every timer that falls
due, as the loop would, and nothing else happens between two lines of a test.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest


class FakeTimer:
    """What `Loop.call_later` returns: something that can be cancelled."""

    def __init__(self, when: float, callback: Callable[[], None]):
        self.when, self.callback = when, callback
        self.cancelled = self.fired = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTime:
    def __init__(self, start: float = 1000.0):
        self.now = start
        self.timers: list[FakeTimer] = []

    def clock(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[FakeTimer]:
        """Timers set and neither run nor cancelled, soonest first."""
        return sorted((t for t in self.timers if not (t.cancelled or t.fired)),
                      key=lambda t: t.when)

    def next_in(self) -> float | None:
        """Seconds until the next timer is due, None when none is pending."""
        pending = self.pending()
        return pending[0].when - self.now if pending else None

    def advance(self, seconds: float) -> None:
        """Move the clock on by `seconds`, running each timer that falls due, in order (a
        timer a callback sets runs too, if it falls due within the same stretch)."""
        end = self.now + seconds
        for _ in range(10_000):
            due = [t for t in self.pending() if t.when <= end + 1e-9]
            if not due:
                break
            timer = due[0]
            self.now = max(self.now, timer.when)
            timer.fired = True  # once: a loop timer that ran is gone
            timer.callback()
        else:
            raise AssertionError("timers kept setting timers: 10000 ran in one advance()")
        self.now = end


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()
