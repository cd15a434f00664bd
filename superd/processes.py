"""The process table: every handler process superd is responsible for, in one place.

A handler's life, as supervisor would draw it:

    SENT ──(spawner answers with a pid)──> RUNNING ──(reaped, here or by its spawner)──> EXITED
      └──(no pid: it could not even fork)──> EXITED

A handler started in the loop itself (python, wait, nice or rlimits services) starts RUNNING.
A `wait` handler also holds its service's listening socket until it exits. The table is the
one place that maps a spawner's token or a pid to a handler; the server, the services and the
control socket ask it. What a handler's end means (log lines, limits) is its owner's business:
the table tells the owner through the `Owner` calls.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from superd.loop import Timer

SENT, RUNNING, EXITED = "sent", "running", "exited"


class Owner(Protocol):
    """What a handler's service hears from the table."""

    name: str

    def handler_running(self, handler: Handler) -> None: ...
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
    listener: object | None = None  # a wait handler: the listening socket it holds
    exec_pipe: int = -1  # in-loop fork: read end of the exec-status pipe, until read
    failure: bytes | str | None = None  # why it could not start, once known (raw or a sentence)
    inode: int = 0  # of its connection: how to recognise it if its spawner dies unanswered
    timers: list[Timer] = field(default_factory=list)

    def cancel_timers(self) -> None:
        for t in self.timers:
            t.cancel()
        self.timers.clear()


class ProcessTable:
    def __init__(self, max_children: int, released: Callable[[object], None]):
        self.max_children = max_children
        self.released = released  # a wait handler's listener is free again
        self.by_pid: dict[int, Handler] = {}
        self.by_token: dict[int, Handler] = {}
        self.per_owner: Counter[Owner] = Counter()
        self.holders: dict[object, Handler] = {}
        self.stopping = False

    # -- questions ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Handlers started or on their way: what `max_children` counts."""
        return len(self.by_pid) + len(self.by_token)

    def full(self) -> bool:
        return len(self.by_pid) + len(self.by_token) >= self.max_children

    def count(self, owner: Owner) -> int:
        return self.per_owner[owner]

    def holder(self, listener: object) -> Handler | None:
        return self.holders.get(listener)

    def running(self) -> Iterator[Handler]:
        return iter(list(self.by_pid.values()))

    # -- a handler's life --------------------------------------------------------------------

    def sent(self, handler: Handler, token: int) -> None:
        """Asked a spawner to start it; its pid comes with `answered`."""
        handler.state, handler.token = SENT, token
        self.by_token[token] = handler
        self.per_owner[handler.owner] += 1

    def answered(self, token: int, pid: int, failure: bytes | str | None) -> None:
        """A spawner says how a request went: running as `pid`, or not started (pid 0)."""
        handler = self.by_token.pop(token, None)
        if handler is None:
            return
        if not pid:
            handler.state = EXITED
            self._gone(handler)
            handler.owner.handler_not_started(handler, failure)
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

    def exited(self, pid: int, status: int) -> None:
        """`pid` has been reaped (here, or by the spawner that started it)."""
        handler = self.by_pid.pop(pid, None)
        if handler is None:
            return  # a spawner, or an orphaned grandchild adopted as subreaper
        handler.state = EXITED
        self._gone(handler)
        handler.owner.handler_exited(handler, status)
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

    def stop(self) -> None:
        """superd stops: SIGTERM to every handler, and to each that starts from now on."""
        self.stopping = True
        for handler in self.running():
            self.signal(handler, signal.SIGTERM)

    def kill_all(self) -> None:
        for handler in self.running():
            self.signal(handler, signal.SIGKILL)

    # -- a spawner died ----------------------------------------------------------------------

    def adopt(self, tokens: list[int], spawner_pids: set[int]) -> list[Handler]:
        """A spawner died before answering `tokens`: some may have become handlers, which are
        superd's children now (subreaper). Match those by the connection on their stdin; the
        rest could not have started. Returns the handlers found."""
        found = []
        by_inode = {self.by_token[t].inode: t for t in tokens if t in self.by_token}
        for pid in own_children():
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


def own_children() -> list[int]:
    """This process's children (Linux: /proc/PID/task/TID/children)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return pids
