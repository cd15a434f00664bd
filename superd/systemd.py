"""What superd does when systemd is around: sd_notify, passed sockets, journal fields.

All of it is a no-op without systemd (no NOTIFY_SOCKET, no LISTEN_FDS), so the daemon code can
call these unconditionally.
"""

from __future__ import annotations

import array
import os
import socket
from collections.abc import Callable

from systemd import daemon

NOTIFY_RETRY = 0.5  # seconds between tries while systemd does not read its socket
NOTIFY_QUEUE = 32  # notifications kept meanwhile; the oldest go first beyond
FD_STORE = ("FDSTORE=", "FDSTOREREMOVE=")  # never dropped from the queue (see Notifier._trim)
LATEST_ONLY = ("STATUS=", "WATCHDOG=")  # a newer one of these makes an older one moot

Later = Callable[[float, Callable[[], None]], object]


class Notifier:
    """sd_notify that never blocks the loop; silent when NOTIFY_SOCKET is not set.

    sd_notify(3) sends blocking: when systemd (PID 1, busy or stuck) lets its socket queue fill
    up, the next send would hang the whole daemon, SIGTERM included. Here a notification that
    does not fit waits in a short queue and is tried again every NOTIFY_RETRY seconds (through
    `later`, the loop's call_later); a newer STATUS= or WATCHDOG= replaces a waiting one.
    Addresses other than unix paths and @abstract names go through libsystemd as before.
    A notification may carry fds (FDSTORE=1): it holds copies of them until it is sent or
    dropped, so the caller may close its own at once.
    """

    def __init__(self, later: Later) -> None:
        self.later = later
        address = os.environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(address)
        self.address = ""  # a unix address superd sends to itself; "" = through libsystemd
        self.sock: socket.socket | None = None
        if address[:1] in ("/", "@"):
            self.address = "\0" + address[1:] if address[0] == "@" else address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.sock.setblocking(False)
        self.pending: list[tuple[str, list[int]]] = []
        self.retrying = False
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog = (int(usec) / 1e6 if usec.isdigit() and int(usec) > 0
                         and (not pid or pid == str(os.getpid())) else 0.0)

    def notify(self, message: str, fds: list[int] | None = None) -> None:
        """Best effort: a notification lost (e.g. out of fds) must never stop the daemon."""
        if not self.enabled:
            return
        if message.startswith(LATEST_ONLY):
            kind = message.split("=", 1)[0] + "="
            self.pending = [m for m in self.pending if not m[0].startswith(kind)]
        try:
            copies = [os.dup(fd) for fd in fds or []]
        except OSError:
            return
        self.pending.append((message, copies))
        self._trim()
        if not self.retrying:
            self.flush()

    def _trim(self) -> None:
        """Beyond NOTIFY_QUEUE waiting, the oldest go, but never one of the fd store's: a lost
        FDSTORE=1 is a socket a restart then binds anew, a lost FDSTOREREMOVE=1 a port systemd
        holds for good. (There are at most as many of those as listeners, FdStore sees to it.)"""
        extra = len(self.pending) - NOTIFY_QUEUE
        if extra <= 0:
            return
        kept: list[tuple[str, list[int]]] = []
        for message, fds in self.pending:
            if extra > 0 and not message.startswith(FD_STORE):
                _close(fds)
                extra -= 1
            else:
                kept.append((message, fds))
        self.pending = kept

    def flush(self) -> None:
        """Send what waits, in order, until the socket is full again."""
        self.retrying = False
        while self.pending:
            if not self._send(*self.pending[0]):
                if not self.retrying:
                    self.retrying = True
                    self.later(NOTIFY_RETRY, self.flush)
                return
            _close(self.pending.pop(0)[1])

    def _send(self, message: str, fds: list[int]) -> bool:
        """True when sent or beyond hope (dropped); False when it should wait."""
        if self.sock is None:
            try:
                daemon.notify(message, fds=fds or None)
            except (OSError, ValueError):
                pass
            return True
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        for _ in range(3):
            try:
                # sendmsg to, not connect: systemd binds its socket anew on daemon-reexec
                self.sock.sendmsg([message.encode()], rights, 0, self.address)
                return True
            except InterruptedError:
                continue
            except BlockingIOError:
                return False
            except OSError:
                return True  # e.g. ENOENT, ECONNREFUSED: nobody there to tell
        return True


def _close(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def passed_sockets() -> dict[str, list[socket.socket]]:
    """Sockets from socket activation, by FileDescriptorName= (LISTEN_FDS, LISTEN_FDNAMES)."""
    fds = daemon.listen_fds(unset_environment=True)
    names = os.environ.pop("LISTEN_FDNAMES", "").split(":")
    out: dict[str, list[socket.socket]] = {}
    for i, fd in enumerate(fds):
        name = names[i] if i < len(names) and names[i] else "unknown"
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        out.setdefault(name, []).append(sock)
    return out


JournalSender = Callable[[str, int, int, str, dict[str, str]], None]


def journal_sender() -> JournalSender | None:
    """A function that sends a record with fields to the journal, or None outside systemd.

    It is called as send(message, priority, facility, ident, fields), `facility` being the
    syslog code (LOG_DAEMON...). The record carries SYSLOG_FACILITY and SYSLOG_IDENTIFIER from
    settings.syslog: without them journald files it as `user` and under the name `superd`
    when it forwards it to rsyslog, whatever the table says.
    """
    if not os.environ.get("JOURNAL_STREAM") and not os.environ.get("INVOCATION_ID"):
        return None
    try:
        from systemd import journal
    except ImportError:
        return None

    def send(message: str, priority: int, facility: int, ident: str,
             fields: dict[str, str]) -> None:
        extra = {k: v for k, v in fields.items() if v}
        journal.send(message, PRIORITY=str(priority), SYSLOG_FACILITY=str(facility >> 3),
                     SYSLOG_IDENTIFIER=ident, **extra)
    return send
