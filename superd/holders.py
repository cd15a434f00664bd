"""Who holds a port or a unix socket path (for `superd check --bind`), from /proc.

The kernel lists every socket with its inode (/proc/net/tcp, udp, unix...), and each
process's fds point at the inodes they hold (/proc/PID/fd). Only processes this user may look
into can be named; run as root to see them all.
"""

from __future__ import annotations

import os
import socket

from superd.listeners import Address

_TABLES = {("tcp", socket.AF_INET): "tcp", ("tcp", socket.AF_INET6): "tcp6",
           ("udp", socket.AF_INET): "udp", ("udp", socket.AF_INET6): "udp6"}
LISTEN, UNCONNECTED = "0A", "07"


def holders(address: Address, protocol: str) -> list[tuple[int, str]]:
    """(pid, program) of each process holding a socket on `address`."""
    inodes = _unix_inodes(address.path) if address.path else _inet_inodes(address, protocol)
    return _processes(inodes) if inodes else []


def describe(address: Address, protocol: str) -> str:
    """`held by pid 123 (sshd)`, or nothing when /proc does not tell."""
    found = holders(address, protocol)
    if not found:
        return ""
    return "held by " + ", ".join(f"pid {pid} ({name})" for pid, name in found[:5])


def _inet_inodes(address: Address, protocol: str) -> set[int]:
    kind = "tcp" if protocol == "tcp" else "udp"
    state = LISTEN if kind == "tcp" else UNCONNECTED
    out: set[int] = set()
    families = (socket.AF_INET, socket.AF_INET6)  # a dual-stack socket is in tcp6 only
    for family in families:
        try:
            with open(f"/proc/net/{_TABLES[(kind, family)]}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            parts = row.split()
            if len(parts) > 9 and parts[3] == state and \
                    int(parts[1].rsplit(":", 1)[1], 16) == address.port:
                out.add(int(parts[9]))
    return out


def _unix_inodes(path: str) -> set[int]:
    try:
        with open("/proc/net/unix") as f:
            rows = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {int(parts[6]) for parts in (row.split() for row in rows)
            if len(parts) > 7 and parts[7] == path}


def _processes(inodes: set[int]) -> list[tuple[int, str]]:
    wanted = {f"socket:[{i}]" for i in inodes}
    found: list[tuple[int, str]] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{entry}/fd/{fd}") in wanted:
                    with open(f"/proc/{entry}/comm") as f:
                        found.append((int(entry), f.read().strip()))
                    break
            except OSError:
                continue
    return sorted(found)
