"""Syslog output in xinetd's per-connection layout, with a stderr fallback (SPEC §5).

We speak the syslog datagram protocol ourselves instead of using the `syslog` module, because
that module always writes to /dev/log and the address must be configurable, and instead of
`logging.handlers.SysLogHandler`, because a missing socket must not print a traceback per line:
it must say so once, use stderr, and quietly go back to syslog when the socket appears.

Every message is one record on one line, whatever it holds (a handler's stderr, a peer, a path
from the table, an error from the OS): `clean()` escapes control characters as rsyslog does
(`#` and three octal digits per byte: NUL is `#000`, ESC `#033`, a newline `#012`) and cuts a
message longer than MAX_MESSAGE bytes, ending it with CUT. So no message can hold a record
separator: on a datagram socket a record is a datagram; on a stream socket (rsyslog's imptcp,
syslog-ng's unix-stream) each record ends with a newline, which both read as the end of a
record (syslog-ng also ends one at a NUL, glibc's separator, which rsyslog does not).
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
import syslog as _syslog
import time
from collections import deque
from collections.abc import Callable

from superd.config import ServiceLog, Settings
from superd.logfile import LogFile
from superd.loop import WRITE, Loop

ERR, WARNING, INFO = _syslog.LOG_ERR, _syslog.LOG_WARNING, _syslog.LOG_INFO
RETRY_SECONDS = 1.0
MAX_BACKLOG = 10_000  # lines held while syslogd is slow; beyond, lines are counted and dropped
FLUSH_AT = 256  # lines gathered before a flush even while the loop is still busy
JOURNALD_SYSLOG = "/run/systemd/journal/dev-log"  # where /dev/log points when journald owns it
MAX_MESSAGE = 4096  # bytes of a message, escaped; rsyslog takes 8 KiB records by default
CUT = " [cut]"  # ends a message that was longer
# C0 controls, DEL, C1 controls, and the Unicode line and paragraph separators
CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean(text: str) -> str:
    """`text` as one printable line of at most MAX_MESSAGE bytes (see the module's doc)."""
    if not text.isprintable():  # the fast test: True for almost every line
        text = CONTROL.sub(_octal, text)
    if len(text) > MAX_MESSAGE // 4:  # at most 4 bytes a character: shorter ones fit
        data = text.encode("utf-8", "replace")
        if len(data) > MAX_MESSAGE:
            text = data[:MAX_MESSAGE - len(CUT)].decode("utf-8", "ignore") + CUT
    return text


def _octal(match: re.Match[str]) -> str:
    return "".join(f"#{byte:03o}" for byte in match.group().encode())


def facility_code(name: str) -> int:
    return int(getattr(_syslog, f"LOG_{name.upper()}"))


LEVELS = {"emerg": 0, "alert": 1, "crit": 2, "err": 3, "warning": 4, "notice": 5, "info": 6,
          "debug": 7}


class Route:
    """Where one service's lines go instead (syslog_facility, syslog_level, log_file)."""

    def __init__(self, spec: ServiceLog, file: LogFile | None):
        self.facility = facility_code(spec.facility) if spec.facility else None
        self.severity = LEVELS[spec.level] if spec.level else None
        self.file = file


class Log:
    """Write one line per event to the syslog socket, or to stderr while it is missing."""

    def __init__(self, settings: Settings | None = None):
        self.sock: socket.socket | None = None
        self.down_since: float | None = None
        self.next_try = 0.0
        self.stamp_second = -1
        self.stamp = ""
        self.journal: Callable[..., None] | None = None  # set by superd.systemd under systemd
        self.loop: Loop | None = None
        self.backlog: deque[bytes] = deque()
        self.pending: list[bytes] = []  # lines of this loop turn, sent when the loop is idle
        self.dropped = 0
        self.terminator = b""
        self.routes: dict[str, Route] = {}  # service name -> its own log target
        self.files: dict[str, LogFile] = {}
        self.configure(settings or Settings())

    def configure(self, settings: Settings, routes: tuple[ServiceLog, ...] = ()) -> None:
        """Take (new) syslog settings and the services' own targets (Table.service_logs);
        reconnect if the address changed."""
        address = settings.syslog_address
        if getattr(self, "address", None) != address and self.sock:
            self._leave()
        self.address = address
        self.journal_owns_syslog = os.path.realpath(address) == JOURNALD_SYSLOG
        self.facility = facility_code(settings.syslog_facility)
        self.ident = clean(settings.syslog_ident)
        self.pid = os.getpid()
        self._route(routes)

    def _route(self, specs: tuple[ServiceLog, ...]) -> None:
        """Each service's own target; log files are kept open across reloads."""
        files: dict[str, LogFile] = {}
        for spec in specs:
            if spec.file and spec.file not in files:  # services may share one file
                old = self.files.pop(spec.file, None)
                files[spec.file] = old if old is not None and old.limits == spec.limits \
                    else LogFile(spec.file, spec.limits, self.warning)
                if old is not None and files[spec.file] is not old:
                    old.close()
        for old in self.files.values():
            old.close()
        self.files = files
        self.routes = {spec.service: Route(spec, files.get(spec.file)) for spec in specs}

    def info(self, message: str, **fields: str) -> None:
        self.emit(INFO, message, fields)

    def warning(self, message: str, **fields: str) -> None:
        self.emit(WARNING, message, fields)

    def error(self, message: str, **fields: str) -> None:
        self.emit(ERR, message, fields)

    def emit(self, severity: int, message: str, fields: dict[str, str]) -> None:
        message = clean(message)
        facility = self.facility
        if self.routes:
            route = self.routes.get(fields.get("SUPERD_SERVICE", ""))
            if route is not None:
                if route.file is not None:
                    route.file.write(message)
                    return
                facility = route.facility if route.facility is not None else facility
                severity = route.severity if route.severity is not None else severity
        now = time.time()
        second = int(now)
        if second != self.stamp_second:
            self.stamp_second = second
            self.stamp = time.strftime("%b %e %H:%M:%S", time.localtime(now))
        if self.journal is not None and self.journal_owns_syslog:
            # /dev/log is journald: say it once, with the facility (the service's own, or the
            # settings') and ident, which journald hands on to a syslog daemon behind it.
            self._to_journal(message, severity, facility, fields)
            return
        if self.sock is None and time.monotonic() >= self.next_try:
            self._connect()
        if self.sock is not None:  # on failure _send itself writes the line to stderr
            packet = f"<{facility | severity}>{self.stamp} {self.ident}[{self.pid}]: {message}"
            self._send(packet.encode("utf-8", "replace") + self.terminator)
        else:
            sys.stderr.write(f"{self.stamp} {self.ident}[{self.pid}]: {message}\n")
            sys.stderr.flush()
        if self.journal is not None:
            self._to_journal(message, severity, facility, fields)

    def _to_journal(self, message: str, severity: int, facility: int,
                    fields: dict[str, str]) -> None:
        try:
            self.journal(message, severity, facility, self.ident,  # type: ignore[misc]
                         fields)
        except OSError as e:  # out of fds, journald gone: the line goes to stderr instead
            sys.stderr.write(f"{self.ident}[{self.pid}]: {message} (journal: {e.strerror})\n")

    def attach(self, loop: Loop) -> None:
        """From now on never block the loop: queue what syslogd cannot take yet."""
        self.loop = loop

    def _send(self, data: bytes) -> None:
        if self.backlog:
            self._queue(data)
            return
        if self.loop is not None:
            self.pending.append(data)
            if len(self.pending) == 1:
                self.loop.when_idle(self.flush)
            elif len(self.pending) >= FLUSH_AT:
                self.flush()
            return
        try:
            self.sock.send(data, socket.MSG_DONTWAIT if self.loop else 0)  # type: ignore[union-attr]
        except BlockingIOError:
            self._queue(data)
        except OSError as e:
            self._lost(e)
            _to_stderr([data])

    def flush(self) -> None:
        """Send the lines gathered while the loop was busy, one datagram each.

        Sending them together instead of one by one as they happen is what makes logging
        cheap: syslogd is woken once for the lot, not once per line (on a VM each wake-up of a
        reader on another CPU costs an interrupt and an exit to the hypervisor; per line that
        was a third of superd's time on internal echo).
        """
        pending, self.pending = self.pending, []
        if self.sock is None and time.monotonic() >= self.next_try:
            self._connect()  # syslogd was away: see whether it is back
        for i, data in enumerate(pending):
            if self.sock is None:  # lost (now or before): the rest goes where emit() sends it
                _to_stderr(pending[i:])
                return
            if self.backlog:
                self._queue(data)
                continue
            try:
                self.sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._queue(data)
            except OSError as e:
                self._lost(e)
                _to_stderr([data])

    def _queue(self, data: bytes) -> None:
        """syslogd is behind: keep up to MAX_BACKLOG lines, count what is dropped beyond."""
        if len(self.backlog) >= MAX_BACKLOG:
            self.dropped += 1
            return
        self.backlog.append(data)
        if len(self.backlog) == 1 and self.loop is not None and self.sock is not None:
            self.loop.add(self.sock, WRITE, self._writable)

    def _writable(self, mask: int) -> None:
        while self.backlog and self.sock is not None:
            try:
                self.sock.send(self.backlog[0], socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(e)
                return
            self.backlog.popleft()
        if self.sock is not None and self.loop is not None:
            self.loop.remove(self.sock)
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            self.warning(f"syslog could not keep up: {dropped} log lines dropped")

    def _connect(self) -> None:
        for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
            try:
                sock = socket.socket(socket.AF_UNIX, kind)
            except OSError as e:  # out of fds: stderr until the next try
                self._lost(e)
                return
            try:
                sock.connect(self.address)
            except OSError as e:
                sock.close()
                if e.errno == errno.EPROTOTYPE and kind == socket.SOCK_DGRAM:  # a stream syslogd
                    continue
                self._lost(e)
                return
            self.sock = sock
            self.terminator = b"\n" if kind == socket.SOCK_STREAM else b""
            if self.down_since is not None:
                self.down_since = None
                sys.stderr.write(f"superd: syslog socket {self.address} is back; logging there\n")
            return

    def _leave(self) -> None:
        """The address changes (reload): what is gathered or queued for the old syslogd goes
        there now, or to stderr; never to the new one ahead of lines logged before."""
        self._hand_over(0.0)
        self.next_try = 0.0

    def _hand_over(self, wait: float) -> None:
        """Send what is gathered or queued to the current socket, waiting up to `wait` seconds
        a line (0: not at all), the rest to stderr; then close the socket."""
        if self.pending:
            self.flush()
        if self.sock is not None:
            if self.loop is not None:
                self.loop.remove(self.sock)
            self.sock.settimeout(wait)
            try:
                while self.backlog:
                    self.sock.send(self.backlog[0])
                    self.backlog.popleft()
            except OSError:
                pass
            self.sock.close()
            self.sock = None
        _to_stderr(list(self.backlog))
        self.backlog.clear()

    def _lost(self, error: OSError) -> None:
        if self.sock is not None:
            if self.loop is not None:
                self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
        _to_stderr(list(self.backlog))  # older than anything still to come: stderr keeps order
        self.backlog.clear()
        self.next_try = time.monotonic() + RETRY_SECONDS
        if self.down_since is None:
            self.down_since = time.monotonic()
            sys.stderr.write(f"superd: syslog socket {self.address} unavailable "
                             f"({error.strerror}); logging to stderr until it is back\n")

    def close(self) -> None:
        """Flush what is queued (waiting a little, the loop is over) and close."""
        self._hand_over(1.0)
        self.loop = None
        for file in self.files.values():
            file.close()


def _to_stderr(packets: list[bytes]) -> None:
    """Syslog packets as emit() writes lines to stderr: without the <priority>."""
    if packets:
        for data in packets:
            sys.stderr.write(data.decode("utf-8", "replace").split(">", 1)[-1].rstrip("\n")
                             + "\n")
        sys.stderr.flush()
