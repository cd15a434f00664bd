"""How many FAIL lines refused datagrams may write: a datagram's source is not verified.

Anyone can send a datagram with any source address. Were every refused datagram logged, a
spoofer would write what it likes into the log, as many lines as it likes, and choose whom a
log watcher such as fail2ban bans. So per service: one line per source a minute, and at most
PER_SECOND lines a second in all; what is left out is counted and said in one line a minute.
The refusals themselves are all counted in `superd status`.
"""

from __future__ import annotations

from collections.abc import Callable

PER_SOURCE = 60.0  # seconds between two lines about one source
PER_SECOND = 10
MAX_SOURCES = 10_000  # sources remembered; beyond, the oldest are forgotten


class FailLines:
    def __init__(self, name: str, say: Callable[[str], None],
                 call_later: Callable[[float, Callable[[], None]], object]):
        self.name, self.say, self.call_later = name, say, call_later
        self.last: dict[str, float] = {}  # source -> when a line about it was written
        self.second = 0.0
        self.in_second = 0
        self.left_out = 0

    def allow(self, source: str, now: float) -> bool:
        """May a FAIL line about a datagram from `source` be written now?"""
        if now - self.last.get(source, -PER_SOURCE) < PER_SOURCE or not self._room(now):
            self._leave_out()
            return False
        if len(self.last) >= MAX_SOURCES:
            for old in list(self.last)[:MAX_SOURCES // 10]:
                del self.last[old]
        self.last.pop(source, None)
        self.last[source] = now
        return True

    def _room(self, now: float) -> bool:
        if now - self.second >= 1.0:
            self.second, self.in_second = now, 0
        self.in_second += 1
        return self.in_second <= PER_SECOND

    def _leave_out(self) -> None:
        if not self.left_out:
            self.call_later(PER_SOURCE, self._summary)
        self.left_out += 1

    def _summary(self) -> None:
        count, self.left_out = self.left_out, 0
        if count:
            self.say(f"FAIL: {self.name}: {count} more refused datagrams in the last minute "
                     "not logged one by one (their sources are not verified)")
