"""xinetd service attributes that need no other attribute to be understood: limits, process
attributes, flags, env, and those superd has no equivalent for (each with its reason).

Shared by service blocks and the defaults block, which is why the callbacks `note` and `drop`
are passed in: the comment lands where the attribute was written.
"""

from __future__ import annotations

from collections.abc import Callable

from superd.importer import xinetd_policy as xp
from superd.importer import xinetd_values as xv
from superd.importer.common import Entry
from superd.importer.xinetd_read import Attr

Note = Callable[[str], None]

DROPPED = {
    "mdns": "superd does not register services with mDNS",
    "leaky_bucket": "use superd's rate (a token bucket)",
    "rpc_version": "only for RPC services",
    "rpc_number": "only for RPC services",
}
SOCKET_FLAGS = {"NODELAY": "nodelay", "KEEPALIVE": "keepalive"}
FLAGS = {
    "REUSE": (False, "superd always sets SO_REUSEADDR"),
    "NOLIBWRAP": (False, "no tcp_wrappers for this service"),
    "NORETRY": (False, "superd never retries a start that failed (it logs FAIL and closes)"),
    "INTERCEPT": (True, "superd does not interpose on a wait service's traffic"),
    "LABELED": (True, "superd does not switch SELinux contexts"),
}


def other(entry: Entry, seen: dict[str, Attr], flags: set[str]) -> None:
    """Limits, process attributes, flags and what superd has no equivalent for."""
    for name, a in seen.items():
        v = a.values
        if name in DROPPED:
            entry.drop(a.where, a.text, DROPPED[name])
        elif name in xp.ATTRIBUTES:
            xp.attribute(entry, a)
        elif name in ("instances", "per_source"):
            got = xv.count(v)
            if got is None:
                entry.drop(a.where, a.text, "expected a number or UNLIMITED")
            else:
                entry.keys[name] = got
                if name == "instances" and got != "unlimited":
                    entry.note("over instances xinetd accepted and closed connections; superd "
                               "queues them (on_limit: queue; on_limit: refuse is xinetd's way)")
        elif name == "cps":
            cps(entry.keys, entry.note, entry.drop, a)
        elif name == "umask" and xv.umask(v) is not None:
            entry.keys["umask"] = xv.umask(v)
        elif name == "nice" and len(v) == 1 and v[0].lstrip("-").isdigit() \
                and -20 <= int(v[0]) <= 19:
            entry.keys["nice"] = int(v[0])
        elif name in xv.RLIMITS and xv.rlimit(v) is not None:
            entry.keys.setdefault("rlimits", {})[xv.RLIMITS[name]] = xv.rlimit(v)
        elif name == "groups":
            xp.groups(entry.keys, a, entry.note, entry.drop)
        elif name == "disable" and xv.yes_no(v) is not None:
            if xv.yes_no(v):
                entry.keys["disabled"] = True
        elif name in ("umask", "nice", "disable") or name in xv.RLIMITS or (
                name == "v6only" and xv.yes_no(v) is None):
            entry.drop(a.where, a.text, "not a value xinetd accepts either")
    for flag in sorted(flags):
        if xp.flag(entry, flag):
            continue
        if flag == "DISABLE":
            entry.keys["disabled"] = True
        elif flag in SOCKET_FLAGS:
            socket_flag(entry, seen["flags"], flag)
        elif flag in FLAGS:
            dropped, why = FLAGS[flag]
            (entry.drop(seen["flags"].where, f"flags {flag}", why) if dropped
             else entry.note(f"flags {flag}: {why}"))
        elif flag not in ("IPV4", "IPV6", "NAMEINARGS", "SENSOR"):
            entry.drop(seen["flags"].where, f"flags {flag}", "not an xinetd flag")


def socket_flag(entry: Entry, flags: Attr, flag: str) -> None:
    """NODELAY and KEEPALIVE: xinetd sets them on a TCP service's connections; so does superd
    (on the listening socket, from which Linux copies them)."""
    if entry.keys.get("protocol", "tcp") != "tcp":
        entry.drop(flags.where, f"flags {flag}", "a TCP option: xinetd sets it on TCP "
                                                 "services only")
        return
    entry.keys[SOCKET_FLAGS[flag]] = True


def cps(keys: dict, note: Note, drop: xv.Drop, a: Attr) -> None:
    """cps N T -> rate N/s; the T-second shutdown has no equivalent, and the note says so."""
    got = xv.rate(a.values)
    if got is None:
        drop(a.where, a.text, "expected cps = CONNECTIONS SECONDS")
        return
    keys["rate"] = got
    note(f"cps {' '.join(a.values)}: xinetd turned the service off for {a.values[1]} s when "
         f"more than {a.values[0]} connections came in a second; superd's rate {got} pauses "
         "accepting until a token is free (no connection is refused)")


def env(entry: Entry, environ: dict[str, str], a: Attr) -> None:
    """env = NAME=value...: '=' replaces, '+=' adds (xinetd has no '-=' for env)."""
    if a.op == "-=":
        entry.drop(a.where, a.text, "xinetd does not take -= for env either")
        return
    if a.op == "=":
        environ.clear()
    for item in a.values:
        name, eq, value = item.partition("=")
        if eq and name:
            environ[name] = value
        else:
            entry.drop(a.where, item, "expected NAME=value")
