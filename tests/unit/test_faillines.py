"""superd.faillines: how many FAIL lines refused datagrams may write (in-process)."""

from __future__ import annotations

from superd.faillines import PER_SECOND, PER_SOURCE, FailLines


def make() -> tuple[FailLines, list[str], list[tuple[float, object]]]:
    said: list[str] = []
    timers: list[tuple[float, object]] = []
    return FailLines("tftp", said.append, lambda d, f: timers.append((d, f))), said, timers


def test_one_line_per_source_a_minute():
    lines, said, timers = make()
    assert lines.allow("192.0.2.1", 100.0)
    assert not lines.allow("192.0.2.1", 100.5)
    assert not lines.allow("192.0.2.1", 100.0 + PER_SOURCE - 1)
    assert lines.allow("192.0.2.1", 100.0 + PER_SOURCE)


def test_at_most_per_second_in_all_and_the_rest_said_once():
    lines, said, timers = make()
    allowed = sum(lines.allow(f"198.51.100.{i}", 5.0) for i in range(100))
    assert allowed == PER_SECOND
    assert len(timers) == 1, "one summary scheduled, not one per line left out"
    delay, summary = timers[0]
    assert delay == PER_SOURCE
    summary()  # type: ignore[operator]
    assert said == ["FAIL: tftp: 90 more refused datagrams in the last minute not logged one "
                    "by one (their sources are not verified)"]
    assert lines.allow("198.51.100.200", 6.1), "a new second, a new allowance"
