"""The event loop: one selector, a timer heap, and signals delivered through a wakeup fd.

Nothing here knows what a service is. Signal handlers do nothing at all: `signal.set_wakeup_fd`
already writes each signal's number into a pipe that the selector watches, so signals are read
and dispatched in the loop like any other event (gunicorn's Arbiter, without the extra queue).
When idle, the loop sleeps in the selector with no timeout unless a timer is due: no periodic
wake-ups.

The last-resort guard is here too: an exception that escapes a callback is handed to
`on_error` (which logs it) and the loop carries on with the next event. One connection or one
service may fail that way; the daemon does not. An fd whose callback keeps failing is no longer
watched, so a broken callback cannot spin the loop.
"""

from __future__ import annotations

import heapq
import itertools
import os
import selectors
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable

READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE
IDLE_AT_LATEST = 0.1  # `when_idle` callbacks run at the latest this long after being asked for
SPIN_FAILURES, SPIN_WINDOW = 50, 1.0  # a callback failing this often this fast is unwatched


def _ignore(signum: int, frame: object) -> None:
    """The wakeup fd has already recorded the signal; nothing else to do here."""


class Timer:
    """A pending call; `cancel()` makes it a no-op (lazy removal from the heap)."""

    __slots__ = ("when", "callback", "cancelled", "loop")

    def __init__(self, when: float, callback: Callable[[], None], loop: Loop):
        self.when, self.callback, self.cancelled, self.loop = when, callback, False, loop

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.loop.timer_cancelled()


ErrorHandler = Callable[[BaseException, str], None]
FileObject = int | socket.socket  # what the selector watches: an fd or a socket


def _stderr_error(exc: BaseException, where: str) -> None:
    print(f"superd: internal error in {where}; carrying on", file=sys.stderr)
    traceback.print_exception(exc)


class Loop:
    def __init__(self, on_signal: Callable[[int], None], signals: tuple[int, ...],
                 on_error: ErrorHandler = _stderr_error):
        self.selector = selectors.DefaultSelector()
        self.on_error = on_error
        self.failures: dict[object, tuple[int, float]] = {}
        self.timers: list[tuple[float, int, Timer]] = []
        self.cancelled = 0  # cancelled timers still in the heap (roughly)
        self.seq = itertools.count()
        self.on_signal = on_signal
        self.idle: list[Callable[[], None]] = []
        self.idle_asked = 0.0
        self.signals = signals
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self.wake_r, READ, self._read_signals)
        for sig in signals:
            signal.signal(sig, _ignore)
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)

    # -- file descriptors -------------------------------------------------------------------

    def add(self, fileobj: FileObject, events: int, callback: Callable[[int], None]) -> None:
        self.selector.register(fileobj, events, callback)

    def modify(self, fileobj: FileObject, events: int, callback: Callable[[int], None]) -> None:
        self.selector.modify(fileobj, events, callback)

    def remove(self, fileobj: FileObject) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def watching(self, fileobj: FileObject) -> bool:
        try:
            self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            return False
        return True

    # -- timers -----------------------------------------------------------------------------

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + delay, callback, self)
        heapq.heappush(self.timers, (timer.when, next(self.seq), timer))
        return timer

    def when_idle(self, callback: Callable[[], None]) -> None:
        """Call `callback` once nothing else is ready (before the loop sleeps), so that work
        of a busy stretch is done in one go; under endless load, within IDLE_AT_LATEST."""
        if not self.idle:
            self.idle_asked = time.monotonic()
        self.idle.append(callback)

    def timer_cancelled(self) -> None:
        """Cancelled timers wait in the heap until due; with long timeouts and many short
        connections they would pile up, so drop them once they are most of the heap."""
        self.cancelled += 1
        if self.cancelled > 256 and self.cancelled * 2 > len(self.timers):
            self.timers = [entry for entry in self.timers if not entry[2].cancelled]
            heapq.heapify(self.timers)
            self.cancelled = 0

    # -- running ----------------------------------------------------------------------------

    def run_once(self) -> None:
        """Wait for the next event or due timer, and dispatch everything that is ready."""
        timeout = None
        while self.timers and self.timers[0][2].cancelled:
            heapq.heappop(self.timers)
            self.cancelled = max(0, self.cancelled - 1)
        if self.timers:
            timeout = max(0.0, self.timers[0][0] - time.monotonic())
        if self.idle:
            events = self.selector.select(0)
            if not events or time.monotonic() - self.idle_asked >= IDLE_AT_LATEST:
                idle, self.idle = self.idle, []
                for callback in idle:
                    try:
                        callback()
                    except Exception as e:
                        self.failed(None, callback, e)
                if not events:
                    events = self.selector.select(timeout)
        else:
            events = self.selector.select(timeout)
        for key, mask in events:
            try:
                key.data(mask)
            except Exception as e:  # the guard: costs nothing until something raises
                self.failed(key.fileobj, key.data, e)
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            timer = heapq.heappop(self.timers)[2]
            if not timer.cancelled:
                try:
                    timer.callback()
                except Exception as e:
                    self.failed(None, timer.callback, e)

    def failed(self, fileobj: object, callback: object, exc: Exception) -> None:
        """A callback raised: report it and carry on; stop watching an fd that keeps failing."""
        where = getattr(callback, "__qualname__", None) or type(callback).__name__
        try:
            self.on_error(exc, where)
        except Exception as e:  # reporting failed too (out of fds?): stderr, and carry on
            _stderr_error(exc, where)
            _stderr_error(e, "the error report")
        if fileobj is None:
            return
        now = time.monotonic()
        if len(self.failures) > 1000:
            self.failures.clear()
        count, since = self.failures.get(fileobj, (0, now))
        if now - since > SPIN_WINDOW:
            count, since = 0, now
        self.failures[fileobj] = (count + 1, since)
        if count + 1 >= SPIN_FAILURES:
            del self.failures[fileobj]
            self.remove(fileobj)  # type: ignore[arg-type]
            self.on_error(RuntimeError(f"{where} failed {SPIN_FAILURES} times within "
                                       f"{SPIN_WINDOW:g}s: no longer watching its fd"), where)

    def _read_signals(self, mask: int) -> None:
        for signum in self.caught():
            self.on_signal(signum)

    def caught(self) -> bytes:
        """The signals caught since the last look (each as its number), taken off the wakeup
        pipe: superd upgrade deals with them before it execs, which drops the pipe."""
        data = b""
        for _ in range(64):
            try:
                chunk = os.read(self.wake_r, 512)
            except BlockingIOError:
                break
            data += chunk
            if len(chunk) < 512:
                break
        return data

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for sig in self.signals:
            signal.signal(sig, signal.SIG_DFL)
        self.selector.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
