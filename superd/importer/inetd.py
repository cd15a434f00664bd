"""inetd.conf in, a `Translation` out (OpenBSD inetd as Debian ships it, plus the common dialects).

One line, `service socket-type protocol wait/nowait[.max] user[:group] server argv...`, becomes
one superd service. What the line means follows Debian's openbsd-inetd: `tcp`/`udp` listen on
IPv4 and IPv6, `tcp4`/`tcp6` on one family, `addr:` alone on a line sets the address of the
lines after it, a line starting with a blank continues the one before, `nowait.N` caps starts
per minute. FreeBSD's `nowait/max-child/per-ip-rate/max-child-per-ip`, inetutils' `tcp6only` and
Debian update-inetd's `#<off>#` (a disabled entry) are understood too. Anything superd cannot do
stays in the output as a comment that says why.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

from superd.fields import INTERNAL
from superd.importer.common import (
    Entry,
    Remark,
    Translation,
    listen_text,
    not_carried,
    port_of,
    resolve,
    set_exec,
    unwrap_tcpd,
    wrap_tcpd,
)

OFF = "#<off>#"  # Debian's update-inetd comments a service out with this prefix
# protocol suffix -> which families inetd listens on ("any" = IPv4 and IPv6)
FAMILIES = {"": "any", "4": "4", "6": "6", "46": "any", "6only": "6"}
SOCKET_TYPES = {"stream": "tcp", "dgram": "udp"}


def translate(path: str) -> Translation:
    """Read an inetd.conf; raise OSError when it cannot be read."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    short = os.path.basename(path)
    t = Translation("inetd", path, header=[
        f"superd service table imported from {path} by `superd import inetd`.",
        "Each service shows the inetd.conf line it came from. `note:` lines say where superd",
        "behaves differently; `not carried over:` lines are what superd cannot do, and why.",
        "A service run through tcpd gets tcp_wrappers (superd reads /etc/hosts.allow and",
        "/etc/hosts.deny itself); `inetd -l` (FreeBSD -w/-W) wrapped every service: add",
        "tcp_wrappers: true to each then. A handler's stderr goes to the log, not to the",
        "client as under inetd (add `stderr: socket` where a program relies on that).",
        "See docs/migrating.md for the whole mapping.",
    ])
    pending: list[str] = []  # comments waiting to see whether an entry follows them
    default_host = "*"
    for number, text, disabled, comments in _logical_lines(lines, pending, t):
        where = f"{short}:{number}"
        fields = text.split()
        host, service, rest = _host_prefix(fields)
        if service is None:
            default_host = host
            t.items.append(Remark(comments + [
                f"{where}: {text.strip()}",
                f"  sets the listen address of the lines below to {host}"
                + (" (every address)" if host == "*" else "") + "; applied to them"]))
            continue
        item = _entry(where, text.strip(), host or default_host, service, rest, disabled)
        if isinstance(item, Entry):
            item.comments = comments
        else:
            item.lines[:0] = comments
        t.items.append(item)
    if pending:
        t.items.append(Remark(pending))
    return t


def _logical_lines(lines: list[str], pending: list[str],
                   t: Translation) -> Iterator[tuple[int, str, bool, list[str]]]:
    """Yield (line number, text, disabled, comments above) per entry; continuation lines
    (starting with a blank) are joined to their entry as inetd does."""
    i = 0
    while i < len(lines):
        raw = lines[i]
        number = i + 1
        i += 1
        stripped = raw.strip()
        disabled = raw.startswith(OFF)
        if not stripped:
            if pending:
                t.items.append(Remark(pending[:]))
                pending.clear()
            continue
        if stripped.startswith("#") and not disabled:
            pending.append(stripped)
            continue
        text = raw[len(OFF):] if disabled else raw
        for _ in range(len(lines)):  # bounded: at most every line once
            if i < len(lines) and lines[i][:1] in (" ", "\t") and lines[i].strip() \
                    and not lines[i].strip().startswith("#"):
                text += " " + lines[i].strip()
                i += 1
            else:
                break
        comments = pending[:]
        pending.clear()
        yield number, text, disabled, comments


def _host_prefix(fields: list[str]) -> tuple[str, str | None, list[str]]:
    """Split `[host,host]:service` off the first field (the last ':' separates them).

    Returns (host or "", service or None for a line that only sets the default host, rest).
    """
    first = fields[0]
    if ":" not in first:
        return "", first, fields[1:]
    host, _, service = first.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host or "*"
    if service:
        return host, service, fields[1:]
    if len(fields) == 1:
        return host, None, []
    return host, fields[1], fields[2:]


def _entry(where: str, text: str, host: str, service: str, rest: list[str],
           disabled: bool) -> Entry | Remark:
    """One inetd.conf entry as a superd service, or a comment saying why it cannot be one."""
    original = [("#<off># " if disabled else "") + text]
    if len(rest) < 5:
        return not_carried(where, "too few fields (inetd skips this line too)", original)
    socktype, proto, waitspec, userspec, server, *argv = rest
    proto, _, bufopts = proto.partition(",")
    if service.startswith("tcpmux/"):
        return not_carried(where, "TCPMUX (RFC 1078) services: superd has no tcpmux "
                                  "multiplexer; give the service a port of its own", original)
    if proto.startswith("rpc/"):
        return not_carried(where, "Sun RPC service: superd does not register services with "
                                  "the portmapper (rpcbind)", original)
    if "/" in service and not service.startswith("/"):
        return not_carried(where, "a '/' in the service name belongs to RPC (with an rpc/ "
                                  "protocol) or tcpmux; this is neither", original)
    if socktype not in SOCKET_TYPES:
        return not_carried(where, f"socket type {socktype}: superd serves stream and dgram "
                                  "sockets only", original)
    e = Entry(service.rsplit("/", 1)[-1], "", where, original)
    if proto == "unix":
        if not service.startswith("/"):
            return not_carried(where, "a unix socket needs an absolute path", original)
        e.keys["listen"] = service
        e.keys["protocol"] = "unix" if socktype == "stream" else "unix-dgram"
        e.suffix = "unix"
        if host != "*":
            e.note(f"the address {host} does not apply to a unix socket (inetd ignores it too)")
    else:
        transport, family = proto[:3], FAMILIES.get(proto[3:])
        if transport not in ("tcp", "udp") or family is None:
            return not_carried(where, f"protocol {proto}: superd knows tcp, udp (with 4, 6, "
                                      "46, 6only) and unix", original)
        if SOCKET_TYPES[socktype] != transport:
            return not_carried(where, f"{socktype} over {transport} does not exist "
                                      "(inetd refuses it too)", original)
        port = port_of(service, transport)
        if port is None:
            return not_carried(where, f"{service}/{transport} is not in /etc/services and is "
                                      "not a port number", original)
        listen = _listen(e, host, port, family, where)
        if not listen:
            return not_carried(where, f"no usable address in {host}", original)
        e.keys["listen"] = listen[0] if len(listen) == 1 else listen
        if transport == "udp":
            e.keys["protocol"] = "udp"
        e.suffix = "udp" if proto == "udp" else proto
    if bufopts:
        e.drop(where, f",{bufopts}", "superd does not set socket buffer sizes")
    problem = _wait(e, waitspec, where)
    if problem:
        return not_carried(where, problem, original)
    _user(e, userspec, where)
    if server == "internal":
        if service not in INTERNAL:
            return not_carried(where, f"internal service {service!r}: superd's built-ins are "
                                      f"{', '.join(INTERNAL)}", original)
        e.keys["internal"] = service
        return _finish(e, disabled)
    if not server.startswith("/"):
        return not_carried(where, f"server {server!r} is not an absolute path", original)
    argv = argv or [os.path.basename(server)]  # inetd's own rule for an empty argv
    if os.path.basename(server) == "tcpd":
        argv, program = unwrap_tcpd(argv)
        wrap_tcpd(e, server, program)
        set_exec(e, argv, program)
    else:
        set_exec(e, argv, server)
    if socktype == "dgram" and not e.keys.get("wait"):
        e.keys["wait"] = True
        e.note("dgram nowait becomes wait: true: superd hands a datagram socket to one "
               "handler at a time")
    return _finish(e, disabled)


def _finish(e: Entry, disabled: bool) -> Entry:
    if disabled:
        e.keys["disabled"] = True
        e.note("commented out with #<off># (update-inetd): kept, but disabled")
    return e


def _listen(e: Entry, host: str, port: int, family: str, where: str) -> list[str]:
    """inetd's host list (`*`, addresses, names) as superd listen entries."""
    out: list[str] = []
    for h in filter(None, host.split(",")):
        if h == "*":
            addrs = {"any": ["*"], "4": ["0.0.0.0"], "6": ["::"]}[family]
        else:
            try:
                ip = ipaddress.ip_address(h.split("%")[0])
                addrs = [str(ip)]
            except ValueError:
                families = {"any": (socket.AF_INET, socket.AF_INET6), "4": (socket.AF_INET,),
                            "6": (socket.AF_INET6,)}[family]
                addrs = [a for fam in families for a in resolve(h, fam)]
                if addrs:
                    e.note(f"host name {h} resolved now, at import: {', '.join(addrs)}")
                else:
                    e.drop(where, h, "host name does not resolve here (superd does not resolve "
                                     "names: write addresses)")
                    continue
            want = {"any": (4, 6), "4": (4,), "6": (6,)}[family]
            kept = [a for a in addrs if ipaddress.ip_address(a).version in want]
            if len(kept) < len(addrs):
                e.drop(where, h, "address of the other family than the protocol "
                                 "(inetd skips it too)")
            addrs = kept
        for a in addrs:
            text = listen_text(a, port) if a != "::" else f"[::]:{port}"
            if text not in out:
                out.append(text)
    return out


def _wait(e: Entry, spec: str, where: str) -> str | None:
    """`wait`/`nowait`, OpenBSD's `.max` (starts per minute), FreeBSD's `/child/rate/per-ip`."""
    head, *freebsd = spec.split("/")
    mode, dot, limit = head.partition(".")
    if mode not in ("wait", "nowait"):
        return f"{spec!r} is neither wait nor nowait"
    e.keys["wait"] = mode == "wait"
    if dot:
        if not limit.isdigit() or not 0 < int(limit) <= 1_000_000:
            e.drop(where, spec, "the .max part is not a number (inetd uses its default)")
        else:
            e.keys["rate"] = f"{int(limit)}/min"
            e.note(f"{spec}: inetd stops the service for 10 minutes after {limit} starts in a "
                   f"minute; superd's rate {limit}/min pauses accepting until a token is free")
    names = ("instances", "", "per_source")
    for i, value in enumerate(freebsd[:3]):
        if not value.isdigit() or int(value) == 0:
            continue  # FreeBSD: 0 or empty means no limit
        if i == 1:  # FreeBSD's max-connections-per-ip-per-minute
            e.keys["per_source_rate"] = f"{int(value)}/min"
        else:
            e.keys[names[i]] = int(value)
    if len(freebsd) > 3:
        e.drop(where, "/".join(freebsd[3:]), "unknown wait field part")
    return None


def _user(e: Entry, spec: str, where: str) -> None:
    """`user`, `user.group` or `user:group` (inetd tries '.' first), FreeBSD's `/class`."""
    spec, _, login_class = spec.partition("/")
    if login_class:
        e.drop(where, f"/{login_class}", "login classes do not exist in superd; use rlimits")
    sep = "." if "." in spec else ":"
    user, _, group = spec.partition(sep)
    e.keys["user"] = user
    if group:
        e.keys["group"] = group
