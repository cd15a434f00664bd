"""Handlers' stderr to the log, one record per line, as `SERVICE[PID]: line` (`stderr: log`).

One socket pair per service, shared by all its handlers (a pipe per connection cost seven
syscalls and two wake-ups each). It is a unix *stream* pair with SO_PASSCRED on superd's end:
the kernel then hands every read the pid of the process that wrote it, and never joins the
bytes of two writers in one read. So each writer's lines are put together apart from every
other's, and concurrent connections can be told apart; a handler writes to it as to a pipe
(stream: no message size limit, EOF once the last writer is gone, as with the pipe before).
It is made when the service is loaded, never on the way of a connection.

A line is logged with the pid of its handler, the one in its START line:
- a line of a pid whose START is not out yet (a spawner reports the pid a little later) is
  held until it is, or for at most HOLD seconds;
- a line of a process the handler started is logged with the handler's pid when that process
  is still there to be asked (its process group or session is the handler's, even after the
  handler itself is gone); otherwise, after HOLD seconds, with its own pid;
- when a handler exits, what is already written is read and logged before its EXIT line.
Lines are cut at log.MAX_MESSAGE bytes (the log marks them); what is held is bounded.
"""

from __future__ import annotations

import array
import fcntl
import os
import socket
import struct
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from superd.log import MAX_MESSAGE, Log
from superd.loop import READ, Loop, Timer

HOLD = 1.0  # seconds a line may wait for its handler's START
READ_SIZE = 65536
CREDS = struct.calcsize("3i")
ANCILLARY = socket.CMSG_SPACE(CREDS)
MAX_DRAIN = 64  # reads when a handler exits, at most
MAX_WRITERS = 1024  # partial lines kept at once (one per writer)
MAX_HELD = 1024  # lines held at once
MAX_ENDED = 4096  # exited handlers whose children may still write


@dataclass
class _Held:
    since: float
    groups: tuple[int, ...]  # the writer's process group and session, when it was read
    lines: list[bytes] = field(default_factory=list)


class StderrLines:
    def __init__(self, loop: Loop, log: Log, service: str,
                 clock: Callable[[], float] = time.monotonic,
                 pair: tuple[socket.socket, int] | None = None):
        self.loop, self.log, self.service, self.clock = loop, log, service, clock
        if pair is None:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            ours.shutdown(socket.SHUT_WR)  # a handler reading its fd 2 gets EOF, not a hang
            pair = ours, theirs.detach()  # the handlers' end, for fd 2; the service closes it
        ours, self.write_fd = pair
        ours.setblocking(False)
        self.sock: socket.socket | None = ours
        self.partial: dict[int, tuple[float, bytes]] = {}
        self.cutting: set[int] = set()  # writers whose too long line is being dropped
        self.started: set[int] = set()  # handlers whose START line is out
        self.ended: dict[int, None] = {}  # handlers gone, oldest first: their children live on
        self.held: dict[int, _Held] = {}
        self.held_lines = 0
        self.timer: Timer | None = None
        self.count = array.array("i", [0])
        loop.add(ours, READ, self.ready)

    # -- what the service says ---------------------------------------------------------------

    def started_handler(self, pid: int) -> None:
        """`pid`'s START line is out: its lines (and its children's) may follow."""
        self.started.add(pid)
        self.ended.pop(pid, None)
        for writer, held in list(self.held.items()):
            if writer == pid or pid in held.groups:
                self._release(writer, pid)

    def ended_handler(self, pid: int) -> None:
        """`pid` has exited: log what it wrote before its EXIT line does."""
        if self.sock is not None and self._queued():
            for _ in range(MAX_DRAIN):
                if not self._read():
                    break
        if pid in self.partial:
            self._emit(pid, self.partial.pop(pid)[1])
        self.cutting.discard(pid)
        self.started.discard(pid)
        self.ended[pid] = None  # a child it left behind is still in its process group
        if len(self.ended) > MAX_ENDED:
            del self.ended[next(iter(self.ended))]

    # -- superd upgrade: the pair goes on in the superd that takes over ----------------------

    def export(self) -> dict[str, Any] | None:
        """Log what is held or half read now, and give what the next superd needs (its fds
        made inheritable); None when there is nothing left to hand over."""
        if self.sock is None:
            return None
        for writer, (_, rest) in list(self.partial.items()):
            self._emit(writer, rest)
        self.partial.clear()
        for writer in list(self.held):
            self._release(writer, None)
        fds = [self.sock.fileno()] + ([self.write_fd] if self.write_fd >= 0 else [])
        for fd in fds:
            os.set_inheritable(fd, True)
        return {"fd": self.sock.fileno(), "write_fd": self.write_fd, "fds": fds,
                "started": sorted(self.started), "ended": list(self.ended)}

    @classmethod
    def resume(cls, loop: Loop, log: Log, service: str, state: dict[str, Any]) -> StderrLines:
        """The reader an earlier superd exported, going on where it stopped."""
        for fd in state["fds"]:
            os.set_inheritable(fd, False)
        lines = cls(loop, log, service, pair=(socket.socket(fileno=state["fd"]),
                                               state["write_fd"]))
        lines.started = set(state["started"])
        lines.ended = dict.fromkeys(state["ended"])
        return lines

    def close_write(self) -> None:
        """No new handler will get the write end: once the running ones are gone, EOF."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    # -- reading -----------------------------------------------------------------------------

    def ready(self, mask: int) -> None:
        self._read()

    def _queued(self) -> int:
        """Bytes waiting to be read (FIONREAD: a quarter of what a read finding none costs,
        and this is asked once per handler)."""
        try:
            fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, self.count)  # type: ignore[union-attr]
        except OSError:
            return 1  # let a read find out
        return self.count[0]

    def _read(self) -> bool:
        """Read what one writer wrote; False when nothing was there (or at EOF)."""
        if self.sock is None:
            return False
        try:
            data, ancillary, _, _ = self.sock.recvmsg(READ_SIZE, ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            data, ancillary = b"", []
        if not data:
            self._eof()
            return False
        self._take(_writer(ancillary), data)
        return True

    def _take(self, writer: int, data: bytes) -> None:
        """Bytes of one writer: whole lines out (or held), the rest kept for later."""
        if writer in self.partial:
            data = self.partial.pop(writer)[1] + data
        lines = data.split(b"\n")
        rest = lines.pop()
        if writer in self.cutting:
            if not lines:
                return  # still the line being cut
            lines.pop(0)
            self.cutting.discard(writer)
        if len(rest) > MAX_MESSAGE:
            # Longer than a message may be: log its beginning (the log cuts and marks it) and
            # drop the rest, up to its newline.
            lines.append(rest[:MAX_MESSAGE + 1])
            rest = b""
            self.cutting.add(writer)
        if rest:
            if len(self.partial) >= MAX_WRITERS:
                oldest = next(iter(self.partial))
                self._out(oldest, [self.partial.pop(oldest)[1]])
            self.partial[writer] = (self.clock(), rest)
            if writer not in self.started:
                self._arm()
        if lines:
            self._out(writer, lines)

    def _out(self, writer: int, lines: list[bytes]) -> None:
        if writer in self.started:
            for line in lines:
                self._emit(writer, line)
            return
        held = self.held.get(writer)
        groups = held.groups if held is not None else _groups(writer)
        owner = self._owner(groups)
        if owner is not None:
            for line in lines:
                self._emit(owner, line)
            return
        if held is None:
            held = self.held[writer] = _Held(self.clock(), groups)
        held.lines += lines
        self.held_lines += len(lines)
        while self.held_lines > MAX_HELD:
            self._release(next(iter(self.held)), None)
        self._arm()

    def _owner(self, groups: tuple[int, ...]) -> int | None:
        """The handler (running or gone) whose process group or session these are, if any. A
        group id is not reused while the group has a member, so a live writer in the group of
        a handler that is gone is that handler's child."""
        return next((g for g in groups if g in self.started or g in self.ended), None)

    # -- what waits --------------------------------------------------------------------------

    def _release(self, writer: int, owner: int | None) -> None:
        held = self.held.pop(writer)
        self.held_lines -= len(held.lines)
        for line in held.lines:
            self._emit(owner if owner is not None else writer, line)

    def _arm(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_later(HOLD, self._expire)

    def _expire(self) -> None:
        """HOLD has passed for what waits since the timer was set: log it as it is."""
        self.timer = None
        due = self.clock() - HOLD
        for writer, held in list(self.held.items()):
            if held.since <= due:
                self._release(writer, None)
        for writer, (since, rest) in list(self.partial.items()):
            if since <= due and writer not in self.started:
                del self.partial[writer]
                self._emit(self._owner(_groups(writer)) or writer, rest)
        if self.held or any(w not in self.started for w in self.partial):
            self._arm()

    def _eof(self) -> None:
        """No handler holds the socket any more (the service is gone): log what is left."""
        for writer, (_, rest) in list(self.partial.items()):
            owner = writer if writer in self.started else self._owner(_groups(writer))
            self._emit(owner or writer, rest)
        self.partial.clear()
        for writer in list(self.held):
            self._release(writer, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None

    def _emit(self, pid: int, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text:
            self.log.info(f"{self.service}[{pid}]: {text}", SUPERD_SERVICE=self.service)


def _writer(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The writer's pid from SCM_CREDENTIALS (0 if none came); any fd a handler tried to
    pass along is closed at once."""
    pid = 0
    for level, kind, payload in ancillary:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_CREDENTIALS and len(payload) >= CREDS:
            pid = struct.unpack("3i", payload[:CREDS])[0]
        elif kind == socket.SCM_RIGHTS:
            for fd in struct.unpack(f"{len(payload) // 4}i", payload[:len(payload) // 4 * 4]):
                os.close(fd)
    return pid


def _groups(pid: int) -> tuple[int, ...]:
    """The process group and session of `pid` while it is there (a zombie still is)."""
    if pid <= 0:
        return ()  # unknown (0 would be superd's own)
    try:
        return os.getpgid(pid), os.getsid(pid)
    except OSError:
        return ()


def open_pipe(loop: Loop, log: Log, service: str) -> StderrLines:
    """A new stderr socket pair for `service`, read into the log (OSError if none could be
    made); its `write_fd` is what handlers get as fd 2."""
    return StderrLines(loop, log, service)
