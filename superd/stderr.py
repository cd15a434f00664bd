"""Handlers' stderr to the log, one record per line (`stderr: log`).

One pipe per service, shared by all its handlers: a pipe per connection cost seven syscalls
and two wake-ups each. Lines up to PIPE_BUF written at once arrive whole. The pipe is made when
the service is loaded, never on the way of a connection, and read until EOF (when the service
is gone and no handler or grandchild holds the write end any more).
"""

from __future__ import annotations

import os

from superd.log import MAX_MESSAGE, Log
from superd.loop import READ, Loop


class StderrLines:
    def __init__(self, loop: Loop, log: Log, fd: int, service: str):
        self.loop, self.log, self.fd = loop, log, fd
        self.prefix = f"{service}: "
        self.partial = b""
        self.cutting = False  # dropping the rest of a line that was too long
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
        if self.cutting:
            if not lines:
                self.partial = b""
                return
            lines.pop(0)  # the end of the line that was cut
            self.cutting = False
        if len(self.partial) > MAX_MESSAGE:
            # Longer than a message may be: log its beginning (the log cuts and marks it) and
            # drop the rest, up to its newline.
            lines.append(self.partial[:MAX_MESSAGE + 1])
            self.partial = b""
            self.cutting = True
        for line in lines:
            self._emit(line)

    def _emit(self, line: bytes) -> None:
        text = line.rstrip(b"\r").decode("utf-8", "replace")
        if text:
            self.log.info(self.prefix + text)


def open_pipe(loop: Loop, log: Log, service: str) -> int:
    """A new stderr pipe for `service`, read into the log; its write end (OSError if none)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    StderrLines(loop, log, r, service)
    return w
