"""A spawner process: starts exec handlers for superd, so that spawns overlap.

Starting a program with vfork suspends the caller until the child has exec'd. In the loop that
serialised every exec service behind the slowest exec, while xinetd and tcpserver fork a small
process and go straight back to accepting. So superd keeps a few of these small processes
(fresh interpreters running this file, stdlib only; superd/spawners.py is superd's side). Each
request (superd/spawnproto.py) brings a connection's fd; the spawner forks and execs the
handler, answers with its pid and later with its exit status.

superd is a child subreaper: should a spawner die, its handlers become superd's own children
and are reaped and logged as usual.
"""

from __future__ import annotations

import array
import errno
import os
import select
import signal
import socket
import sys
from collections.abc import Callable

if __name__ == "__main__":  # run as a script: the superd package is the folder above this file
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from superd import cgroups, spawnproto  # noqa: E402
from superd.forkexec import clean_signal_inheritance, fork_exec, read_error  # noqa: E402
from superd.spawnproto import Exited, Reply, Started  # noqa: E402


def _ignore(signum: int, frame: object) -> None:
    """A caught signal is reset to default by exec; an ignored one would stay ignored."""


def serve(sock: socket.socket, start: Start, settle: Callable[[], None] = lambda: None) -> None:
    """Take requests from superd on `sock` and start each handler with `start`, until superd
    closes its end and every handler started has been reaped and reported. `settle` runs
    before each batch of replies goes out."""
    clean_signal_inheritance()
    devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, _ignore)  # a terminal's ^C reaches the process group: not ours
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    poller = select.epoll()  # epoll itself: selectors' bookkeeping costs more than the poll
    sock_fd = sock.fileno()
    poller.register(sock_fd, select.EPOLLIN)
    poller.register(wake_r, select.EPOLLIN)
    replies = Replies(sock, settle)
    open_ = True
    while open_ or replies.children:
        events = poller.poll(0 if replies.waiting else -1)
        if not events:
            replies.send()  # nothing else ready: reap, and tell superd what happened
            continue
        for fd, _ in events:
            if fd == sock_fd:
                open_ = _request(sock, devnull, replies, start)
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
    superd recognises by their connection (ProcessTable.adopt).
    """

    def __init__(self, sock: socket.socket, settle: Callable[[], None]):
        self.sock: socket.socket | None = sock
        self.settle = settle
        self.children: set[int] = set()
        self.items: list[Reply] = []
        self.waiting = False  # replies or exits not told yet

    def started(self, reply: Started) -> None:
        self.items.append(reply)
        self.waiting = True

    def send(self) -> None:
        self.settle()
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                break
            if pid == 0:
                break
            self.children.discard(pid)
            self.items.append(Exited(pid, status))
        items, self.items, self.waiting = self.items, [], False
        step = spawnproto.REPLIES_PER_MESSAGE
        for i in range(0, len(items), step):
            if self.sock is not None:
                try:
                    self.sock.sendall(spawnproto.encode_replies(items[i:i + step]))
                except OSError:
                    pass


# How a helper starts one handler: (request, its fds, /dev/null) -> (pid or 0, failure or None).
# The fds are closed by the caller afterwards.
Start = Callable[[spawnproto.Request, list[int], int], tuple[int, bytes | str | None]]


def _request(sock: socket.socket, devnull: int, replies: Replies, start: Start) -> bool:
    """Serve one request; False once superd has closed its end."""
    try:
        data, ancdata, _, _ = sock.recvmsg(spawnproto.MAX_REQUEST,
                                           socket.CMSG_SPACE(4 * spawnproto.MAX_FDS))
    except InterruptedError:
        return True
    if not data:
        return False
    fds = [fd for level, kind, d in ancdata
           if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
           for fd in array.array("i", d[:len(d) - len(d) % 4])]
    try:
        request = spawnproto.decode_request(data)
        if not fds or (request.stderr == "log" and len(fds) < 2):
            raise ValueError("its fds are missing")
        pid, failure = start(request, fds, devnull)
    except (ValueError, TypeError, EOFError, IndexError) as e:
        pid, failure = 0, f"a request the helper could not serve ({e})"
        request = None
    finally:
        for fd in fds:
            os.close(fd)
    if pid:
        replies.children.add(pid)
    token = request.token if request is not None else spawnproto.token_of(data)
    replies.started(Started(token, pid, failure))
    if failure or len(replies.items) >= spawnproto.REPLIES_PER_MESSAGE:
        replies.send()  # a failure carries up to 4 KiB of text: alone, it stays small
    return True


class Place:
    """Where the spawner is in the cgroup tree. To start a handler it moves into the handler's
    cgroup and forks there, so the child is born in it and nothing it starts can be outside;
    a handler without a cgroup is forked at home. It goes back to its own cgroup before
    superd hears of the handler (`settle`, as replies go out), so a stretch of requests costs
    one move back instead of one each: superd acts on a handler's cgroup (timeout, its exit)
    only once told of the handler, and by then the spawner is home, neither counted as nor
    killed with a handler. Failing to go back, it ends, and superd starts another."""

    def __init__(self) -> None:
        self.mover = cgroups.Mover()
        self.home = cgroups.current()  # learnt at the start, in superd's cgroup, and only then
        self.away = False

    def enter(self, cgroup: str) -> None:
        """Into `cgroup`, or home for "" (OSError if it cannot)."""
        if not cgroup:
            self.settle()
            return
        if not self.home:  # it could not come back
            raise OSError(errno.ENOENT, "the spawner's own cgroup is unknown")
        self.away = True
        cgroups.enter(cgroup, self.mover)

    def settle(self) -> None:
        if self.away:
            try:
                self.mover.move(self.home)  # (never made again: superd lives there)
            except OSError:
                os._exit(1)
            self.away = False


def exec_handler(place: Place) -> Start:
    """The spawner's way: fork and exec the program (vfork where CPython can)."""
    def start(request: spawnproto.Request, fds: list[int],
              devnull: int) -> tuple[int, bytes | str | None]:
        conn = fds[0]
        stderr = fds[1] if request.stderr == "log" else (
            conn if request.stderr == "socket" else devnull)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        pid, failure = 0, None  # type: tuple[int, bytes | str | None]
        step = f"cgroup {request.cgroup}"
        try:
            place.enter(request.cgroup)
            step = "fork"
            pid = fork_exec(request.argv, request.program, env=request.env, stdin=conn,
                            stdout=conn, stderr=stderr, errpipe=(status_r, status_w),
                            new_session=True, cwd=request.cwd, gid=request.gid,
                            groups=request.groups, uid=request.uid, umask=request.umask)
        except (OSError, ValueError, TypeError) as e:
            failure = f"{step}: {getattr(e, 'strerror', None) or e}"
        finally:
            os.close(status_w)
        if pid:
            failure = read_error(status_r)[:spawnproto.MAX_FAILURE] or None  # EOF: exec'd
        os.close(status_r)
        return pid, failure
    return start


if __name__ == "__main__":
    fd = int(sys.argv[1])
    os.closerange(3, fd)
    place = Place()
    serve(socket.socket(fileno=fd), exec_handler(place), place.settle)
