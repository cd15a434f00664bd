"""The internal sessions running in the loop: how many there may be, and which are idle.

Each connection to an internal stream service (echo, discard, chargen...) is a session held in
the loop, with its socket open. Without a cap, idle clients could hold every fd superd has;
so there are at most `settings.max_sessions` of them (by default half the fds superd may
open), and a session that has moved no byte for `settings.idle_timeout` seconds is closed.
What all echo sessions may hold unsent is capped too (`internal.Budget`).

Idle sessions are found by a sweep, not a timer per session: every quarter of the idle
timeout, while there are sessions, the table looks at each one's byte count.
"""

from __future__ import annotations

import os
import resource
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from superd.internal import Budget, Builtin, Session
from superd.loop import Loop, Timer

SWEEPS = 4  # idle for this many sweeps in a row: closed


class Owner(Protocol):
    def session_done(self, session: Session) -> None: ...
    def session_idle(self, session: Session) -> None: ...


def default_max_sessions() -> int:
    """Half of the fds superd may open, leaving the rest for listeners and handlers."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(16, (soft if soft != resource.RLIM_INFINITY else 65536) // 2)


class SessionTable:
    def __init__(self, loop: Loop, max_sessions: int | None, idle_timeout: float,
                 max_buffered: int):
        self.loop = loop
        self.budget = Budget(max_buffered, lambda: loop.when_idle(self._release))
        self.owners: dict[Session, Owner] = {}
        self.per_owner: Counter[Owner] = Counter()
        self.fds = 0  # the sockets the sessions hold: what max_sessions caps
        self.sweep_timer: Timer | None = None
        self.configure(max_sessions, idle_timeout, max_buffered)

    def configure(self, max_sessions: int | None, idle_timeout: float,
                  max_buffered: int) -> None:
        self.max_sessions = max_sessions or default_max_sessions()
        self.idle_timeout = idle_timeout
        self.budget.limit = max_buffered

    def __len__(self) -> int:
        return len(self.owners)

    def full(self) -> bool:
        """No room for another session: max_sessions counts sockets, so a relay, which holds
        two, counts twice (one session of any kind may still start at max_sessions - 1)."""
        return self.fds >= self.max_sessions

    def count(self, owner: Owner) -> int:
        return self.per_owner[owner]

    def start(self, builtin: Builtin, sock: socket.socket, peer: str, owner: Owner) -> Session:
        """Serve an internal service on `sock` inside the loop."""
        session = builtin.stream(self.loop, sock, self._done, peer, self.budget)
        self.owners[session] = owner
        self.per_owner[owner] += 1
        self.fds += session.fds
        session.start()
        if not session.closed and self.sweep_timer is None and self.idle_timeout:
            self.sweep_timer = self.loop.call_later(self.idle_timeout / SWEEPS, self._sweep)
        return session

    def _done(self, session: Session) -> None:
        owner = self.owners.pop(session, None)
        if owner is None:
            return
        self.fds -= session.fds
        left = self.per_owner[owner] - 1
        if left > 0:
            self.per_owner[owner] = left
        else:
            del self.per_owner[owner]
        owner.session_done(session)

    def _sweep(self) -> None:
        self.sweep_timer = None
        for session, owner in list(self.owners.items()):
            moved = session.bytes_in + session.bytes_out
            if moved != session.seen:
                session.seen, session.idle_sweeps = moved, 0
                continue
            session.idle_sweeps += 1
            if session.idle_sweeps >= SWEEPS and not session.closed:
                owner.session_idle(session)
                session.close()
        if self.owners and self.idle_timeout:
            self.sweep_timer = self.loop.call_later(self.idle_timeout / SWEEPS, self._sweep)

    def _release(self) -> None:
        """Echo sessions held a lot and now hold nothing: hand the freed heap back. glibc
        keeps freed chunks in the middle of its heap, so RSS would otherwise stay at its peak."""
        if self.budget.used:
            return
        try:
            import ctypes
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass

    # -- superd upgrade ------------------------------------------------------------------------

    def export(self, kind_of: Callable[[Session], str]) -> list[dict[str, Any]]:
        """Every session, for the superd that takes over: its socket stays open over exec."""
        now = time.monotonic()
        out: list[dict[str, Any]] = []
        for session, owner in self.owners.items():
            if session.closed:
                continue
            os.set_inheritable(session.sock.fileno(), True)
            out.append({"fd": session.sock.fileno(), "service": getattr(owner, "name", ""),
                        "kind": kind_of(session), "peer": session.peer,
                        "in": session.bytes_in, "out": session.bytes_out,
                        "age": now - session.started, "extra": session.extra()})
        return out

    def start_resumed(self, item: dict[str, Any], builtin: Builtin, owner: Owner) -> Session:
        """Go on with a session an earlier superd served, where it was."""
        sock = socket.socket(fileno=item["fd"])
        os.set_inheritable(item["fd"], False)
        session = builtin.stream(self.loop, sock, self._done, item["peer"], self.budget)
        session.bytes_in, session.bytes_out = item["in"], item["out"]
        session.started = time.monotonic() - item["age"]
        self.owners[session] = owner
        self.per_owner[owner] += 1
        self.fds += session.fds
        session.resume(item["extra"])
        if self.sweep_timer is None and self.idle_timeout:
            self.sweep_timer = self.loop.call_later(self.idle_timeout / SWEEPS, self._sweep)
        return session

    def close_all(self) -> None:
        for session in list(self.owners):
            session.close()

