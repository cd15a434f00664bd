"""The process table: every handler process superd is responsible for, in one place.

A handler's life, as supervisor would draw it:

    SENT ──(spawner answers with a pid)──> RUNNING ──(reaped, here or by its spawner)──> EXITED
      └──(no pid: it could not even fork)──> EXITED

A handler started in the loop itself (python, wait, nice or rlimits services) starts RUNNING.
A `wait` handler also holds its service's listening socket until it exits. The table is the
one place that maps a spawner's token or a pid to a handler; the server, the services and the
control socket ask it. What a handler's end means (log lines, limits) is its owner's business:
the table tells the owner through the `Owner` calls.

What a handler leaves behind (the processes it starts, in its cgroup or escaped from its
session) is superd/remains.py's; the table surveys it twice a second while handlers run, and
counts it toward max_children.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from superd import proctree
from superd.listeners import Listener
from superd.loop import Timer
from superd.remains import KILL_AFTER_TERM, Remains, Tree

__all__ = ["KILL_AFTER_TERM", "Handler", "Owner", "ProcessTable"]
SURVEY_EVERY = 0.5  # seconds between two looks for what handlers left, while handlers run

SENT, RUNNING, EXITED = "sent", "running", "exited"


class Owner(Protocol):
    """What a handler's service hears from the table."""

    name: str

    def handler_running(self, handler: Handler) -> None: ...
    def handler_resumed(self, handler: Handler) -> None: ...
    def handler_exited(self, handler: Handler, status: int) -> None: ...
    def handler_not_started(self, handler: Handler, failure: bytes | str | None) -> None: ...


@dataclass(eq=False)
class Handler:
    owner: Owner
    peer: str  # the peer as logged: an IP, "uid:N" on unix sockets, "" when unknown
    state: str = SENT
    pid: int = 0
    token: int = 0  # the spawner request, while SENT
    started: float = field(default_factory=time.monotonic)
    listener: Listener | None = None  # a wait handler: the listening socket it holds
    exec_pipe: int = -1  # in-loop fork: read end of the exec-status pipe, until read
    failure: bytes | str | None = None  # why it could not start, once known (raw or a sentence)
    inode: int = 0  # of its connection: how to recognise it if its spawner dies unanswered
    deadline: float | None = None  # when `timeout` ends it (and what it left in its session)
    pending: object = None  # a wait handler: what waited on its socket when it was handed over
    cgroup: str = ""  # the cgroup it was started in (superd/cgroups.py), if any
    timers: list[Timer] = field(default_factory=list)

    def cancel_timers(self) -> None:
        for t in self.timers:
            t.cancel()
        self.timers.clear()


class ProcessTable:
    def __init__(self, max_children: int, released: Callable[[Listener], None],
                 call_later: Callable[[float, Callable[[], None]], Timer],
                 helpers: Callable[[], set[int]], tree: Tree = proctree):
        self.max_children = max_children
        self.tree = tree
        self.remains = Remains(tree)
        self.released = released  # a wait handler's listener is free again
        self.call_later = call_later
        self.helpers = helpers  # superd's own child processes (spawners): not handlers
        self.by_pid: dict[int, Handler] = {}
        self.by_token: dict[int, Handler] = {}
        self.per_owner: Counter[Owner] = Counter()
        self.holders: dict[Listener, Handler] = {}
        self.recent: dict[int, Handler] = {}  # exited since the last survey, by pid
        self.survey_timer: Timer | None = None
        self.stopping = False

    # -- questions ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Processes started or on their way, and what they started: what `max_children`
        counts."""
        return len(self.by_pid) + len(self.by_token) + self.remains.count()

    def full(self) -> bool:
        return len(self) >= self.max_children

    def count(self, owner: Owner) -> int:
        return self.per_owner[owner]

    def holder(self, listener: Listener) -> Handler | None:
        return self.holders.get(listener)

    def running(self) -> Iterator[Handler]:
        return iter(list(self.by_pid.values()))

    # -- a handler's life --------------------------------------------------------------------

    def place(self) -> str:
        """The cgroup for a handler about to start, or "" (superd/remains.py)."""
        return self.remains.place()

    def unplaced(self, cgroup: str) -> None:
        """The handler `place` was asked for did not start: its cgroup is free again."""
        self.remains.vacate(cgroup, None, None)

    def sent(self, handler: Handler, token: int) -> None:
        """Asked a spawner to start it; its pid comes with `answered`."""
        handler.state, handler.token = SENT, token
        self.by_token[token] = handler
        self.per_owner[handler.owner] += 1
        if handler.listener is not None:
            self.holders[handler.listener] = handler

    def answered(self, token: int, pid: int, failure: bytes | str | None) -> None:
        """A spawner says how a request went: running as `pid`, or not started (pid 0)."""
        handler = self.by_token.pop(token, None)
        if handler is None:
            return
        if not pid:
            handler.state = EXITED
            self._gone(handler)
            self.remains.vacate(handler.cgroup, handler.owner, None)
            handler.owner.handler_not_started(handler, failure)
            self._release(handler)
            return
        handler.failure = failure
        self._run(handler, pid)

    def started(self, handler: Handler, pid: int) -> None:
        """Forked in the loop itself: running at once."""
        self.per_owner[handler.owner] += 1
        if handler.listener is not None:
            self.holders[handler.listener] = handler
        self._run(handler, pid)

    def _run(self, handler: Handler, pid: int) -> None:
        handler.state, handler.pid, handler.token = RUNNING, pid, 0
        self.by_pid[pid] = handler
        handler.owner.handler_running(handler)
        if self.stopping:
            self.signal(handler, signal.SIGTERM)
        self._survey_soon()

    def exited(self, pid: int, status: int) -> None:
        """`pid` has been reaped (here, or by the spawner that started it)."""
        handler = self.by_pid.pop(pid, None)
        if handler is None:
            self.remains.escaped.pop(pid, None)  # something a handler left, or a spawner
            return
        handler.state = EXITED
        self.recent[pid] = handler
        self._gone(handler)
        self.remains.vacate(handler.cgroup, handler.owner, handler.deadline)
        handler.owner.handler_exited(handler, status)
        self._release(handler)

    def _release(self, handler: Handler) -> None:
        if handler.listener is not None and self.holders.get(handler.listener) is handler:
            del self.holders[handler.listener]
            self.released(handler.listener)

    def _gone(self, handler: Handler) -> None:
        handler.cancel_timers()
        left = self.per_owner[handler.owner] - 1
        if left > 0:
            self.per_owner[handler.owner] = left
        else:
            del self.per_owner[handler.owner]

    # -- signals -----------------------------------------------------------------------------

    def signal(self, handler: Handler, sig: int) -> None:
        """Signal the handler's process group (and so what it started), if it still runs."""
        if self.by_pid.get(handler.pid) is not handler:
            return
        try:
            os.killpg(handler.pid, sig)
        except (ProcessLookupError, PermissionError):
            try:  # not a group leader (yet: a forked child makes itself one first thing)
                os.kill(handler.pid, sig)
            except OSError:
                pass

    def end(self, handler: Handler, sig: int) -> None:
        """`timeout`: signal the handler, everything below it, whatever group or session
        that is in, and what it left behind in its session."""
        if self.by_pid.get(handler.pid) is not handler:
            return
        below = [] if handler.cgroup else self.tree.descendants(handler.pid)  # (first: as
        self.signal(handler, sig)  # the handler dies, its children go up to superd a while)
        self.remains.end(handler.pid, handler.cgroup, sig, below)

    def stop(self) -> None:
        """superd stops: SIGTERM to every handler and what they started or left, and to each
        that starts from now on."""
        self.stopping = True
        self._signal_everything(signal.SIGTERM)

    def kill_all(self) -> None:
        self._signal_everything(signal.SIGKILL)

    def _signal_everything(self, sig: int) -> None:
        self.survey()
        below = self.remains.below(self.helpers())  # first: as handlers die, their children
        for handler in self.running():               # move up to superd, out of sight a while
            self.signal(handler, sig)
        self.remains.signal_everything(sig, below, {h.cgroup for h in self.by_token.values()})

    # -- what handlers leave behind ----------------------------------------------------------

    def survey(self) -> None:
        """Look at what handlers started and left (superd/remains.py)."""
        self.survey_timer = None
        helpers = self.helpers()

        def origin(session: int) -> tuple[Owner, float | None] | None:
            h = self.by_pid.get(session) or self.recent.get(session)
            return None if h is None else (h.owner, h.deadline)
        self.remains.survey([(h.pid, h.cgroup) for h in self.by_pid.values()],
                            lambda pid: pid in self.by_pid or pid in helpers, origin,
                            time.monotonic())
        self.recent.clear()
        self._survey_soon()

    def _survey_soon(self) -> None:
        if (self.by_pid or self.remains.busy()) and self.survey_timer is None:
            self.survey_timer = self.call_later(SURVEY_EVERY, self.survey)

    # -- superd upgrade: the table goes on in the next superd --------------------------------

    def export(self, listener_id: Callable[[Listener], str]) -> dict[str, Any]:
        """Every handler and what they left, for the superd that takes over (same pid)."""
        now = time.monotonic()

        def one(h: Handler) -> dict[str, object]:
            return {"service": h.owner.name, "peer": h.peer, "state": h.state, "pid": h.pid,
                    "token": h.token, "age": now - h.started, "inode": h.inode,
                    "cgroup": h.cgroup,
                    "deadline_in": None if h.deadline is None else h.deadline - now,
                    "listener": None if h.listener is None else listener_id(h.listener)}
        return {"handlers": [one(h) for h in [*self.by_pid.values(), *self.by_token.values()]],
                **self.remains.export(now)}

    def restore(self, state: dict[str, Any], owner: Callable[[str], Owner],
                listener: Callable[[str | None], Listener | None]) -> int:
        """Take the handlers an earlier superd ran: each goes on as if nothing happened (its
        START was logged then; its EXIT will be now). Returns how many."""
        now = time.monotonic()
        for item in state["handlers"]:
            h = Handler(owner(item["service"]), item["peer"], state=item["state"],
                        pid=item["pid"], token=item["token"], started=now - item["age"],
                        listener=listener(item["listener"]), inode=item["inode"],
                        cgroup=item.get("cgroup", ""),
                        deadline=None if item["deadline_in"] is None
                        else now + item["deadline_in"])
            self.per_owner[h.owner] += 1
            if h.listener is not None:
                self.holders[h.listener] = h
            if h.state == SENT:
                self.by_token[h.token] = h
            else:
                self.by_pid[h.pid] = h
                h.owner.handler_resumed(h)
        self.remains.restore(state, owner, {h.cgroup for h in self.by_pid.values()}
                             | {h.cgroup for h in self.by_token.values()}, now)
        self._survey_soon()
        return len(state["handlers"])

    # -- a spawner died ----------------------------------------------------------------------

    def adopt(self, tokens: list[int], spawner_pids: set[int]) -> list[Handler]:
        """A spawner died before answering `tokens`: some may have become handlers, which are
        superd's children now (subreaper). Match those by the connection on their stdin; the
        rest could not have started. Returns the handlers found."""
        found = []
        by_inode = {self.by_token[t].inode: t for t in tokens if t in self.by_token}
        for pid in self.tree.children():
            if pid in self.by_pid or pid in spawner_pids:
                continue
            try:
                link = os.readlink(f"/proc/{pid}/fd/0")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1].isdigit():
                token = by_inode.pop(int(link[8:-1]), None)
                if token is not None:
                    found.append(self.by_token[token])
                    self.answered(token, pid, None)
        for token in by_inode.values():
            self.answered(token, 0, "its spawner process died before starting it")
        return found
