"""Listen addresses and the sockets bound to them.

An `Address` is what the table says (`7`, `127.0.0.1:7`, `[::1]:7`, `/run/x.sock`, `@name`,
`vsock:CID:PORT`), parsed once at load. `Listener.bind()` makes the non-blocking listening (or
datagram) socket for it, with the service's socket options (superd/sockapply.py) and, for a
unix socket file, its owner and mode (superd/unixfile.py). Sockets are keyed by `Address.key()`
so that a reload can hand the very same socket to the new table when an address did not
change: that is how an unchanged service refuses no connection during a reload.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from superd import sockapply, unixfile
from superd.sockopts import DEFAULT, SocketOptions

# The protocols whose sockets listen() and accept() connections.
STREAM_PROTOCOLS = {"tcp": socket.SOCK_STREAM, "unix": socket.SOCK_STREAM,
                    "unix-seqpacket": socket.SOCK_SEQPACKET, "vsock": socket.SOCK_STREAM}
PROTOCOLS = {
    "tcp": socket.SOCK_STREAM,
    "udp": socket.SOCK_DGRAM,
    "unix": socket.SOCK_STREAM,
    "unix-dgram": socket.SOCK_DGRAM,
    "unix-seqpacket": socket.SOCK_SEQPACKET,
    "vsock": socket.SOCK_STREAM,
}
UNIX_PROTOCOLS = ("unix", "unix-dgram", "unix-seqpacket")
AF_VSOCK = int(getattr(socket, "AF_VSOCK", 40))
VMADDR_CID_ANY = 0xFFFFFFFF
SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes, with the NUL of a file path


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
    def sockaddr(self) -> str | tuple[str, int] | tuple[int, int]:
        if self.family == socket.AF_UNIX:
            return "\0" + self.path[1:] if self.abstract else self.path
        if self.family == AF_VSOCK:
            return (int(self.host) if self.host else VMADDR_CID_ANY, self.port)
        return (self.host, self.port)

    @property
    def abstract(self) -> bool:
        """A name in the abstract unix namespace (`@name`): no file, nothing to unlink."""
        return self.path.startswith("@")

    @property
    def file(self) -> bool:
        """A unix socket with a file in the file system."""
        return self.family == socket.AF_UNIX and not self.abstract

    @property
    def inet(self) -> bool:
        """An IPv4 or IPv6 address (where ports below 1024 are privileged)."""
        return self.family in (socket.AF_INET, socket.AF_INET6)

    def key(self, protocol: str, options: SocketOptions = DEFAULT) -> Key:
        """What makes two listeners the same socket (the written form does not), with the
        options that cannot change on a bound socket."""
        return (protocol, self.family, self.host, self.port, self.path, self.v6only,
                options.bind_key())

    def overlaps(self, other: Address) -> bool:
        """Would binding both fail? (same port and one covers the other's address)"""
        if self.family == socket.AF_UNIX or other.family == socket.AF_UNIX:
            return self.path == other.path
        if (self.family == AF_VSOCK) != (other.family == AF_VSOCK) or self.port != other.port:
            return False
        if self.host == other.host or self.family == AF_VSOCK and not (self.host and other.host):
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
    if protocol in UNIX_PROTOCOLS:
        return _unix_address(value, protocol)
    if protocol == "vsock":
        return _vsock_address(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected PORT, HOST:PORT or [V6]:PORT, not {value!r}")
    text = str(value)
    if text.startswith(("/", "@")):
        raise ValueError(f"a unix socket needs protocol unix, unix-dgram or unix-seqpacket, "
                         f"not {protocol}")
    if text.startswith("vsock:"):
        raise ValueError(f"a vsock address needs protocol vsock, not {protocol}")
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
            f"{host!r} is not an IPv4 address (write IPv6 as [ADDR]:PORT)"
        ) from None
    return Address(socket.AF_INET, str(ip4), _port(port), text=text)


def _unix_address(value: object, protocol: str) -> Address:
    if not isinstance(value, str) or not value.startswith(("/", "@")) or "\0" in value:
        raise ValueError(f"protocol {protocol} needs an absolute socket path or an abstract "
                         f"@name, not {value!r}")
    if len(value) < 2:
        raise ValueError(f"{value!r} names no socket")
    if len(os.fsencode(value)) > SUN_PATH_MAX:
        raise ValueError(f"{value!r} is longer than the {SUN_PATH_MAX} bytes a unix socket "
                         "address holds")
    return Address(socket.AF_UNIX, path=value, text=value)


def _vsock_address(value: object) -> Address:
    """`vsock:CID:PORT`, or `vsock::PORT` for any CID (systemd's forms)."""
    text = value if isinstance(value, str) else ""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != "vsock":
        raise ValueError(f"protocol vsock needs vsock:CID:PORT or vsock::PORT, not {value!r}")
    cid, port = parts[1], parts[2]
    if cid and (not cid.isdigit() or int(cid) >= VMADDR_CID_ANY):
        raise ValueError(f"CID {cid!r} is not a number from 0 to 4294967294 (or leave it out "
                         "for any: vsock::PORT)")
    if not port.isdigit() or not 0 < int(port) < 0xFFFFFFFF:
        raise ValueError(f"port {port!r} is not a number from 1 to 4294967294")
    return Address(AF_VSOCK, str(int(cid)) if cid else "", int(port), text=text)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def ident(family: int, kind: int, sockaddr: object) -> str:
    """What a socket is bound to, the same whether read off the socket or off an Address
    (how a superd after an upgrade finds the sockets it was handed)."""
    if isinstance(sockaddr, tuple):
        sockaddr = tuple(sockaddr[:2])
    elif isinstance(sockaddr, bytes):
        sockaddr = sockaddr.decode("latin-1")
    return f"{family}/{kind}/{sockaddr!r}"


def sock_ident(sock: socket.socket) -> str:
    return ident(int(sock.family), int(sock.type), sock.getsockname())


class Listener:
    """A bound socket and what it was bound for.

    `passed` marks a socket systemd handed us: we never unlink or shut it down, so systemd keeps
    queueing connections on it while superd restarts (and its options are the .socket unit's).
    `per_connection` lists the options accept.py sets on each connection, those the kernel
    does not copy from this socket (usually none).
    """

    def __init__(self, address: Address | None, protocol: str, sock: socket.socket,
                 passed: bool = False, options: SocketOptions = DEFAULT, inode: int = 0):
        self.address = address
        self.protocol = protocol
        self.sock = sock
        self.passed = passed
        # Plain ints, read once: socket.family/.type build an IntEnum on every access.
        self.family, self.kind = int(sock.family), int(sock.type)
        self.stream = self.kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
        self.backlog = 0
        self.inode = inode  # of our socket file, so that close() unlinks only that one
        self.options = options
        self.per_connection = sockapply.per_connection(self.family, self.kind, options)

    @classmethod
    def bind(cls, address: Address, protocol: str, backlog: int,
             options: SocketOptions = DEFAULT) -> Listener:
        """Create, bind and (for streams) listen; non-blocking and close-on-exec."""
        sock = socket.socket(address.family, PROTOCOLS[protocol])
        inode = 0
        try:
            if address.family in sockapply.IP_FAMILIES and protocol in STREAM_PROTOCOLS:
                # TCP: rebind over TIME_WAIT. Never on UDP, where it would let a local user
                # bind the very port beside us (and spoof replies or ping-pong from it).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(address.v6only))
            sockapply.before_bind(sock, address.family, options)
            if address.file:
                inode = unixfile.bind(sock, address.path, options)
            else:
                sock.bind(address.sockaddr)
            sockapply.after_bind(sock, address.family, protocol, options)
            if protocol in STREAM_PROTOCOLS:
                sock.listen(backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return cls(address, protocol, sock, options=options, inode=inode)

    def configure(self, options: SocketOptions) -> str | None:
        """A reload kept this socket: set the options that may change; a problem, or None.

        (Those in SocketOptions.bind_key never differ here: they make a new socket.)
        """
        if options == self.options or self.passed or self.address is None:
            return None
        problem = None
        try:
            sockapply.after_bind(self.sock, self.family, self.protocol, options, every=True)
            if self.address.file:
                self.inode = unixfile.settle(self.sock, self.address.path, options)
        except OSError as e:
            problem = f"{self}: cannot change its socket options: {e.strerror or e}"
        self.options = options
        self.per_connection = sockapply.per_connection(self.family, self.kind, options)
        return problem

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
        return str(self.address) if self.address else bound_to(self.sock)


def bound_to(sock: socket.socket) -> str:
    """What a socket (one systemd passed) is bound to, as `listen` writes it: 127.0.0.1:7,
    [::1]:7, a unix path or @name; `fd N` only if the kernel will not say."""
    try:
        name = sock.getsockname()
    except OSError:
        return f"fd {sock.fileno()}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    if isinstance(name, tuple) and sock.family == socket.AF_INET:
        return f"{name[0]}:{name[1]}"
    if isinstance(name, bytes):
        return "@" + name[1:].decode(errors="replace") if name[:1] == b"\0" else name.decode()
    if isinstance(name, str):
        return "@" + name[1:] if name[:1] == "\0" else name or f"fd {sock.fileno()}"
    return str(name)


def _inode(path: str) -> int:
    try:
        return os.lstat(path).st_ino
    except OSError:
        return 0


def plain_ip(ip: str) -> str:
    """Show IPv4-mapped IPv6 peers (::ffff:1.2.3.4) as the IPv4 address they are."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip
