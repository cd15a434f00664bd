"""superd's side of its helper processes: a small pool used by the loop without ever waiting.

Two kinds of helper speak the spawner protocol (superd/spawnproto.py): the spawners, which
exec handlers (superd/spawner.py says why they exist), and each python service's host, which
forks its python handlers (superd/pyhost.py). A pool sends each request to its least busy
process and reports what comes back through the callbacks it is given: a handler started (or
not), a handler exited, a helper lost, requests a dead helper never answered.
"""

from __future__ import annotations

import array
import itertools
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from superd import caps, spawner, spawnproto
from superd.forkexec import exec_error, fork_exec
from superd.spawnproto import Request, Started

RESTART_INTERVAL = 5.0  # a helper that died is replaced, at most this often
SPAWNER = os.path.abspath(spawner.__file__)
PYHOST = os.path.join(os.path.dirname(SPAWNER), "pyhost.py")
_tokens = itertools.count(1)  # one sequence for every pool: the process table maps them


def next_free_token() -> int:
    return next(_tokens)


def tokens_from(first: int) -> None:
    """After an upgrade: go on after the tokens the earlier superd handed out."""
    global _tokens
    _tokens = itertools.count(first)


class Spawners:
    def __init__(self, count: int, watch: Callable[[socket.socket, Callable[[int], None]], None],
                 unwatch: Callable[[socket.socket], None],
                 started: Callable[[int, int, bytes | str | None], None],
                 exited: Callable[[int, int], None], lost: Callable[[str], None],
                 unanswered: Callable[[list[int]], None], *, script: str = SPAWNER,
                 record: bytes | None = None, closed: Callable[[Spawners], None] | None = None):
        self.watch, self.unwatch = watch, unwatch
        self.started, self.exited, self.lost = started, exited, lost
        self.unanswered, self.closed = unanswered, closed
        self.script, self.record = script, record
        self.kind = "spawner" if script == SPAWNER else "python host"
        self.socks: list[socket.socket] = []
        self.pids: list[int] = []
        self.inflight: dict[socket.socket, set[int]] = {}
        self.running: set[int] = set()  # handlers started and not yet reported gone
        self.retiring = False
        self.last_start = 0.0
        become_subreaper()
        for _ in range(count):
            self._start_one()

    def _start_one(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Spawners need nothing but the standard library (-S: no site); a python host needs
        # what the handler imports (the site-packages of superd's interpreter).
        argv = [sys.executable, *(["-S"] if self.script == SPAWNER else []), "-E", "-s",
                self.script, str(theirs.fileno())]
        errpipe = os.pipe2(os.O_CLOEXEC)
        try:
            pid = fork_exec([os.fsencode(a) for a in argv], [os.fsencode(sys.executable)],
                            env=None, stdin=-1, stdout=-1, stderr=-1, errpipe=errpipe,
                            keep=(theirs.fileno(),))
        except BaseException:
            ours.close()
            raise
        finally:
            os.close(errpipe[1])
            theirs.close()
        failure = exec_error(os.read(errpipe[0], spawnproto.MAX_FAILURE))
        os.close(errpipe[0])
        if failure:
            ours.close()
            raise OSError(f"cannot start a {self.kind}: {failure}")
        if self.record is not None:
            ours.settimeout(5.0)  # read at once by the new process; large only in theory
            try:
                spawnproto.send_record(ours, self.record)
            except OSError:
                ours.close()
                raise
        ours.setblocking(False)
        self._add(ours, pid, set())

    def _add(self, sock: socket.socket, pid: int, inflight: set[int]) -> None:
        self.socks.append(sock)
        self.pids.append(pid)
        self.inflight[sock] = inflight
        self.watch(sock, partial(self._ready, sock))

    def next_token(self) -> int:
        return next(_tokens)

    # -- superd upgrade: the helpers stay, their sockets go through the exec -------------------

    def export(self) -> dict[str, Any]:
        """What the next superd needs to go on with these helpers (fds stay open over exec)."""
        for sock in self.socks:
            os.set_inheritable(sock.fileno(), True)
        return {"kind": self.kind, "running": sorted(self.running),
                "helpers": [{"fd": sock.fileno(), "pid": pid,
                             "inflight": sorted(self.inflight[sock])}
                            for sock, pid in zip(self.socks, self.pids, strict=True)]}

    @classmethod
    def adopt(cls, state: dict[str, Any], **callbacks: Any) -> Spawners:
        """The helpers an earlier superd ran, taken over as they are: they answer for what
        they started, take no new request (their code is the old one), and go when done:
        the caller records the pool, then calls retire()."""
        pool = cls(0, **callbacks, script=SPAWNER if state["kind"] == "spawner" else PYHOST)
        pool.running = set(state["running"])
        for helper in state["helpers"]:
            sock = socket.socket(fileno=helper["fd"])
            os.set_inheritable(helper["fd"], False)
            sock.setblocking(False)
            pool._add(sock, helper["pid"], set(helper["inflight"]))
        return pool

    def send(self, request: Request, fds: list[int]) -> bool:
        """Send one request to the least busy helper; False if none can take it now."""
        if not self.socks or self.retiring:
            return False
        inflight = self.inflight
        sock = min(self.socks, key=lambda s: len(inflight[s]))
        data = spawnproto.encode_request(request)
        if len(data) > spawnproto.MAX_REQUEST:
            return False
        try:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds).tobytes())])
        except OSError:
            return False
        inflight[sock].add(request.token)
        return True

    def _ready(self, sock: socket.socket, mask: int) -> None:
        while True:
            try:
                data = sock.recv(spawnproto.MAX_REPLY)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._died(sock)
                return
            try:
                replies = spawnproto.decode_replies(data)
            except ValueError as e:
                self.lost(f"a spawner sent an unreadable reply ({e})")
                self._died(sock)  # a helper's bad message must not take superd down
                return
            for reply in replies:
                if isinstance(reply, Started):
                    self.inflight[sock].discard(reply.token)
                    if reply.pid:
                        self.running.add(reply.pid)
                    self.started(reply.token, reply.pid, reply.failure)
                else:
                    self.running.discard(reply.pid)
                    self.exited(reply.pid, reply.status)
            if self.retiring and not self.running and not any(self.inflight.values()):
                self.close()
                return

    def _died(self, sock: socket.socket) -> None:
        """A spawner is gone: its handlers are superd's now (subreaper); the requests it did
        not answer are settled by superd, which looks for their handlers among its children."""
        self.unwatch(sock)
        i = self.socks.index(sock)
        self.socks.pop(i)
        self.pids.pop(i)
        sock.close()
        self.lost(f"a {self.kind} process died; its handlers are reaped by superd itself")
        unanswered = sorted(self.inflight.pop(sock))
        if unanswered:
            self.unanswered(unanswered)
        if self.retiring:
            if not self.socks:
                self.close()
        elif time.monotonic() - self.last_start >= RESTART_INTERVAL:  # replace it, unless
            self.last_start = time.monotonic()                     # they keep dying
            try:
                self._start_one()
            except OSError as e:
                self.lost(str(e))

    def retire(self) -> None:
        """Take no more requests; close once every handler started has been reported gone."""
        self.retiring = True
        if not self.running and not any(self.inflight.values()):
            self.close()

    def close(self) -> None:
        for sock in self.socks:
            self.unwatch(sock)
            sock.close()  # a helper leaves when superd's end closes
        self.socks.clear()
        self.pids.clear()
        if self.closed is not None:
            closed, self.closed = self.closed, None
            closed(self)


def become_subreaper() -> None:
    """Orphans of superd's descendants become superd's children (PR_SET_CHILD_SUBREAPER)."""
    try:
        caps.prctl(caps.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except OSError:
        pass
