"""The socket options a service may ask for: table keys in, one frozen record out.

Every key here sets a socket option, or the owner and mode of a unix socket's file, and nothing
else; so they live together. `KEYS` holds their parsers (fields.SERVICE_KEYS takes them as one
block), `misfit()` names a key that cannot apply to a service's protocol and why, and `build()`
gathers the parsed values into the `SocketOptions` a listener is bound with. Setting them on a
socket is superd/sockapply.py's business, the socket file's is superd/unixfile.py's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

from superd.values import boolean, group_entry, integer, user_entry

IP = frozenset({"tcp", "udp"})
TCP = frozenset({"tcp"})
UDP = frozenset({"udp"})
UNIX = frozenset({"unix", "unix-dgram", "unix-seqpacket"})
UNIX_CONNECTED = frozenset({"unix", "unix-seqpacket"})
TOS_NAMES = {"low-delay": 0x10, "throughput": 0x08, "reliability": 0x04, "low-cost": 0x02}
SIZE = re.compile(r"\s*(\d+)\s*([KkMmGg]?)\s*")
IFNAME = re.compile(r"[^\s/:]{1,15}")  # IFNAMSIZ is 16 with the NUL; '/' and ':' are never in one
MAX_BUFFER = 1 << 30
MAX_KEEPALIVE_SECONDS = 32767  # the kernel's MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL
MAX_KEEPALIVE_PROBES = 127  # MAX_TCP_KEEPCNT


@dataclass(frozen=True)
class SocketOptions:
    """What a service's listening sockets are set up with; the defaults change nothing.

    `socket_mode` defaults to 0666 as systemd's SocketMode= does: a unix service is for every
    local user unless its table entry says otherwise.
    """

    socket_uid: int | None = None  # None: superd's own (root)
    socket_gid: int | None = None
    socket_mode: int = 0o666
    directory_mode: int = 0o755
    free_bind: bool = False
    nodelay: bool = False
    keepalive: bool = False
    keepalive_time: int | None = None
    keepalive_interval: int | None = None
    keepalive_probes: int | None = None
    bind_to_device: str = ""
    reuse_port: bool = False
    receive_buffer: int | None = None
    send_buffer: int | None = None
    defer_accept: int | None = None
    mark: int | None = None
    ip_tos: int | None = None
    ip_ttl: int | None = None
    priority: int | None = None
    transparent: bool = False
    broadcast: bool = False

    def bind_key(self) -> tuple[object, ...]:
        """The options a bound socket cannot be switched back from (or that decide what the
        bind may share): a change of one of them means a new socket on reload."""
        return (self.reuse_port, self.bind_to_device, self.receive_buffer, self.send_buffer,
                self.keepalive_time, self.keepalive_interval, self.keepalive_probes)


DEFAULT = SocketOptions()
FIELDS = frozenset(f.name for f in fields(SocketOptions))

# -- parsers: raw YAML value in, SocketOptions field values out -------------------------------


def octal_mode(value: Any, high: int = 0o777) -> int:
    """`0660` in YAML is already octal; a quoted "0660" or "660" is read as octal too."""
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{1,4}", value.strip()):
        value = int(value, 8)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        shown = f"{value:o} (octal)" if isinstance(value, int) and not isinstance(
            value, bool) and value >= 0 else repr(value)
        raise ValueError(f"expected an octal mode such as \"0660\" (at most {high:o}), "
                         f"not {shown}")
    return value


def size(value: Any) -> int:
    """Bytes: a number, or a number with K, M or G (1024, as systemd and inetd count)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size in bytes such as 65536 or 64K, not {value!r}")
    m = SIZE.fullmatch(str(value))
    if not m:
        raise ValueError(f"expected a size in bytes such as 65536 or 64K, not {value!r}")
    number = int(m[1]) * (1 << (10 * " KMG".index((m[2] or " ").upper())))
    if not 1 <= number <= MAX_BUFFER:
        raise ValueError(f"{value} is out of range (1 byte to 1G)")
    return number


def whole_seconds(value: Any, high: int) -> int:
    """A number of seconds, rounded up to a whole one (the kernel counts in seconds)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
        raise ValueError(f"expected a number of seconds from 1 to {high}, not {value!r}")
    return math.ceil(value)


def _uid(value: Any, ctx: object) -> dict[str, Any]:
    return {"socket_uid": user_entry(value).pw_uid}


def _gid(value: Any, ctx: object) -> dict[str, Any]:
    return {"socket_gid": group_entry(value).gr_gid}


def _keepalive(value: Any, ctx: object) -> dict[str, Any]:
    """true, false, or {time: S, interval: S, probes: N} (which means true)."""
    if isinstance(value, bool):
        return {"keepalive": value}
    if not isinstance(value, dict) or not value:
        raise ValueError("expected true, false or a mapping of time, interval, probes")
    out: dict[str, Any] = {"keepalive": True}
    for key, v in value.items():
        if key in ("time", "interval"):
            out[f"keepalive_{key}"] = whole_seconds(v, MAX_KEEPALIVE_SECONDS)
        elif key == "probes":
            out["keepalive_probes"] = integer(v, 1, MAX_KEEPALIVE_PROBES)
        else:
            raise ValueError(f"unknown keepalive key {key!r} (expected time, interval, probes)")
    return out


def _device(value: Any) -> str:
    if not isinstance(value, str) or not IFNAME.fullmatch(value) or value in (".", ".."):
        raise ValueError(f"expected an interface name such as eth0 (1 to 15 characters, no "
                         f"blank, '/' or ':'), not {value!r}")
    return value


def _tos(value: Any) -> int:
    if isinstance(value, str) and value in TOS_NAMES:
        return TOS_NAMES[value]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ValueError(f"expected 0 to 255 or one of {', '.join(TOS_NAMES)}, not {value!r}")
    return value


def _one(key: str, parse: Callable[[Any], Any]) -> Callable[[Any, object], dict[str, Any]]:
    return lambda value, ctx: {key: parse(value)}


# The table keys, in the order README lists them.
KEYS: dict[str, Callable[[Any, Any], dict[str, Any]]] = {
    "socket_user": _uid,
    "socket_group": _gid,
    "socket_mode": _one("socket_mode", octal_mode),
    "directory_mode": _one("directory_mode", lambda v: octal_mode(v, 0o7777)),
    "free_bind": _one("free_bind", boolean),
    "nodelay": _one("nodelay", boolean),
    "keepalive": _keepalive,
    "bind_to_device": _one("bind_to_device", _device),
    "reuse_port": _one("reuse_port", boolean),
    "receive_buffer": _one("receive_buffer", size),
    "send_buffer": _one("send_buffer", size),
    "defer_accept": _one("defer_accept", lambda v: whole_seconds(v, 3600)),
    "mark": _one("mark", lambda v: integer(v, 0, 2**32 - 1)),
    "ip_tos": _one("ip_tos", _tos),
    "ip_ttl": _one("ip_ttl", lambda v: integer(v, 1, 255)),
    "priority": _one("priority", lambda v: integer(v, 0, 2**31 - 1)),
    "transparent": _one("transparent", boolean),
    "broadcast": _one("broadcast", boolean),
}

# key -> (protocols it applies to, what it is for)
APPLIES: dict[str, tuple[frozenset[str], str]] = {
    "socket_user": (UNIX, "the owner of a unix socket's file"),
    "socket_group": (UNIX, "the group of a unix socket's file"),
    "socket_mode": (UNIX, "the mode of a unix socket's file"),
    "directory_mode": (UNIX, "the mode of the directories made for a unix socket"),
    "free_bind": (IP, "an IP option"),
    "nodelay": (TCP, "a TCP option"),
    "keepalive": (TCP, "a TCP option"),
    "bind_to_device": (IP, "an IP option"),
    "reuse_port": (IP, "for TCP and UDP ports"),
    "receive_buffer": (IP | UNIX, "for IP and unix sockets (vsock has buffers of its own)"),
    "send_buffer": (IP | UNIX, "for IP and unix sockets (vsock has buffers of its own)"),
    "defer_accept": (TCP, "a TCP option"),
    "mark": (IP, "an IP option"),
    "ip_tos": (IP, "an IP option"),
    "ip_ttl": (IP, "an IP option"),
    "priority": (IP, "an IP option"),
    "transparent": (IP, "an IP option"),
    "broadcast": (UDP, "a UDP option"),
}
FILE_KEYS = ("socket_user", "socket_group", "socket_mode", "directory_mode")
# Set on each connection a nowait service accepts, because the kernel does not copy them from
# the listening socket: a wait: true handler accepts its own connections, so they cannot apply.
PER_CONNECTION = {"priority": TCP, "receive_buffer": UNIX_CONNECTED,
                  "send_buffer": UNIX_CONNECTED}


def misfit(written: frozenset[str], protocol: str, wait: bool,
           abstract: bool) -> tuple[str, str] | None:
    """(key, reason) for the first socket key written for this service that cannot apply to
    it. Keys that came from `defaults:` are not blamed: they apply where they fit."""
    for key in KEYS:
        if key not in written:
            continue
        protocols, what = APPLIES[key]
        if protocol not in protocols:
            return key, f"{key} cannot apply to protocol {protocol}: it is {what}"
        if key in FILE_KEYS and abstract:
            return key, f"{key} cannot apply to an abstract socket (@name): it has no file"
        if wait and key in PER_CONNECTION and protocol in PER_CONNECTION[key]:
            return key, (f"{key} cannot apply to a wait: true {protocol} service: the kernel "
                         "does not pass it on from the listening socket to the connections "
                         "its handler accepts")
    return None


def build(values: dict[str, Any], protocol: str, abstract: bool) -> SocketOptions:
    """Take the socket fields out of `values` (parsed table values) and make the record; the
    ones that do not fit this protocol (they came from `defaults:`) are left out."""
    taken = {k: values.pop(k) for k in list(values) if k in FIELDS}
    kept: dict[str, Any] = {}
    for name, value in taken.items():
        key = "socket_user" if name == "socket_uid" else "socket_group" \
            if name == "socket_gid" else "keepalive" if name.startswith("keepalive") else name
        if protocol in APPLIES[key][0] and not (abstract and key in FILE_KEYS):
            kept[name] = value
    return SocketOptions(**kept) if kept else DEFAULT
