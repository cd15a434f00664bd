"""Syslog output in xinetd's per-connection layout, with a stderr fallback (SPEC §5).

We speak the syslog datagram protocol ourselves instead of using the `syslog` module, because
that module always writes to /dev/log and the address must be configurable, and instead of
`logging.handlers.SysLogHandler`, because a missing socket must not print a traceback per line:
it must say so once, use stderr, and quietly go back to syslog when the socket appears.
"""

from __future__ import annotations

import os
import socket
import sys
import syslog as _syslog
import time
from collections.abc import Callable

from superd.config import Settings

ERR, WARNING, INFO = _syslog.LOG_ERR, _syslog.LOG_WARNING, _syslog.LOG_INFO
RETRY_SECONDS = 1.0
JOURNALD_SYSLOG = "/run/systemd/journal/dev-log"  # where /dev/log points when journald owns it


def facility_code(name: str) -> int:
    return getattr(_syslog, f"LOG_{name.upper()}")


class Log:
    """Write one line per event to the syslog socket, or to stderr while it is missing."""

    def __init__(self, settings: Settings | None = None):
        self.sock: socket.socket | None = None
        self.down_since: float | None = None
        self.next_try = 0.0
        self.stamp_second = -1
        self.stamp = ""
        self.journal: Callable[..., None] | None = None  # set by superd.systemd under systemd
        self.configure(settings or Settings())

    def configure(self, settings: Settings) -> None:
        """Take (new) syslog settings; reconnect if the address changed."""
        address = settings.syslog_address
        if getattr(self, "address", None) != address and self.sock:
            self.sock.close()
            self.sock = None
            self.next_try = 0.0
        self.address = address
        self.journal_owns_syslog = os.path.realpath(address) == JOURNALD_SYSLOG
        self.facility = facility_code(settings.syslog_facility)
        self.ident = settings.syslog_ident
        self.pid = os.getpid()

    def info(self, message: str, **fields: str) -> None:
        self.emit(INFO, message, fields)

    def warning(self, message: str, **fields: str) -> None:
        self.emit(WARNING, message, fields)

    def error(self, message: str, **fields: str) -> None:
        self.emit(ERR, message, fields)

    def emit(self, severity: int, message: str, fields: dict[str, str]) -> None:
        now = time.time()
        second = int(now)
        if second != self.stamp_second:
            self.stamp_second = second
            self.stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        if self.journal is not None and self.journal_owns_syslog:
            self.journal(message, severity, fields)  # /dev/log is journald: say it once
            return
        if self.sock is None and time.monotonic() >= self.next_try:
            self._connect()
        if self.sock is not None:
            packet = f"<{self.facility | severity}>{self.stamp} {self.ident}[{self.pid}]: {message}"
            try:
                self.sock.send(packet.encode("utf-8", "replace"))
            except OSError as e:
                self._lost(e)
        if self.sock is None:
            sys.stderr.write(f"{self.stamp} {self.ident}[{self.pid}]: {message}\n")
            sys.stderr.flush()
        if self.journal is not None:
            self.journal(message, severity, fields)

    def _connect(self) -> None:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            sock = socket.socket(socket.AF_UNIX, kind)
            try:
                sock.connect(self.address)
            except OSError as e:
                sock.close()
                if e.errno == 91 and kind == socket.SOCK_DGRAM:  # EPROTOTYPE: a stream syslogd
                    continue
                self._lost(e)
                return
            self.sock = sock
            if self.down_since is not None:
                self.down_since = None
                sys.stderr.write(f"superd: syslog socket {self.address} is back; logging there\n")
            return

    def _lost(self, error: OSError) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.next_try = time.monotonic() + RETRY_SECONDS
        if self.down_since is None:
            self.down_since = time.monotonic()
            sys.stderr.write(f"superd: syslog socket {self.address} unavailable "
                             f"({error.strerror}); logging to stderr until it is back\n")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
