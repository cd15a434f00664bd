"""superd's side of the spawner processes: a small pool used by the loop without ever waiting.

Why spawners exist is told in superd/spawner.py, what they say to each other in
superd/spawnproto.py. The pool sends each request to the least busy spawner and reports what
comes back through the callbacks it is given: a handler started (or not), a handler exited,
a spawner lost, requests a dead spawner never answered.
"""

from __future__ import annotations

import array
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial

from superd import spawner, spawnproto
from superd.forkexec import exec_error, fork_exec
from superd.spawnproto import Request, Started

RESTART_INTERVAL = 5.0  # a spawner that died is replaced, at most this often
SCRIPT = os.path.abspath(spawner.__file__)


class Spawners:
    def __init__(self, count: int, watch: Callable[[socket.socket, Callable[[int], None]], None],
                 unwatch: Callable[[socket.socket], None],
                 started: Callable[[int, int, bytes | str | None], None],
                 exited: Callable[[int, int], None], lost: Callable[[str], None],
                 unanswered: Callable[[list[int]], None]):
        self.watch, self.unwatch = watch, unwatch
        self.started, self.exited, self.lost = started, exited, lost
        self.unanswered = unanswered
        self.socks: list[socket.socket] = []
        self.pids: list[int] = []
        self.inflight: dict[socket.socket, set[int]] = {}
        self.token = 0
        self.last_start = 0.0
        become_subreaper()
        for _ in range(count):
            self._start_one()

    def _start_one(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-S", "-E", "-s", SCRIPT, str(theirs.fileno())]
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
            raise OSError(f"cannot start a spawner: {failure}")
        ours.setblocking(False)
        self.socks.append(ours)
        self.pids.append(pid)
        self.inflight[ours] = set()
        self.watch(ours, partial(self._ready, ours))

    def next_token(self) -> int:
        self.token += 1
        return self.token

    def send(self, request: Request, fds: list[int]) -> bool:
        """Send one request to the least busy spawner; False if none can take it now (the
        caller then starts the handler in the loop itself)."""
        if not self.socks:
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
                    self.started(reply.token, reply.pid, reply.failure)
                else:
                    self.exited(reply.pid, reply.status)

    def _died(self, sock: socket.socket) -> None:
        """A spawner is gone: its handlers are superd's now (subreaper); the requests it did
        not answer are settled by superd, which looks for their handlers among its children."""
        self.unwatch(sock)
        i = self.socks.index(sock)
        self.socks.pop(i)
        self.pids.pop(i)
        sock.close()
        self.lost("a spawner process died; its handlers are reaped by superd itself")
        unanswered = sorted(self.inflight.pop(sock))
        if unanswered:
            self.unanswered(unanswered)
        if time.monotonic() - self.last_start >= RESTART_INTERVAL:  # replace it, unless
            self.last_start = time.monotonic()                     # they keep dying
            try:
                self._start_one()
            except OSError as e:
                self.lost(str(e))

    def close(self) -> None:
        for sock in self.socks:
            self.unwatch(sock)
            sock.close()  # a spawner leaves when superd's end closes
        self.socks.clear()


def become_subreaper() -> None:
    """Orphans of superd's descendants become superd's children (PR_SET_CHILD_SUBREAPER)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
