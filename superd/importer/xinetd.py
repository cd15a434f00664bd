"""xinetd.conf, its includes and its defaults block in, a `Translation` out.

Semantics follow xinetd 2.3.15: a service inherits the set-valued attributes (only_from,
no_access, log_on_*, passenv) of the defaults read *before* it, and '+=' / '-=' change that
copy while '=' replaces it; in defaults '=' adds. Single-valued attributes are taken once (a
second one is ignored, as xinetd ignores it). Without flags or bind a service listens on IPv6
and IPv4 alike (xinetd binds a dual-stack IPv6 socket). argv[0] is the last part of `server`,
or the first word of `server_args` with NAMEINARGS. The defaults that superd also has become
`defaults:`; `bind`, `v6only`, `enabled` and `disabled` are applied to each service instead.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field

from superd.config import FACILITIES
from superd.fields import INTERNAL
from superd.importer import xinetd_policy as xp
from superd.importer import xinetd_values as xv
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
from superd.importer.xinetd_attrs import DROPPED, cps, env, other
from superd.importer.xinetd_read import Attr, Block, Reader

SETS = ("only_from", "no_access", "log_on_success", "log_on_failure", "passenv")
# how many words an attribute takes; the others take any number
NVALUES = {name: 1 for name in (
    "socket_type", "protocol", "wait", "user", "group", "server", "instances", "rpc_version",
    "rpc_number", "id", "port", "nice", "banner", "bind", "interface", "per_source", "groups",
    "banner_success", "banner_fail", "disable", "max_load", "rlimit_as", "rlimit_cpu",
    "rlimit_data", "rlimit_files", "rlimit_rss", "rlimit_stack", "v6only", "deny_time", "umask",
    "libwrap", "mdns")} | {"cps": 2, "redirect": 2, "leaky_bucket": 4}
DEFAULT_SETS = SETS + ("disabled", "enabled", "log_type")
DEFAULT_FIXED = ("instances", "per_source", "umask", "cps", "groups", "bind", "interface",
                 "v6only", "banner", "banner_success", "banner_fail", "max_load",
                 "leaky_bucket")
SERVICE_FIXED = (
    "socket_type", "protocol", "wait", "user", "group", "server", "server_args", "instances",
    "log_type", "access_times", "type", "rpc_version", "rpc_number", "id", "port", "flags",
    "nice", "redirect", "banner", "bind", "interface", "per_source", "groups",
    "banner_success", "banner_fail", "cps", "leaky_bucket", "disable", "max_load",
    "rlimit_as", "rlimit_cpu", "rlimit_data", "rlimit_files", "rlimit_rss", "rlimit_stack",
    "v6only", "deny_time", "umask", "libwrap", "mdns")


@dataclass
class Svc:
    """A service block on its way to becoming an Entry."""

    entry: Entry
    block: Block
    port: int
    v4: bool
    v6: bool
    bind: Attr | None = None
    v6only: bool | None = None
    sets: dict[str, list[str] | None] = field(default_factory=dict)


@dataclass
class Defaults:
    fixed: dict[str, Attr] = field(default_factory=dict)
    sets: dict[str, list[str]] = field(default_factory=dict)


def translate(path: str) -> Translation:
    """Read xinetd.conf (or a directory of service files); OSError if it cannot be read."""
    reader = Reader(path)
    if os.path.isdir(path):
        reader._include("includedir", os.path.abspath(path), path, path, f"includedir {path}",
                        ())
    else:
        reader.read(path)
    t = Translation("xinetd", path, header=[
        f"superd service table imported from {path} by `superd import xinetd`.",
        "Each service shows the xinetd entry it came from. `note:` lines say where superd",
        "behaves differently; `not carried over:` lines are what superd cannot do, and why.",
        "xinetd built with libwrap (Debian's is) applied /etc/hosts.allow and /etc/hosts.deny",
        "to every service: so does superd, with tcp_wrappers (flags = NOLIBWRAP turns it off).",
        *STDERR_HEADER, "See docs/migrating.md for the whole mapping.",
    ])
    d = Defaults()
    svcs: list[Svc] = []
    for item in reader.items:
        if isinstance(item, Remark):
            t.items.append(item)
        elif item.kind == "defaults":
            if item.comments:
                t.items.append(Remark(item.comments))
            _read_defaults(t, d, item)
        else:
            got = _service(item, d)
            if isinstance(got, Svc):
                t.items.append(got.entry)
                svcs.append(got)
            else:
                got.lines[:0] = item.comments
                got.file = item.where.rsplit(":", 1)[0]  # for --split
                t.items.append(got)
    _finish(t, d, svcs)
    return t


def _read_defaults(t: Translation, d: Defaults, block: Block) -> None:
    def drop(where: str, what: str, why: str) -> None:
        t.defaults_dropped.append(f"{where}: {what} -- {why}")

    t.defaults_notes.append(f"from {block.where}: defaults")
    for problem in block.broken:
        drop(problem.split(": ", 1)[0], "defaults", problem.split(": ", 1)[1])
    for a in block.attrs:
        if a.name in DEFAULT_SETS:
            op = "+=" if a.op == "=" else a.op  # in defaults '=' adds
            d.sets[a.name] = xv.apply_op(d.sets.get(a.name), op, a.values)
            if a.name in ("only_from", "no_access"):
                xv.acl(a.values, a.where, drop, a.name)
            elif a.name.startswith("log_on_"):
                xv.log_fields(a.values, a.name == "log_on_success", a.where, drop, a.name)
        elif a.name not in DEFAULT_FIXED:
            drop(a.where, a.text, "xinetd does not take this attribute in defaults (it "
                                  "ignores it)")
        elif len(a.values) != NVALUES.get(a.name, len(a.values)):
            drop(a.where, a.text, f"xinetd expects {NVALUES[a.name]} value(s) here (it ignores "
                                  "this)")
        elif a.name in d.fixed or a.name in ("bind", "interface") and (
                "bind" in d.fixed or "interface" in d.fixed):
            drop(a.where, a.text, "given twice: xinetd keeps the first")
        else:
            d.fixed[a.name] = a


def _service(block: Block, d: Defaults) -> Svc | Remark:
    """Phase one: everything that does not depend on defaults read later."""
    entry = Entry(block.name, "", block.where, [block.text[0]], comments=block.comments,
                  inner=block.inner)
    sets, seen = _attributes(block, d, entry)

    def one(name: str) -> str:
        a = seen.get(name)
        return a.values[0] if a and a.values else ""

    types = {v.upper() for v in seen["type"].values} if "type" in seen else set()
    flags = {v.upper() for v in seen["flags"].values} if "flags" in seen else set()
    socktype = one("socket_type") or {"tcp": "stream", "udp": "dgram"}.get(one("protocol"), "")
    transport = {"stream": "tcp", "dgram": "udp"}.get(socktype)
    problem = _kind_problem(seen, types, flags)
    if problem:
        return not_carried(block.where, problem, block.text)
    if transport is None or one("protocol") not in ("", transport):
        return not_carried(block.where, f"socket_type {socktype or '(none)'} with protocol "
                           f"{one('protocol') or '(none)'}: superd serves stream/tcp and "
                           "dgram/udp", block.text)
    listed = port_of(block.name, transport) if not block.name.isdigit() else None
    port = int(one("port")) if one("port").isdigit() and 0 < int(one("port")) < 65536 else None
    if "port" in seen and port is None:
        entry.drop(seen["port"].where, seen["port"].text, "not a port number")
    if port is None and ("UNLISTED" in types or listed is None):
        return not_carried(block.where, f"no port: {block.name}/{transport} is not in "
                                        "/etc/services and no usable port attribute", block.text)
    if port is not None and listed is not None and port != listed and "UNLISTED" not in types:
        entry.keys["disabled"] = True
        entry.note(f"xinetd refuses this entry: {block.name} is port {listed} in /etc/services, "
                   f"not {port}; kept, disabled")
    svc = Svc(entry, block, port or listed or 0, "IPV4" in flags, "IPV6" in flags,
              seen.get("bind") or seen.get("interface"), xv.yes_no(seen["v6only"].values)
              if "v6only" in seen else None, sets)
    entry.base = one("id") or block.name
    entry.suffix = "udp" if transport == "udp" else ""
    if transport == "udp":
        entry.keys["protocol"] = "udp"
    for broken in block.broken:
        entry.keys["disabled"] = True
        entry.note(f"xinetd rejects this entry ({broken}); kept, disabled")
    problem = _run(entry, block.name, seen, types, flags, socktype)
    if problem:
        return not_carried(block.where, problem, block.text)
    other(entry, seen, flags)
    xp.wrappers(entry, block.name, flags, bool(entry.keys.get("wait")), transport == "udp")
    return svc


def _attributes(block: Block, d: Defaults, entry: Entry
                ) -> tuple[dict[str, list[str] | None], dict[str, Attr]]:
    """The block's attributes as xinetd takes them: the sets (copied from the defaults read so
    far, then changed), and the single-valued ones, each the first usable one given. What
    xinetd ignores is dropped on `entry`; `env` goes straight into it."""
    sets: dict[str, list[str] | None] = {k: (list(d.sets[k]) if k in d.sets else None)
                                         for k in SETS}
    environ: dict[str, str] = {}
    seen: dict[str, Attr] = {}
    for a in block.attrs:
        if a.name in SETS:
            sets[a.name] = xv.apply_op(sets[a.name], a.op, a.values)
            if a.name in ("only_from", "no_access"):
                xv.acl(a.values, a.where, entry.drop, a.name)
            elif a.name.startswith("log_on_"):
                xv.log_fields(a.values, a.name == "log_on_success", a.where, entry.drop, a.name)
        elif a.name == "env":
            env(entry, environ, a)
        elif a.name not in SERVICE_FIXED:
            entry.drop(a.where, a.text, "not an xinetd service attribute (xinetd ignores it)")
        elif a.op != "=":
            entry.drop(a.where, a.text, f"xinetd takes only '=' for {a.name} (it ignores this)")
        elif len(a.values) != NVALUES.get(a.name, len(a.values)):
            entry.drop(a.where, a.text, f"xinetd expects {NVALUES[a.name]} value(s) here (it "
                                        "ignores this)")
        elif a.name in seen or a.name in ("bind", "interface") and (
                "bind" in seen or "interface" in seen):
            entry.drop(a.where, a.text, "given twice: xinetd keeps the first")
        else:
            seen[a.name] = a
    if environ:
        entry.keys["env"] = environ
    return sets, seen


def _kind_problem(seen: dict[str, Attr], types: set[str], flags: set[str]) -> str | None:
    """Why superd cannot serve this kind of service at all (RPC, TCPMUX, ...), or None."""
    if "RPC" in types:
        return "Sun RPC service: superd does not register services with the portmapper (rpcbind)"
    if types & {"TCPMUX", "TCPMUXPLUS"}:
        return ("TCPMUX (RFC 1078): superd has no tcpmux multiplexer; give the service a port "
                "of its own")
    return None


def _run(entry: Entry, name: str, seen: dict[str, Attr], types: set[str], flags: set[str],
         socktype: str) -> str | None:
    """What runs and how: internal or exec, wait, user/group. A reason when nothing can."""
    values = {k: a.values for k, a in seen.items()}
    wait = xv.yes_no(values.get("wait", []))
    if wait is None:
        wait = socktype == "dgram"
        entry.keys["disabled"] = True
        entry.note("xinetd refuses an entry without wait = yes or no; kept, disabled")
    if socktype == "dgram" and not wait:
        wait = True
        entry.keys["disabled"] = True
        entry.note("xinetd refuses dgram with wait = no; written as wait: true, disabled")
    entry.keys["wait"] = wait
    for key in ("user", "group"):
        if values.get(key):
            v = values[key][0]
            entry.keys[key] = int(v) if v.isdigit() else v
    if xp.kind(entry, seen, flags):
        return None  # a redirect or a sensor: no server to run
    if "INTERNAL" in types:
        if name not in INTERNAL:
            return (f"xinetd's built-in {name!r}: superd's built-ins are {', '.join(INTERNAL)}"
                    + ("; `superd status` lists services" if name in ("servers", "services")
                       else ""))
        entry.keys["internal"] = name
        return None
    server = (values.get("server") or [""])[0]
    if not server.startswith("/"):
        return "no absolute server path to run"
    if "user" not in entry.keys:
        entry.keys["disabled"] = True
        entry.note("xinetd refuses an entry without user (when it runs as root); kept, disabled")
    args = values.get("server_args", [])
    if "NAMEINARGS" in flags and args:
        argv, program = (unwrap_tcpd(args) if os.path.basename(server) == "tcpd"
                         else (args, server))
        if program != server:
            wrap_tcpd(entry, server, program)
    else:
        if "NAMEINARGS" in flags:
            entry.keys["disabled"] = True
            entry.note("xinetd refuses NAMEINARGS without server_args; kept, disabled")
        argv, program = [os.path.basename(server)] + args, server
    set_exec(entry, argv, program)
    return None


def _finish(t: Translation, d: Defaults, svcs: list[Svc]) -> None:
    """Phase two: the defaults block as superd defaults, then listen, ACLs and logs."""
    def drop(where: str, what: str, why: str) -> None:
        t.defaults_dropped.append(f"{where}: {what} -- {why}")

    def note(text: str) -> None:
        t.defaults_notes.append(text)

    dflt = t.defaults
    for name, a in d.fixed.items():
        if name in ("instances", "per_source") and xv.count(a.values) is not None:
            dflt[name] = xv.count(a.values)
            if name == "instances" and dflt[name] != "unlimited":
                note("over instances xinetd accepted and closed connections; superd queues "
                     "them (on_limit: queue; on_limit: refuse is xinetd's way)")
        elif name == "umask" and xv.umask(a.values) is not None:
            dflt["umask"] = xv.umask(a.values)
        elif name == "cps":
            cps(dflt, note, drop, a)
        elif xp.default_attribute(dflt, note, drop, a):
            pass
        elif name in ("bind", "interface", "v6only"):
            note(f"{a.text}: applied to the listen address of every service")
        else:
            drop(a.where, a.text, DROPPED.get(name, "not a value xinetd accepts either"))
    words = d.sets.get("log_type", [])
    if words:
        if words[0].upper() == "SYSLOG" and len(words) > 1 and words[1] in FACILITIES:
            t.settings["syslog"] = {"facility": words[1]}
            note(f"log_type = {' '.join(words)}: settings.syslog.facility"
                 + (", and syslog_level for every service" if len(words) > 2 else ""))
            if len(words) > 2 and words[2] in xp.LEVELS:
                dflt["syslog_level"] = words[2]
        else:
            xp.log_type(dflt, drop, Attr("log_type", "=", words, "defaults",
                                         f"log_type = {' '.join(words)}"))
    acl, _ = xv.acl_keys(d.sets.get("only_from"), d.sets.get("no_access"))
    dflt.update(acl)
    for key in ("log_on_success", "log_on_failure"):
        if key in d.sets:
            dflt[key] = xv.log_fields(d.sets[key], key == "log_on_success", "", xv.QUIET, "")
    if "passenv" in d.sets:
        dflt["passenv"] = d.sets["passenv"]
    for s in svcs:
        _finish_service(s, d, dflt)


def _finish_service(s: Svc, d: Defaults, dflt: dict) -> None:
    e = s.entry
    bind = s.bind or d.fixed.get("bind") or d.fixed.get("interface")
    v6only = s.v6only if s.v6only is not None else (
        xv.yes_no(d.fixed["v6only"].values) if "v6only" in d.fixed else None)
    host = "*"
    if bind and bind.values:
        host = bind.values[0]
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            addrs = resolve(host, socket.AF_INET6 if s.v6 else socket.AF_INET)
            e.note(f"bind {host} resolved now, at import: {addrs[0] if addrs else 'nothing'}")
            host = addrs[0] if addrs else "*"
    if host in ("0.0.0.0", "::"):
        host = "*" if host == "::" and not v6only else host
    if host == "*" and s.v4 and not s.v6:
        host = "0.0.0.0"
    elif host == "*" and v6only:
        host = "::"
    e.keys["listen"] = f"[::]:{s.port}" if host == "::" else listen_text(host, s.port)
    acl, _ = xv.acl_keys(s.sets["only_from"], s.sets["no_access"])
    for key in ("only_from", "no_access"):
        if acl.get(key, []) != dflt.get(key, []):
            e.keys[key] = acl.get(key, [])
    for key in ("log_on_success", "log_on_failure"):
        fields = s.sets[key]
        if fields is not None:
            got = xv.log_fields(fields, key == "log_on_success", "", xv.QUIET, "")
            if got != dflt.get(key):
                e.keys[key] = got
    if (s.sets["passenv"] or []) != dflt.get("passenv", []):
        e.keys["passenv"] = s.sets["passenv"] or []
    e.dropped.sort(key=_line_of)
    ident = e.base
    if "enabled" in d.sets and ident not in d.sets["enabled"]:
        e.keys["disabled"] = True
        e.note(f"defaults' enabled does not list {ident}: disabled")
    if ident in d.sets.get("disabled", []):
        e.keys["disabled"] = True
        e.note(f"defaults' disabled lists {ident}: disabled")


def _line_of(text: str) -> tuple[str, int]:
    """Sort key for `FILE:LINE: ...` comments: in the order of the input."""
    file, _, rest = text.partition(":")
    number = rest.split(":", 1)[0]
    return file, int(number) if number.isdigit() else 0
