"""What superd does when systemd is around: sd_notify, passed sockets, journal fields.

All of it is a no-op without systemd (no NOTIFY_SOCKET, no LISTEN_FDS), so the daemon code can
call these unconditionally.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from systemd import daemon


class Notifier:
    """sd_notify through systemd-python; silent when NOTIFY_SOCKET is not set."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        self.watchdog = (int(usec) / 1e6 if usec.isdigit() and int(usec) > 0
                         and (not pid or pid == str(os.getpid())) else 0.0)

    def notify(self, message: str) -> None:
        """Best effort: a notification lost (e.g. out of fds) must never stop the daemon."""
        if self.enabled:
            for _ in range(3):
                try:
                    daemon.notify(message)
                    return
                except InterruptedError:
                    continue  # a signal arrived mid-send: READY=1 must not be lost to that
                except OSError:
                    return


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
