"""A service's own log file (xinetd's `log_type FILE path soft hard`), written off the loop.

A write to a file can wait on the disk, so the loop only appends each line to a bounded
queue and a writer thread puts it in the file (opened O_APPEND, created 0640). Lines beyond
MAX_QUEUE while the disk is slow are dropped and counted. The limits are xinetd's: past the
soft limit the log says so once; at the hard limit the file gets no more lines (both until
the file is rotated away: a new file at the path is started afresh). Lines look as xinetd
writes them to its files: `24/12/31@23:59:59: START: svc pid=...`.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable

MAX_QUEUE = 10_000
CHECK_PATH_EVERY = 5.0  # seconds between looks at whether the file was rotated away


class LogFile:
    def __init__(self, path: str, limits: tuple[int, int] | None,
                 warn: Callable[[str], None]):
        self.path, self.limits, self.warn = path, limits, warn
        self.lines: deque[bytes] = deque()
        self.wake = threading.Condition()
        self.dropped = 0
        self.stopping = False
        self.events: deque[str] = deque()  # said by the writer, logged by the loop
        self.thread = threading.Thread(target=self._run, name=f"log {path}", daemon=True)
        self.thread.start()

    def write(self, message: str) -> None:
        """From the loop: never waits (but for the queue's lock, held only to pop a line)."""
        while self.events:
            self.warn(self.events.popleft())
        stamp = time.strftime("%y/%m/%d@%H:%M:%S", time.localtime())
        data = f"{stamp}: {message}\n".encode("utf-8", "replace")
        with self.wake:
            if len(self.lines) >= MAX_QUEUE:
                self.dropped += 1
                return
            self.lines.append(data)
            self.wake.notify()

    def _run(self) -> None:
        fd, size, told, checked = -1, 0, False, 0.0
        while True:
            with self.wake:
                while not self.lines and not self.stopping:
                    self.wake.wait()
                if not self.lines:
                    break
                batch = list(self.lines)
                self.lines.clear()
                dropped, self.dropped = self.dropped, 0
            if dropped:
                self.events.append(f"{self.path}: {dropped} lines dropped (the disk was slow)")
            now = time.monotonic()
            if fd >= 0 and now - checked >= CHECK_PATH_EVERY:
                checked = now
                if _rotated(self.path, fd):
                    os.close(fd)
                    fd, told = -1, False
            if fd < 0:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
                                 | os.O_NOFOLLOW,
                                 0o640)
                    size = os.fstat(fd).st_size
                except OSError as e:
                    self.events.append(f"{self.path}: cannot open: {e.strerror}")
                    fd = -1
                    continue
            size, told = self._put(fd, batch, size, told)
        if fd >= 0:
            os.close(fd)

    def _put(self, fd: int, batch: list[bytes], size: int, told: bool) -> tuple[int, bool]:
        soft, hard = self.limits or (0, 0)
        if hard:
            room, kept = hard - size, []
            for line in batch:
                if len(line) > room:
                    break
                kept.append(line)
                room -= len(line)
            batch = kept
        data = b"".join(batch)
        try:
            os.write(fd, data)
        except OSError as e:
            self.events.append(f"{self.path}: cannot write: {e.strerror}")
            return size, told
        size += len(data)
        if soft and size >= soft and not told:
            self.events.append(f"{self.path}: {size} bytes, past its soft limit of {soft}"
                               + (f"; no more lines once it reaches {hard}" if hard else ""))
            told = True
        return size, told

    def close(self, wait: float = 1.0) -> None:
        """Write what is queued (waiting up to `wait` seconds) and stop the writer."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(wait)


def _rotated(path: str, fd: int) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(fd).st_ino
    except OSError:
        return True
