"""Listen addresses and the sockets bound to them.

An `Address` is what the table says (`7`, `127.0.0.1:7`, `[::1]:7`, `/run/x.sock`), parsed once
at load. `bind()` makes the non-blocking listening (or datagram) socket for it. Sockets are keyed
by `Address.key(protocol)` so that a reload can hand the very same socket to the new table when an
address did not change: that is how an unchanged service refuses no connection during a reload.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from dataclasses import dataclass, field

STREAM_PROTOCOLS = {"tcp": socket.SOCK_STREAM, "unix": socket.SOCK_STREAM}
PROTOCOLS = {
    "tcp": socket.SOCK_STREAM,
    "udp": socket.SOCK_DGRAM,
    "unix": socket.SOCK_STREAM,
    "unix-dgram": socket.SOCK_DGRAM,
}


Key = tuple[object, ...]  # what makes two listeners the same socket (Address.key)


@dataclass(frozen=True)
class Address:
    """One parsed `listen` entry."""

    family: int
    host: str = ""  # "::" with v6only=False means every address, IPv4 and IPv6
    port: int = 0
    path: str = ""
    v6only: bool = False
    text: str = field(default="", compare=False)

    @property
    def sockaddr(self) -> str | tuple[str, int]:
        return self.path if self.family == socket.AF_UNIX else (self.host, self.port)

    def key(self, protocol: str) -> Key:
        """What makes two listeners the same socket (the written form does not)."""
        return (protocol, self.family, self.host, self.port, self.path, self.v6only)

    def overlaps(self, other: Address) -> bool:
        """Would binding both fail? (same port and one covers the other's address)"""
        if self.family == socket.AF_UNIX or other.family == socket.AF_UNIX:
            return self.path == other.path
        if self.port != other.port:
            return False
        if self.host == other.host:
            return True
        return _covers(self, other) or _covers(other, self)

    def __str__(self) -> str:
        return self.text or str(self.sockaddr)


def _covers(wide: Address, narrow: Address) -> bool:
    if wide.host == "::" and not wide.v6only:
        return True  # dual stack takes every address of both families
    if wide.host in ("0.0.0.0", "::"):
        return wide.family == narrow.family
    return False


def parse_address(value: object, protocol: str) -> Address:
    """Parse one `listen` value for `protocol`; raise ValueError with a reason."""
    if protocol in ("unix", "unix-dgram"):
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise ValueError(f"protocol {protocol} needs an absolute socket path, not {value!r}")
        return Address(socket.AF_UNIX, path=value, text=value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected PORT, HOST:PORT or [V6]:PORT, not {value!r}")
    text = str(value)
    if text.startswith("/"):
        raise ValueError(f"a socket path needs protocol unix or unix-dgram, not {protocol}")
    if text.isdigit():
        return Address(socket.AF_INET6, "::", _port(text), text=text)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected PORT, HOST:PORT or [V6]:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ip6 = ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{host[1:-1]!r} is not an IPv6 address") from None
        return Address(socket.AF_INET6, str(ip6), _port(port), v6only=True, text=text)
    try:
        ip4 = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(
            f"{host!r} is not an IPv4 address (write IPv6 as [ADDR]:PORT; names are not resolved)"
        ) from None
    return Address(socket.AF_INET, str(ip4), _port(port), text=text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


class Listener:
    """A bound socket and what it was bound for.

    `passed` marks a socket systemd handed us: we never unlink or shut it down, so systemd keeps
    queueing connections on it while superd restarts.
    """

    def __init__(self, address: Address | None, protocol: str, sock: socket.socket,
                 passed: bool = False):
        self.address = address
        self.protocol = protocol
        self.sock = sock
        self.passed = passed
        self.stream = sock.type == socket.SOCK_STREAM
        # Plain ints, read once: socket.family/.type build an IntEnum on every access.
        self.family, self.kind = int(sock.family), int(sock.type)
        self.backlog = 0
        self.inode = _inode(address.path) if address and address.family == socket.AF_UNIX else 0

    @classmethod
    def bind(cls, address: Address, protocol: str, backlog: int) -> Listener:
        """Create, bind and (for streams) listen; non-blocking and close-on-exec."""
        sock = socket.socket(address.family, PROTOCOLS[protocol])
        try:
            if address.family == socket.AF_UNIX:
                _remove_stale_socket(address.path)
            elif protocol in STREAM_PROTOCOLS:
                # TCP: rebind over TIME_WAIT. Never on UDP, where it would let a local user
                # bind the very port beside us (and spoof replies or ping-pong from it).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(address.v6only))
            sock.bind(address.sockaddr)
            if protocol in STREAM_PROTOCOLS:
                sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(address, protocol, sock)

    def close(self) -> None:
        """Close, removing our socket file if it is still the one we made."""
        address = self.address
        if address and self.inode and not self.passed and _inode(address.path) == self.inode:
            try:
                os.unlink(address.path)
            except OSError:
                pass
        self.sock.close()

    def __str__(self) -> str:
        return str(self.address) if self.address else f"fd {self.sock.fileno()}"


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a previous run would make bind fail; other files are kept."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def plain_ip(ip: str) -> str:
    """Show IPv4-mapped IPv6 peers (::ffff:1.2.3.4) as the IPv4 address they are."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip
