"""Services that are not running because they could not be loaded or bound, and their retries.

One bad service never takes the others down: a program removed by a package, a user not yet
created, a port another daemon holds, an address not yet on the machine. Each such service is
logged once with its reason, shown by `superd status` (and in STATUS= under systemd), and tried
again on its own: after 1 s, then 2, 4... up to 60 s, until it runs. A reload starts over from
the new table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from superd.loop import Timer

FIRST, MOST = 1.0, 60.0

# An attempt is given where to say how it went: None when the service now runs, else why it
# still does not. It may say so later (loading an entry runs in a child process).
Attempt = Callable[[Callable[[str | None], None]], None]


@dataclass
class Waiting:
    name: str
    where: str  # FILE:LINE of the service's entry
    reason: str
    attempt: Attempt | None
    since: float = field(default_factory=time.time)
    tries: int = 0
    delay: float = 0.0
    timer: Timer | None = None
    next_at: float = 0.0  # monotonic


class Retries:
    def __init__(self, call_later: Callable[[float, Callable[[], None]], Timer],
                 say: Callable[[str], None], changed: Callable[[], None]):
        self.call_later, self.say, self.changed = call_later, say, changed
        self.waiting: dict[str, Waiting] = {}

    def add(self, name: str, where: str, reason: str, attempt: Attempt | None) -> None:
        """`name` is not running, for `reason`: say so once, and try it again later (with no
        `attempt`: not before the table is changed and reloaded)."""
        self.drop(name)
        entry = Waiting(name, where, reason, attempt)
        self.waiting[name] = entry
        later = f"trying again in {FIRST:g}s" if attempt else "until the table is fixed"
        place = "" if f"({where})" in reason else f" ({where})"  # a bind failure names it
        self.say(f"{name}: not started: {reason}{place}; {later}")
        if attempt is not None:
            self._schedule(entry)
        self.changed()

    def drop(self, name: str) -> None:
        entry = self.waiting.pop(name, None)
        if entry is not None and entry.timer is not None:
            entry.timer.cancel()

    def clear(self) -> None:
        for name in list(self.waiting):
            self.drop(name)

    def _schedule(self, entry: Waiting) -> None:
        entry.delay = min(MOST, entry.delay * 2 if entry.delay else FIRST)
        entry.next_at = time.monotonic() + entry.delay
        entry.timer = self.call_later(entry.delay, lambda: self._try(entry))

    def _try(self, entry: Waiting) -> None:
        if self.waiting.get(entry.name) is not entry:
            return
        entry.timer = None
        entry.tries += 1
        assert entry.attempt is not None
        entry.attempt(lambda reason: self._tried(entry, reason))

    def _tried(self, entry: Waiting, reason: str | None) -> None:
        if self.waiting.get(entry.name) is not entry:
            return  # dropped meanwhile (a reload, a stop): what it found is moot
        if reason is None:
            del self.waiting[entry.name]
            self.say(f"{entry.name}: started, {entry.tries} tries after: {entry.reason}")
            self.changed()
            return
        if reason != entry.reason:
            self.say(f"{entry.name}: still not started: {reason}")
            entry.reason = reason
        self._schedule(entry)

    def status(self) -> dict[str, dict[str, object]]:
        now = time.monotonic()
        return {e.name: {"reason": e.reason, "where": e.where, "since": int(e.since),
                         "tries": e.tries,
                         "next_try_in": (round(max(0.0, e.next_at - now), 1)
                                         if e.attempt is not None else None)}
                for e in self.waiting.values()}
