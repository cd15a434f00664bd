"""Taking work off a listener: connections in batches, datagrams for internal services, and
what superd learns of a peer (its address as logged, the handler's connection variables).

Nothing here decides about a connection: each accepted one becomes a `Connection` and goes to
its service's pipeline (superd/pipeline.py).
"""

from __future__ import annotations

import _socket
import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

from superd.access import Network, allowed, is_unicast
from superd.limits import Limits
from superd.listeners import AF_VSOCK, Listener, plain_ip
from superd.pipeline import Connection
from superd.sockapply import Option

ACCEPT_BATCH = 64  # connections per wake-up per listener; the rest wait for the next turn
DATAGRAM_BATCH = 256
FD_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PEER_GONE = (errno.ECONNABORTED, errno.EPROTO, errno.EPERM)
PROTO = {int(socket.AF_INET): "TCP", int(socket.AF_INET6): "TCP", int(socket.AF_UNIX): "UNIX",
         AF_VSOCK: "VSOCK"}


def accept_connections(listener: Listener, limits: Limits, begin: Callable[[Connection], None],
                       error: Callable[[str], None]) -> None:
    """Accept until EAGAIN, a pause or a batch is done; hand each connection to `begin`."""
    sock = listener.sock
    family, kind = listener.family, listener.kind
    peer = PEERS[family]
    setup = listener.per_connection  # almost always empty: the kernel copies the rest
    for _ in range(ACCEPT_BATCH):
        if limits.paused:
            return
        try:
            # The C-level accept and socket type: socket.accept() spends twice the
            # syscall's time building a Python socket object we do not need.
            fd, addr = sock._accept()  # type: ignore[attr-defined]
            conn = _socket.socket(family, kind, 0, fd)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno in FD_ERRORS:
                limits.out_of_fds(e)
            elif e.errno not in PEER_GONE:
                error(f"{limits.config.name}: accept on {listener}: {e.strerror}")
            return
        if limits.fd_backoff:
            limits.accepted_ok()
        if setup:
            _set_up(conn, setup)  # type: ignore[arg-type]
        begin(Connection(conn, addr, peer(conn, addr), listener))  # type: ignore[arg-type]


def _set_up(conn: socket.socket, options: tuple[Option, ...]) -> None:
    """The listener's options the kernel does not copy to an accepted connection."""
    for level, option, value in options:
        try:
            conn.setsockopt(level, option, value)
        except OSError:
            pass  # the connection is served all the same, as it would be without the option


def answer_datagrams(listener: Listener, answer: Callable[[bytes], bytes | None],
                     only_from: tuple[Network, ...], no_access: tuple[Network, ...]) -> None:
    """Answer queued datagrams until the socket is empty (or a batch is done).

    The hot loop of UDP echo: names are bound to locals and the common case (no access
    rules, an unprivileged unicast source) costs no function call.
    """
    recvfrom, sendto = listener.sock.recvfrom, listener.sock.sendto
    checked = bool(only_from or no_access) or listener.family == socket.AF_UNIX
    for _ in range(DATAGRAM_BATCH):
        try:
            data, addr = recvfrom(65536)
        except OSError:
            return  # EAGAIN: drained
        if checked:
            if not datagram_allowed(addr, only_from, no_access):
                continue
        elif addr[1] < 1024 or not is_unicast(addr[0]):
            continue
        reply = answer(data)
        if reply is not None:
            try:
                sendto(reply, addr)
            except OSError:
                pass


def datagram_allowed(addr: object, only_from: tuple[Network, ...],
                     no_access: tuple[Network, ...]) -> bool:
    """Internal datagram services: no privileged source ports, no broadcast, the ACL."""
    if not isinstance(addr, tuple):
        return bool(addr)  # a unix datagram peer; an unbound one cannot be answered
    ip, port = addr[0], addr[1]
    return port >= 1024 and is_unicast(ip) and allowed(ip, only_from, no_access)


def drop_datagram(sock: socket.socket) -> None:
    try:
        sock.recv(1)
    except OSError:
        pass


# -- what superd knows of a peer -------------------------------------------------------------

def peer_of(conn: socket.socket, addr: object) -> str:
    """The peer as logged and limited: its IP (IPv4-mapped shown as IPv4), uid:N on a unix
    socket, cid:N on vsock (the CID names the virtual machine)."""
    return PEERS[int(conn.family)](conn, addr)


def _ip_peer(conn: socket.socket, addr: tuple[str, int]) -> str:
    return plain_ip(addr[0])


def _unix_peer(conn: socket.socket, addr: object) -> str:
    pid, uid, gid = _peercred(conn)
    return f"uid:{uid}"


def _vsock_peer(conn: socket.socket, addr: tuple[int, int]) -> str:
    return f"cid:{addr[0]}"


PEERS: dict[int, Callable[[socket.socket, Any], str]] = {
    int(socket.AF_INET): _ip_peer, int(socket.AF_INET6): _ip_peer,
    int(socket.AF_UNIX): _unix_peer, AF_VSOCK: _vsock_peer}


def _peercred(conn: socket.socket) -> tuple[int, int, int]:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))


def handler_env(conn: Connection) -> dict[str, str]:
    """The connection's part of the handler environment (SPEC §3), and what stages added."""
    addr, sock = conn.addr, conn.sock
    family = conn.listener.family
    if family == socket.AF_UNIX:
        pid, uid, gid = _peercred(sock)
        env = {"PROTO": "UNIX", "UNIXREMOTEEUID": str(uid), "UNIXREMOTEEGID": str(gid),
               "UNIXREMOTEPID": str(pid)}
    elif family == AF_VSOCK:
        env = _vsock_env(addr, sock)  # type: ignore[arg-type]
    else:
        local = conn.listener.address
        if local is not None and local.host not in ("0.0.0.0", "::"):
            lip, lport = local.host, local.port
        else:
            lip, lport = sock.getsockname()[:2]
            lip = plain_ip(lip)
        env = _ip_env("TCP", conn.peer, addr[1], lip, lport)  # type: ignore[index]
    if conn.env:
        env.update(conn.env)
    return env


def _vsock_env(addr: tuple[int, int], sock: socket.socket) -> dict[str, str]:
    """tcpserver's naming for vsock (PROTO=VSOCK, VSOCKREMOTECID...), and systemd's
    REMOTE_ADDR=vsock:CID and REMOTE_PORT."""
    cid, port = str(addr[0]), str(addr[1])
    lcid, lport = (str(x) for x in sock.getsockname()[:2])
    return {"PROTO": "VSOCK", "VSOCKREMOTECID": cid, "VSOCKREMOTEPORT": port,
            "VSOCKLOCALCID": lcid, "VSOCKLOCALPORT": lport, "REMOTE_ADDR": f"vsock:{cid}",
            "REMOTE_PORT": port}


def _ip_env(proto: str, ip: str, port: int, lip: str, lport: int) -> dict[str, str]:
    p, lp = str(port), str(lport)
    return {"PROTO": proto, "TCPREMOTEIP": ip, "TCPREMOTEPORT": p, "TCPLOCALIP": lip,
            "TCPLOCALPORT": lp, "REMOTE_ADDR": ip, "REMOTE_PORT": p, "REMOTE_HOST": ip}


def wait_peer_env(listener: Listener) -> tuple[str, dict[str, str]]:
    """For a wait handler: the sender of the first queued datagram, if any (MSG_PEEK)."""
    sock = listener.sock
    proto = "UDP" if listener.family in (socket.AF_INET, socket.AF_INET6) and \
        not listener.stream else PROTO[listener.family]
    if listener.stream or listener.family not in (socket.AF_INET, socket.AF_INET6):
        return "", {"PROTO": proto}
    try:
        _, addr = sock.recvfrom(1, socket.MSG_PEEK)
    except OSError:
        return "", {"PROTO": proto}
    ip = plain_ip(addr[0])
    lip, lport = sock.getsockname()[:2]
    return ip, _ip_env(proto, ip, addr[1], plain_ip(lip), lport)
