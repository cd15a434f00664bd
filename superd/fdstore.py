"""Listening sockets kept in systemd's fd store, so that `systemctl restart` refuses nothing.

Under systemd, superd hands a copy of every socket it bound itself to systemd (FDSTORE=1,
FDNAME=a key of what it is bound to). While the unit is not fully stopped (a restart, a crash
followed by Restart=) systemd keeps those copies open: the kernel goes on queueing connections
and datagrams on them while no superd runs, and passes them to the next superd with
LISTEN_FDS/LISTEN_FDNAMES, which uses each for the service whose address it is bound to
(superd/binding.py, as after `superd upgrade`) instead of binding anew. A socket superd closes
for good (a reload dropped its address) is taken out again (FDSTOREREMOVE=1), or its port
would stay bound inside systemd.

Not stored: sockets systemd passed from a .socket unit (it keeps those anyway) and sockets on a
unix path (superd removes the file when it stops; a stored copy would be unreachable).
Only under systemd itself (INVOCATION_ID set, as systemd does for every unit; a NOTIFY_SOCKET
alone may be anyone's). It needs FileDescriptorStoreMax= above 0 in the unit (the shipped one
has it); without, systemd drops what it is sent and a restart binds anew, as before.
"""

from __future__ import annotations

import hashlib
import re
import socket
from collections.abc import Callable, Iterable

from superd.listeners import Listener, sock_ident

PREFIX = "superd-fdstore-"
STORED_NAME = re.compile(r"^superd-fdstore-[0-9a-f]{20}$")

Notify = Callable[[str, "list[int] | None"], None]


def is_stored(name: str) -> bool:
    """Is a LISTEN_FDNAMES name one of superd's own stored sockets (not a .socket unit's)?"""
    return bool(STORED_NAME.match(name))


def key(sock: socket.socket) -> str:
    """FDNAME= for a socket: stable for what it is bound to, unique per address, and made of
    characters systemd accepts there (no ':', which an IPv6 address has)."""
    return PREFIX + hashlib.sha256(sock_ident(sock).encode()).hexdigest()[:20]


def storable(listener: Listener) -> bool:
    return not listener.passed and listener.address is not None and not listener.address.file


class FdStore:
    """What superd told systemd to keep, by FDNAME."""

    def __init__(self, notify: Notify, enabled: bool):
        self.notify, self.enabled = notify, enabled
        self.stored: set[str] = set()

    def sync(self, listeners: Iterable[Listener]) -> None:
        """Store each of `listeners` not stored yet (systemd ignores a socket it already has,
        so after an upgrade, which forgets this set, sending again is harmless)."""
        if not self.enabled:
            return
        for listener in listeners:
            if not storable(listener):
                continue
            try:
                name = key(listener.sock)
            except OSError:
                continue
            if name not in self.stored:
                self.stored.add(name)
                self.notify(f"FDSTORE=1\nFDNAME={name}", [listener.sock.fileno()])

    def forget(self, sock: socket.socket) -> None:
        """`sock` is about to be closed for good: systemd lets go of its copy too."""
        if not self.enabled:
            return
        try:
            name = key(sock)
        except OSError:
            return
        self.stored.discard(name)
        self.notify(f"FDSTOREREMOVE=1\nFDNAME={name}", None)
