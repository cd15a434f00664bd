"""inetd.conf in, a `Translation` out (OpenBSD inetd as Debian ships it, plus the common dialects).

One line, `service socket-type protocol wait/nowait[.max] user[:group] server argv...`, becomes
one superd service. What the line means follows Debian's openbsd-inetd: `tcp4`/`tcp6` listen on
one family, `addr:` alone on a line sets the address of the lines after it, a line starting with
a blank continues the one before, `nowait.N` caps starts per minute. Plain `tcp`/`udp` depends on
the dialect (inetd_dialect.py: both families for Debian 12, IPv4 for the others). FreeBSD's
`nowait/max-child/per-ip-rate/max-child-per-ip`, `:user:group:mode:/path` and `#@` IPsec lines,
inetutils' `tcp6only` and directory of files, and Debian update-inetd's `#<off>#` (a disabled
entry) are understood too. Anything superd cannot do stays in the output as a comment that says
why.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterator

from superd.fields import INTERNAL
from superd.importer import inetd_dialect as dialect
from superd.importer.common import (
    STDERR_HEADER,
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
SOCKET_TYPES = {"stream": "tcp", "dgram": "udp", "seqpacket": "seqpacket"}
UNIX_TYPES = {"stream": "unix", "dgram": "unix-dgram", "seqpacket": "unix-seqpacket"}


def translate(path: str, flavour: str | None = None) -> Translation:
    """Read an inetd.conf, or a directory of them (inetutils' /etc/inetd.d); raise OSError
    when it cannot be read. `flavour`: which inetd's reading (inetd_dialect), else detected."""
    files = dialect.files_of(path)
    texts = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as f:
            texts.append((file, f.read().splitlines()))
    why = "given with --flavour"
    if flavour is None:
        flavour, why = dialect.detect([line for _, lines in texts for line in lines])
    t = Translation("inetd", path, header=[
        f"superd service table imported from {path} by `superd import inetd`.",
        "Each service shows the inetd.conf line it came from. `note:` lines say where superd",
        "behaves differently; `not carried over:` lines are what superd cannot do, and why.",
        f"Read as {dialect.LABELS[flavour]} reads it ({why}).",
        "A service run through tcpd gets tcp_wrappers (superd reads /etc/hosts.allow and",
        "/etc/hosts.deny itself); `inetd -l` (FreeBSD -w/-W) wrapped every service: add",
        "tcp_wrappers: true to each then.", *STDERR_HEADER,
        "See docs/migrating.md for the whole mapping.",
    ])
    for file, lines in texts:
        first = len(t.items)
        if len(files) > 1 or file != path:
            t.items.append(Remark([f"from {file}:"]))
        _read_file(t, lines, os.path.basename(file), flavour, why)
        for item in t.items[first:]:
            item.file = os.path.basename(file)
    return t


def _read_file(t: Translation, lines: list[str], short: str, flavour: str, why: str) -> None:
    pending: list[str] = []  # comments waiting to see whether an entry follows them
    default_host = "*"
    for number, text, disabled, comments in _logical_lines(lines, pending, t, short):
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
        item = _entry(where, text.strip(), host or default_host, service, rest, disabled,
                      flavour)
        if isinstance(item, Entry):
            item.comments = comments
            proto = rest[1].split(",")[0] if len(rest) > 1 else ""
            if proto in ("tcp", "udp"):  # the one field the dialects read differently
                item.note(dialect.plain_note(proto, flavour, why))
        else:
            item.lines[:0] = comments
        t.items.append(item)
    if pending:
        t.items.append(Remark(pending))


def _logical_lines(lines: list[str], pending: list[str], t: Translation,
                   short: str) -> Iterator[tuple[int, str, bool, list[str]]]:
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
        if stripped.startswith("#@"):  # FreeBSD: not a comment but an IPsec policy
            if pending:
                t.items.append(Remark(pending[:]))
                pending.clear()
            t.items.append(dialect.ipsec(f"{short}:{number}", stripped))
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
           disabled: bool, flavour: str = "debian") -> Entry | Remark:
    """One inetd.conf entry as a superd service, or a comment saying why it cannot be one."""
    original = [("#<off># " if disabled else "") + text]
    if len(rest) < 5:
        return not_carried(where, "too few fields (inetd skips this line too)", original)
    socktype, proto, waitspec, userspec, server, *argv = rest
    proto, _, bufopts = proto.partition(",")
    problem = _kind_problem(service, socktype, proto)
    if problem:
        return not_carried(where, problem, original)
    e = Entry(service.rsplit("/", 1)[-1], "", where, original)
    problem = _address(e, host, service, socktype, proto, where, flavour)
    if problem:
        return not_carried(where, problem, original)
    if bufopts:
        dialect.buffers(e, bufopts, where)
    problem = _wait(e, waitspec, where)
    if problem:
        return not_carried(where, problem, original)
    _user(e, userspec, where)
    problem = _server(e, service, socktype, proto, server, argv, flavour)
    if problem:
        return not_carried(where, problem, original)
    return _finish(e, disabled)


def _kind_problem(service: str, socktype: str, proto: str) -> str | None:
    """Why superd cannot serve this kind of entry at all (tcpmux, RPC...), or None."""
    if service.startswith("tcpmux/"):
        return ("TCPMUX (RFC 1078) services: superd has no tcpmux multiplexer; give the "
                "service a port of its own")
    if proto.startswith("rpc/"):
        return "Sun RPC service: superd does not register services with the portmapper (rpcbind)"
    if "/" in service and not service.startswith("/"):
        return ("a '/' in the service name belongs to RPC (with an rpc/ protocol) or tcpmux; "
                "this is neither")
    if socktype not in SOCKET_TYPES:
        return (f"socket type {socktype}: superd serves stream, dgram and (on unix sockets) "
                "seqpacket sockets only")
    return None


def _address(e: Entry, host: str, service: str, socktype: str, proto: str, where: str,
             flavour: str) -> str | None:
    """Where the service listens (listen, protocol); a reason when it cannot be said."""
    if proto == "unix":
        if not service.startswith("/"):
            return "a unix socket needs an absolute path"
        e.keys["listen"] = service
        e.keys["protocol"] = UNIX_TYPES[socktype]
        e.suffix = "unix"
        return dialect.unix_file(e, host, flavour)
    transport, family = proto[:3], dialect.family(proto[3:], flavour)
    if transport not in ("tcp", "udp") or family is None:
        return f"protocol {proto}: superd knows tcp, udp (with 4, 6, 46, 6only) and unix"
    if SOCKET_TYPES[socktype] != transport:
        return f"{socktype} over {transport} does not exist (inetd refuses it too)"
    port = port_of(service, transport)
    if port is None:
        return f"{service}/{transport} is not in /etc/services and is not a port number"
    listen = _listen(e, host, port, family, where)
    if not listen:
        return f"no usable address in {host}"
    e.keys["listen"] = listen[0] if len(listen) == 1 else listen
    if transport == "udp":
        e.keys["protocol"] = "udp"
    e.suffix = "udp" if proto == "udp" else proto
    return None


def _server(e: Entry, service: str, socktype: str, proto: str, server: str, argv: list[str],
            flavour: str) -> str | None:
    """What runs: a built-in, or a program (through tcpd or not); a reason when nothing can."""
    if server == "internal":
        name = dialect.internal_name(service, proto, flavour)
        if name not in INTERNAL:
            return (f"internal service {service!r}: superd's built-ins are "
                    f"{', '.join(INTERNAL)}" + (" (on a unix socket FreeBSD's inetd takes the "
                                                "last part of the path: --flavour freebsd)"
                                                if proto == "unix" else ""))
        e.keys["internal"] = name
        return None
    if not server.startswith("/"):
        return f"server {server!r} is not an absolute path"
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
    return None


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
