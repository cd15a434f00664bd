"""Setting a service's SocketOptions on its listening socket.

Linux copies these options from a listening TCP socket to every connection accepted from it
(tests/test_sockets.py checks each on a handler's fd 0), so they are set once, on the listener,
and the accept path pays nothing. The few it does not copy (SO_PRIORITY on TCP, the buffer
sizes on unix stream sockets) are listed by `per_connection()` and set by accept.py on each
connection of a service that has them.

Options are set in two steps: `before_bind` for those that decide what the bind may do (share a
port, bind an address not there yet, one interface), `after_bind` for the rest. On a reload that
keeps the socket, `after_bind(..., every=True)` sets each option to its value or back to the
kernel's default. An option the kernel refuses raises OSError naming the key.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator

from superd.sockopts import DEFAULT, SocketOptions

SOL_IP, SOL_IPV6, SOL_TCP = socket.IPPROTO_IP, socket.IPPROTO_IPV6, socket.IPPROTO_TCP
SOL_SOCKET = socket.SOL_SOCKET
# Not every Python names these (values from linux/in.h, in6.h, asm-generic/socket.h).
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)
IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = getattr(socket, "IPV6_TRANSPARENT", 75)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
IP_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))

Option = tuple[int, int, int | bytes]  # (level, option, value) for setsockopt


def _set(sock: socket.socket, key: str, level: int, option: int, value: int | bytes) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as e:
        raise OSError(e.errno, f"{key}: {e.strerror}") from None


def _buffer(sock: socket.socket, key: str, size: int) -> None:
    """SO_*BUFFORCE first, which root may use past net.core.[rw]mem_max (as systemd does)."""
    force, plain = (SO_RCVBUFFORCE, socket.SO_RCVBUF) if key == "receive_buffer" else (
        SO_SNDBUFFORCE, socket.SO_SNDBUF)
    try:
        sock.setsockopt(SOL_SOCKET, force, size)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise OSError(e.errno, f"{key}: {e.strerror}") from None
        _set(sock, key, SOL_SOCKET, plain, size)


def before_bind(sock: socket.socket, family: int, opts: SocketOptions) -> None:
    if opts is DEFAULT:
        return
    v6 = family == socket.AF_INET6
    if opts.reuse_port:
        _set(sock, "reuse_port", SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if opts.free_bind:
        _set(sock, "free_bind", *((SOL_IPV6, IPV6_FREEBIND) if v6 else (SOL_IP, IP_FREEBIND)), 1)
    if opts.transparent:
        _set(sock, "transparent",
             *((SOL_IPV6, IPV6_TRANSPARENT) if v6 else (SOL_IP, IP_TRANSPARENT)), 1)
    if opts.bind_to_device:
        _set(sock, "bind_to_device", SOL_SOCKET, socket.SO_BINDTODEVICE,
             opts.bind_to_device.encode())
    for key in ("receive_buffer", "send_buffer"):
        value = getattr(opts, key)
        if value is not None:
            _buffer(sock, key, value)


def after_bind(sock: socket.socket, family: int, protocol: str, opts: SocketOptions,
               every: bool = False) -> None:
    """The options that may change on a bound socket; `every`: set the unset ones back too."""
    if opts is DEFAULT and not every:
        return
    for key, level, option, value in _settable(family, protocol, opts, every):
        _set(sock, key, level, option, value)


def _settable(family: int, protocol: str, o: SocketOptions,
              every: bool) -> Iterator[tuple[str, int, int, int]]:
    """(key, level, option, value) in the order they must be set: IP_TOS before SO_PRIORITY,
    because setting the TOS also sets the priority the TOS implies."""
    if family not in IP_FAMILIES:
        return
    v6 = family == socket.AF_INET6
    # key, value (None: not set), the value that restores the kernel's default (None: none
    # does, which is why those options are in SocketOptions.bind_key), level, option
    wanted: list[tuple[str, int | None, int | None, int, int]] = []
    if protocol == "tcp":
        wanted += [("nodelay", int(o.nodelay), 0, SOL_TCP, socket.TCP_NODELAY),
                   ("keepalive", int(o.keepalive), 0, SOL_SOCKET, socket.SO_KEEPALIVE),
                   ("keepalive", o.keepalive_time, None, SOL_TCP, socket.TCP_KEEPIDLE),
                   ("keepalive", o.keepalive_interval, None, SOL_TCP, socket.TCP_KEEPINTVL),
                   ("keepalive", o.keepalive_probes, None, SOL_TCP, socket.TCP_KEEPCNT),
                   ("defer_accept", o.defer_accept, 0, SOL_TCP, socket.TCP_DEFER_ACCEPT)]
    if protocol == "udp":
        wanted.append(("broadcast", int(o.broadcast), 0, SOL_SOCKET, socket.SO_BROADCAST))
    if every:  # set before the bind, where they matter; here only to switch them off again
        wanted += [("free_bind", int(o.free_bind), 0,
                    *((SOL_IPV6, IPV6_FREEBIND) if v6 else (SOL_IP, IP_FREEBIND))),
                   ("transparent", int(o.transparent), 0,
                    *((SOL_IPV6, IPV6_TRANSPARENT) if v6 else (SOL_IP, IP_TRANSPARENT)))]
    wanted.append(("ip_tos", o.ip_tos, 0, SOL_IP, socket.IP_TOS))
    if v6:
        wanted.append(("ip_tos", o.ip_tos, -1, SOL_IPV6, socket.IPV6_TCLASS))
    wanted.append(("ip_ttl", o.ip_ttl, -1, SOL_IP, socket.IP_TTL))
    if v6:
        wanted.append(("ip_ttl", o.ip_ttl, -1, SOL_IPV6, socket.IPV6_UNICAST_HOPS))
    wanted += [("mark", o.mark, 0, SOL_SOCKET, socket.SO_MARK),
               ("priority", o.priority, 0, SOL_SOCKET, socket.SO_PRIORITY)]
    for key, value, default, level, option in wanted:
        if value is not None and (value or every):
            yield key, level, option, value
        elif value is None and every and default is not None:
            yield key, level, option, default


def per_connection(family: int, kind: int, opts: SocketOptions) -> tuple[Option, ...]:
    """What accept.py sets on each accepted connection: what the kernel does not copy."""
    if opts is DEFAULT:
        return ()
    out: list[Option] = []
    if family in IP_FAMILIES and kind == socket.SOCK_STREAM and opts.priority is not None:
        out.append((SOL_SOCKET, socket.SO_PRIORITY, opts.priority))
    if family == socket.AF_UNIX and kind != socket.SOCK_DGRAM:
        root = os.geteuid() == 0  # the FORCE options pass net.core.[rw]mem_max, for root only
        if opts.receive_buffer is not None:
            out.append((SOL_SOCKET, SO_RCVBUFFORCE if root else socket.SO_RCVBUF,
                        opts.receive_buffer))
        if opts.send_buffer is not None:
            out.append((SOL_SOCKET, SO_SNDBUFFORCE if root else socket.SO_SNDBUF,
                        opts.send_buffer))
    return tuple(out)
