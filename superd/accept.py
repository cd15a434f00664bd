"""Taking work off a listener: connections in batches, datagrams for internal services, and
what superd learns of a peer (its address as logged, the handler's connection variables).

Nothing here decides about a connection: each accepted one becomes a `Connection` and goes to
its service's pipeline (superd/pipeline.py).
"""

from __future__ import annotations

import _socket
import errno
import os
import select
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from superd.access import Network, allowed, is_unicast
from superd.limits import Limits
from superd.listeners import AF_VSOCK, Listener, plain_ip
from superd.pipeline import Connection
from superd.processes import Handler
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
                     only_from: tuple[Network, ...], no_access: tuple[Network, ...],
                     own_ports: frozenset[int], limits: Limits) -> tuple[int, int]:
    """Answer queued datagrams until the socket is empty, a batch is done or `rate` pauses
    the service; return how many were answered and how many dropped.

    Never answered: privileged source ports (another server's echo), the ports of superd's
    own datagram listeners (one spoofed datagram would start echo and chargen answering each
    other for ever: FreeBSD inetd's check_loop), broadcast and multicast sources, and
    sources the access rules refuse. The hot loop of UDP echo: names are bound to locals.
    """
    recvfrom, sendto = listener.sock.recvfrom, listener.sock.sendto
    checked = bool(only_from or no_access)
    rate = limits.config.rate is not None
    answered = dropped = 0
    for _ in range(DATAGRAM_BATCH):
        if rate and limits.paused:
            break  # the rest wait in the socket's buffer (or the kernel drops them)
        try:
            data, addr = recvfrom(65536)
        except OSError:
            break  # EAGAIN: drained
        port = addr[1]
        if port < 1024 or port in own_ports or not is_unicast(addr[0]) or (
                checked and not allowed(addr[0], only_from, no_access)):
            dropped += 1
            continue
        reply = answer(data)
        if reply is not None:
            try:
                sendto(reply, addr)
            except OSError:
                dropped += 1
                continue
        answered += 1
        if rate:
            limits.take_token()
    return answered, dropped


CREDENTIALS = socket.CMSG_SPACE(struct.calcsize("3i"))


def answer_unix_datagrams(listener: Listener, answer: Callable[[bytes], bytes | None],
                          limits: Limits) -> tuple[int, int]:
    """The same for a unix datagram socket, where a reply goes to the path the sender is
    bound to. superd resolves that path as root, so it would write wherever a symlink swapped
    in at that path points (/run/systemd/notify, its own chargen): a reply goes only to a
    socket inode the sender's own uid owns (the kernel tells its uid, SO_PASSCRED), reached
    through the fd that was checked, never by name again."""
    sock = listener.sock
    rate = limits.config.rate is not None
    answered = dropped = 0
    for _ in range(DATAGRAM_BATCH):
        if rate and limits.paused:
            break
        try:
            data, ancdata, _, addr = sock.recvmsg(65536, CREDENTIALS)
        except OSError:
            break
        reply = answer(data)
        if reply is not None and not _reply_unix(sock, reply, addr, _sender_uid(ancdata)):
            dropped += 1
            continue
        answered += 1
        if rate:
            limits.take_token()
    return answered, dropped


def _sender_uid(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return int(struct.unpack("3i", data[:12])[1])
    return None


def _reply_unix(sock: socket.socket, reply: bytes, addr: object, uid: int | None) -> bool:
    if uid is None or not addr:
        return False  # unbound (or unknown) sender: nowhere to answer
    try:
        if isinstance(addr, bytes):  # an abstract name: no file, no permissions to borrow
            sock.sendto(reply, addr)
            return True
        fd = os.open(str(addr), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or (uid != 0 and st.st_uid != uid):
            return False
        sock.sendto(reply, f"/proc/self/fd/{fd}")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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


QUICK_EXIT = 1.0  # a wait handler gone sooner than this without taking its work has looped


def waiting_on(listener: Listener) -> object:
    """What waits on a listening socket now, to tell later whether a wait handler took it: the
    first datagram (its sender and first bytes), or how many connections are queued."""
    sock = listener.sock
    try:
        if not listener.stream:
            return sock.recvfrom(64, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        if listener.family != socket.AF_UNIX:  # TCP_INFO's tcpi_unacked: the accept queue
            queued = struct.unpack_from("I", sock.getsockopt(socket.IPPROTO_TCP,
                                                             socket.TCP_INFO, 104), 24)[0]
            return ("queued", queued) if queued else None
        return "readable" if select.select([sock], [], [], 0)[0] else None
    except (OSError, ValueError):
        return None


def looped(handler: Handler, duration: float) -> bool:
    """Did a wait handler exit at once, leaving what waited on its socket where it was?"""
    pending, listener = handler.pending, handler.listener
    if pending is None or listener is None or duration >= QUICK_EXIT:
        return False
    now = waiting_on(listener)
    if isinstance(pending, tuple) and pending[0] == "queued":
        return isinstance(now, tuple) and now[0] == "queued" and bool(now[1] >= pending[1])
    return bool(now == pending)


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
