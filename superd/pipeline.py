"""A connection's way from accept to start, as one record moving through named stages.

    accepted ─> checking (the service's stages, in order) ─> admitted (limits) ─> started ─> ended
                  └─────────── refused, with a reason, at any step ───────────┘

The stages of a service (superd/stages.py) are built once, when its table entry is loaded. A
stage answers at once (go on, or refuse with a reason), or says WAIT: it has put the connection
on the loop (a read, a write, an answer from a helper) and will call `done` later. A waiting
stage has a deadline; when it passes, the stage says whether to refuse or go on without it.
A service without stages pays for none of this: `begin` goes straight to admission.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Protocol

from superd.listeners import Listener
from superd.loop import Timer

ACCEPTED, CHECKING, ADMITTED, STARTED, ENDED = "accepted", "checking", "admitted", "started", \
    "ended"


class Waiting:
    """The answer of a stage that will finish later (there is one: WAIT)."""

    def __repr__(self) -> str:
        return "WAIT"


WAIT = Waiting()


class Connection:
    """One accepted connection, from accept until its session or handler has it."""

    # `facts` (superd/lookups.py) is set only by stages that look things up: unset, it costs
    # a connection of a service without such stages nothing.
    __slots__ = ("sock", "addr", "peer", "listener", "state", "stage", "timer", "env",
                 "accepted", "userid", "facts")
    facts: object  # a lookups.Facts (not imported here: lookups imports this module)

    def __init__(self, sock: socket.socket, addr: object, peer: str, listener: Listener):
        self.sock, self.addr, self.peer, self.listener = sock, addr, peer, listener
        self.state = ACCEPTED
        self.stage = 0  # the index of the stage it waits in, while CHECKING
        self.timer: Timer | None = None
        self.env: dict[str, str] | None = None  # handler variables stages add
        self.accepted = time.monotonic()
        self.userid = ""  # the ident answer, once a stage asked (log field USERID)


Done = Callable[[Connection, "str | None"], None]


class Stage(Protocol):
    """One pre-start step of a service; see the module docstring."""

    name: str
    deadline: float  # seconds a WAITing connection may wait here

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        """None: go on; a string: refuse for that reason; WAIT: `done(conn, reason)` later."""
        ...

    def expired(self, conn: Connection) -> str | None:
        """The deadline passed while waiting: the reason to refuse, or None to go on."""
        ...

    def cancel(self, conn: Connection) -> None:
        """Stop waiting for `conn` (deadline, or the connection is dropped): undo watches."""
        ...


class Pipeline:
    """Runs a service's connections through its stages, then admission, then start.

    Given, not reached for: `admit(conn)` returns None or a refusal reason (limits);
    `start(conn)` hands an admitted connection to its session or handler; `refuse(conn,
    reason)` counts, logs and closes a refused one; `call_later` sets deadlines.
    """

    def __init__(self, stages: tuple[Stage, ...], *, admit: Callable[[Connection], str | None],
                 start: Callable[[Connection], None],
                 refuse: Callable[[Connection, str], None],
                 call_later: Callable[[float, Callable[[], None]], Timer]):
        self.stages = stages
        self.admit, self.start, self.refuse = admit, start, refuse
        self.call_later = call_later
        self.waiting: set[Connection] = set()

    def begin(self, conn: Connection) -> None:
        """A connection was just accepted."""
        if self.stages:
            self._run(conn, 0)
            return
        reason = self.admit(conn)
        if reason is None:
            conn.state = ADMITTED
            self.start(conn)
        else:
            self.refuse(conn, reason)

    def _run(self, conn: Connection, first: int) -> None:
        stages = self.stages
        for i in range(first, len(stages)):
            result = stages[i].check(conn, self.done)
            if result is None:
                continue
            if isinstance(result, Waiting):
                conn.state, conn.stage = CHECKING, i
                self.waiting.add(conn)
                conn.timer = self.call_later(stages[i].deadline, partial(self._expired, conn))
            else:
                self.refuse(conn, result)
            return
        reason = self.admit(conn)
        if reason is None:
            conn.state = ADMITTED
            self.start(conn)
        else:
            self.refuse(conn, reason)

    def done(self, conn: Connection, reason: str | None) -> None:
        """A waiting stage has its answer: refuse for `reason`, or go on to the next stage."""
        if conn not in self.waiting:
            return  # already expired or aborted
        self.waiting.discard(conn)
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if reason is not None:
            self.refuse(conn, reason)
        else:
            self._run(conn, conn.stage + 1)

    def _expired(self, conn: Connection) -> None:
        if conn not in self.waiting:
            return
        self.waiting.discard(conn)
        conn.timer = None
        stage = self.stages[conn.stage]
        stage.cancel(conn)
        reason = stage.expired(conn)
        if reason is not None:
            self.refuse(conn, reason)
        else:
            self._run(conn, conn.stage + 1)

    def abort(self) -> None:
        """Drop every connection still in a stage (superd stops): close, start nothing."""
        for conn in list(self.waiting):
            self.waiting.discard(conn)
            if conn.timer is not None:
                conn.timer.cancel()
            self.stages[conn.stage].cancel(conn)
            conn.state = ENDED
            conn.sock.close()
