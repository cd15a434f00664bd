"""Running handlers: what superd remembers about each, and the pipe that carries its stderr."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from superd.loop import READ, Loop, Timer

if TYPE_CHECKING:
    from superd.listeners import Listener
    from superd.log import Log
    from superd.service import ServiceRuntime

MAX_LINE = 4096


@dataclass(eq=False)
class Child:
    pid: int
    service: ServiceRuntime
    peer: str  # the peer as logged: an IP, "uid:N" for unix, "" when unknown
    status_fd: int
    started: float = field(default_factory=time.monotonic)
    listener: Listener | None = None  # set for wait handlers: the socket they hold
    timers: list[Timer] = field(default_factory=list)
    timed_out: bool = False
    failure: str | None = None  # why it could not start, once the status pipe said so
    inode: int = 0  # of the connection, for a handler a spawner starts: how to find it orphaned

    def cancel_timers(self) -> None:
        for t in self.timers:
            t.cancel()
        self.timers.clear()


class StderrLines:
    """Forward handlers' stderr to the log, one record per line (SPEC §2 `stderr: log`).

    One pipe per service, shared by all its handlers: a pipe per connection cost seven
    syscalls and two wake-ups each. Lines up to PIPE_BUF written at once arrive whole.
    Read until EOF (when the service is gone and no handler or grandchild holds the pipe).
    """

    def __init__(self, loop: Loop, log: Log, fd: int, service: str):
        self.loop, self.log, self.fd = loop, log, fd
        self.prefix = f"{service}: "
        self.partial = b""
        os.set_blocking(fd, False)
        loop.add(fd, READ, self.ready)

    def ready(self, mask: int) -> None:
        if self.fd < 0:
            return  # closed earlier in this batch of events
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            if self.partial:
                self._emit(self.partial)
            self.loop.remove(self.fd)
            os.close(self.fd)
            self.fd = -1
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        if len(self.partial) > MAX_LINE:
            lines.append(self.partial)
            self.partial = b""
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text:
            self.log.info(self.prefix + text)
