"""Spawner processes: exec handlers off the loop, so spawns overlap instead of queueing.

Starting a program with vfork suspends the caller until the child has exec'd. In the loop
that serialised every exec service behind the slowest exec, while xinetd and tcpserver fork a
small process and go straight back to accepting. So superd keeps a few small helper processes
(fresh interpreters running this file, stdlib only). For each connection of an exec service
superd sends one request, with the connection's fd attached (SCM_RIGHTS), and goes on; the
spawner does the vfork and exec, answers with the pid, and later reports the exit status.

Protocol (SOCK_SEQPACKET, marshal):
  superd -> spawner: (token, stderr_mode, argv, program, env_list, cwd, gid, groups, uid, umask)
                     with fds [connection] or [connection, stderr pipe]
  spawner -> superd: tuples of up to 64 replies, in the order they happened, sent when the
                     spawner has nothing else ready (see Replies):
                     ("S", token, pid, failure or None)   pid 0 when it could not fork;
                     failure is fork_exec's raw status bytes, or a sentence
                     ("X", pid, wait status)

superd is a child subreaper (PR_SET_CHILD_SUBREAPER): should a spawner die, its handlers become
superd's own children and are reaped and logged as usual.
"""

from __future__ import annotations

import _posixsubprocess
import array
import marshal
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable

MAX_FDS = 2
RESTART_INTERVAL = 5.0  # a spawner that died is replaced, at most this often
# Receive buffers, allocated per message: a request is well under this (larger ones are spawned
# by superd itself); 1 MiB buffers cost an mmap, page faults and a munmap per message.
MAX_REQUEST = 64 << 10
MAX_REPLY = 8 << 10  # a reply carries at most 4 KiB of failure text
REPLIES_PER_MESSAGE = 64  # about 20 bytes each (one with failure text goes alone)


# -- superd's side ---------------------------------------------------------------------------

class Spawners:
    """A small pool of spawner processes, used by the loop without ever blocking on them."""

    def __init__(self, count: int, add_reader: Callable[[socket.socket, Callable], None],
                 remove_reader: Callable[[socket.socket], None],
                 started: Callable[[int, int, bytes | str | None], None],
                 exited: Callable[[int, int], None], lost: Callable[[str], None],
                 orphaned: Callable[[list[int]], None]):
        self.add_reader, self.remove_reader = add_reader, remove_reader
        self.started, self.exited, self.lost = started, exited, lost
        self.orphaned = orphaned
        self.socks: list[socket.socket] = []
        self.pids: list[int] = []
        self.inflight: dict[socket.socket, set[int]] = {}
        self.token = 0
        self.last_start = 0.0
        _become_subreaper()
        for _ in range(count):
            self._start_one()

    def _start_one(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        argv = [sys.executable, "-S", "-E", "-s", __file__, str(theirs.fileno())]
        errpipe_r, errpipe_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid = _posixsubprocess.fork_exec(
                [os.fsencode(a) for a in argv], [os.fsencode(sys.executable)], True,
                (theirs.fileno(), errpipe_w), "/", None, -1, -1, -1, -1, -1, -1,
                errpipe_r, errpipe_w, True, False, 0, None, None, None, -1, None, True)
        finally:
            os.close(errpipe_w)
            theirs.close()
        failure = os.read(errpipe_r, 4096)
        os.close(errpipe_r)
        if failure:
            ours.close()
            raise OSError(f"cannot start a spawner: {failure.decode(errors='replace')}")
        ours.setblocking(False)
        self.socks.append(ours)
        self.pids.append(pid)
        self.inflight[ours] = set()
        self.add_reader(ours, lambda mask, s=ours: self._ready(s))

    def spawn(self, mode: str, request: tuple, fds: list[int]) -> int | None:
        """Send one spawn request; its token, or None if no spawner can take it right now
        (the caller then spawns in the loop itself)."""
        if not self.socks:
            return None
        inflight = self.inflight
        sock = min(self.socks, key=lambda s: len(inflight[s]))
        self.token += 1
        data = marshal.dumps((self.token, mode, *request))
        if len(data) > MAX_REQUEST:
            return None
        try:
            sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                   array.array("i", fds).tobytes())])
        except OSError:
            return None
        self.inflight[sock].add(self.token)
        return self.token

    def _ready(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(MAX_REPLY)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._died(sock)
                return
            try:
                replies = marshal.loads(data)
                if not all(isinstance(r, tuple) and len(r) == {"S": 4, "X": 3}.get(r[0])
                           for r in replies):
                    raise ValueError("unexpected shape")
            except (EOFError, ValueError, TypeError, IndexError) as e:
                self.lost(f"a spawner sent an unreadable reply ({e})")
                self._died(sock)  # a helper's bad message must not take superd down
                return
            for reply in replies:
                if reply[0] == "S":
                    _, token, pid, failure = reply
                    self.inflight[sock].discard(token)
                    self.started(token, pid, failure)
                else:
                    self.exited(reply[1], reply[2])

    def _died(self, sock: socket.socket) -> None:
        """A spawner is gone: its handlers are ours now (subreaper); the requests it did not
        answer are settled by superd, which looks for their handlers among its children."""
        self.remove_reader(sock)
        i = self.socks.index(sock)
        self.socks.pop(i)
        self.pids.pop(i)
        sock.close()
        self.lost("a spawner process died; its handlers are reaped by superd itself")
        unanswered = sorted(self.inflight.pop(sock))
        if unanswered:
            self.orphaned(unanswered)
        if time.monotonic() - self.last_start >= RESTART_INTERVAL:  # replace it, unless
            self.last_start = time.monotonic()                     # they keep dying
            try:
                self._start_one()
            except OSError as e:
                self.lost(str(e))

    def close(self) -> None:
        for sock in self.socks:
            self.remove_reader(sock)
            sock.close()  # a spawner leaves when superd's end closes
        self.socks.clear()


def _become_subreaper() -> None:
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


# -- the spawner process ---------------------------------------------------------------------

def _ignore(signum: int, frame: object) -> None:
    """A caught signal is reset to default by exec; an ignored one would stay ignored."""


def serve(sock: socket.socket) -> None:
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, _ignore)  # a terminal's ^C reaches the process group: not ours
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    poller = select.epoll()  # epoll itself: selectors' bookkeeping costs more than the poll
    sock_fd = sock.fileno()
    poller.register(sock_fd, select.EPOLLIN)
    poller.register(wake_r, select.EPOLLIN)
    replies = Replies(sock)
    open_ = True
    while open_ or replies.children:
        events = poller.poll(0 if replies.waiting else -1)
        if not events:
            replies.send()  # nothing else ready: reap, and tell superd what happened
            continue
        for fd, _ in events:
            if fd == sock_fd:
                open_ = _requests(sock, devnull, replies)
                if not open_:
                    poller.unregister(sock_fd)
                    replies.sock = None  # superd is gone: nobody to tell
                    replies.send()
                    if not replies.children:
                        return
            else:
                os.read(wake_r, 512)
                replies.waiting = True  # a child exited: reap it when the stretch ends


class Replies:
    """What superd is told, gathered while the spawner has other work ready, so that a busy
    stretch costs superd one wake-up instead of two per connection.

    Children are reaped only when the replies go out (`send`): a spawner that dies with
    replies unsent has reaped nothing it did not report. Its children, exited or not, become
    superd's (the subreaper's) and are reaped there; handlers it started but did not report,
    superd recognises by their connection (Server.adopt_orphans).
    """

    def __init__(self, sock: socket.socket):
        self.sock: socket.socket | None = sock
        self.children: set[int] = set()
        self.items: list[tuple] = []
        self.waiting = False  # replies or exits not told yet

    def started(self, reply: tuple) -> None:
        self.items.append(reply)
        self.waiting = True

    def send(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            self.children.discard(pid)
            self.items.append(("X", pid, status))
        items, self.items, self.waiting = self.items, [], False
        for i in range(0, len(items), REPLIES_PER_MESSAGE):
            if self.sock is not None:
                try:
                    self.sock.sendall(marshal.dumps(tuple(items[i:i + REPLIES_PER_MESSAGE])))
                except OSError:
                    pass


def _requests(sock: socket.socket, devnull: int, replies: Replies) -> bool:
    try:
        data, ancdata, _, _ = sock.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(4 * MAX_FDS))
    except InterruptedError:
        return True
    if not data:
        return False
    fds = [fd for level, kind, d in ancdata
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", d[:len(d) - len(d) % 4])]
    token, mode, argv, program, env_list, cwd, gid, groups, uid, umask = marshal.loads(data)
    conn = fds[0]
    stderr = fds[1] if mode == "log" else (conn if mode == "socket" else devnull)
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    pid, failure = 0, None
    try:
        pid = _posixsubprocess.fork_exec(
            argv, program, True, (status_w,), cwd, env_list, conn, -1, -1, conn, -1, stderr,
            status_r, status_w, True, False, 0, gid, groups, uid, umask, None, True)
    except OSError as e:
        failure = f"OSError: cannot fork: {e.strerror}"
    finally:
        os.close(status_w)
        for fd in fds:
            os.close(fd)
    if pid:
        replies.children.add(pid)
        failure = os.read(status_r, 4096) or None  # complete: written before exec or _exit
    os.close(status_r)
    replies.started(("S", token, pid, failure))
    if failure or len(replies.items) >= REPLIES_PER_MESSAGE:
        replies.send()  # a failure carries up to 4 KiB of text: alone, it stays small
    return True


if __name__ == "__main__":
    fd = int(sys.argv[1])
    os.closerange(3, fd)
    serve(socket.socket(fileno=fd))
