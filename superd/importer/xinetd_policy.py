"""xinetd attributes that map to issue 14's keys: TCP wrappers, redirect, the sensor,
log_type, banners, access_times, max_load, IDONLY, the other rlimits and groups.

Called from xinetd.py and xinetd_attrs.py, one function per concern, so that those stay
about parsing. TCP wrappers: Debian's xinetd is built with libwrap and checks every service
against /etc/hosts.allow and /etc/hosts.deny unless `flags = NOLIBWRAP`, by the name
`libwrap = NAME`, else the server's base name (argv[0]'s with NAMEINARGS), else for internal
and redirect services the service name; the import keeps that with `tcp_wrappers`.
"""

from __future__ import annotations

from collections.abc import Callable

from superd.config import FACILITIES
from superd.importer import xinetd_values as xv
from superd.importer.common import Entry
from superd.importer.xinetd_read import Attr

Note = Callable[[str], None]
LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
ATTRIBUTES = ("access_times", "banner", "banner_success", "banner_fail", "log_type",
              "max_load", "deny_time", "libwrap")


def kind(entry: Entry, seen: dict[str, Attr], flags: set[str]) -> bool:
    """redirect and SENSOR services run no server: True when this is one (keys set)."""
    if "SENSOR" in flags or "redirect" in seen:
        for key in ("user", "group"):  # nothing runs: nobody to run it as
            entry.keys.pop(key, None)
    if "SENSOR" in flags:
        entry.keys["sensor"] = True
        deny = seen.get("deny_time")
        value = deny.values[0].lower() if deny and deny.values else ""
        if value in ("forever", "never") or value.isdigit() and int(value) > 0:
            entry.keys["deny_time"] = int(value) if value.isdigit() else value
        else:
            entry.keys["deny_time"] = "never"
            entry.note("SENSOR without a deny_time only logs under xinetd: deny_time: never")
        entry.note("SENSOR: whoever connects is refused by every service superd accepts for "
                   "(xinetd also guarded its UDP services; superd bans TCP callers only)")
        return True
    if "redirect" in seen:
        host, port = (seen["redirect"].values + ["", ""])[:2]
        entry.keys["redirect"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return True
    return False


def attribute(entry: Entry, a: Attr) -> None:
    """One of ATTRIBUTES on a service (deny_time is read by `kind`)."""
    v = a.values
    if a.name == "access_times":
        entry.keys["access_times"] = v
    elif a.name.startswith("banner"):
        entry.keys[a.name] = v[0]
    elif a.name == "max_load":
        try:
            entry.keys["max_load"] = float(v[0])
        except ValueError:
            entry.drop(a.where, a.text, "not a load average")
    elif a.name == "log_type":
        log_type(entry.keys, entry.drop, a)
    elif a.name == "libwrap":
        entry.keys["tcp_wrappers"] = v[0]
    elif a.name == "deny_time" and "sensor" not in entry.keys:
        entry.drop(a.where, a.text, "goes with flags = SENSOR")


def log_type(keys: dict, drop: xv.Drop, a: Attr) -> None:
    """SYSLOG facility [level] -> syslog_facility/level; FILE path [soft [hard]] -> log_file."""
    words = a.values
    if words and words[0].upper() == "SYSLOG" and len(words) in (2, 3) and \
            words[1] in FACILITIES and (len(words) == 2 or words[2] in LEVELS):
        keys["syslog_facility"] = words[1]
        if len(words) == 3:
            keys["syslog_level"] = words[2]
    elif words and words[0].upper() == "FILE" and len(words) in (2, 3, 4) and \
            words[1].startswith("/"):
        keys["log_file"] = words[1]
        sizes = [xv.rlimit([w]) for w in words[2:]]
        if any(not isinstance(s, int) for s in sizes):
            drop(a.where, a.text, "the limits must be sizes (K and M allowed)")
        elif sizes:
            keys["log_file_limits"] = sizes
    else:
        drop(a.where, a.text, "expected SYSLOG facility [level] or FILE path [soft [hard]]")


def wrappers(entry: Entry, name: str, flags: set[str], wait: bool, udp: bool) -> None:
    """tcp_wrappers as xinetd's libwrap applied it (see the module docstring)."""
    if "NOLIBWRAP" in flags or entry.keys.get("sensor"):
        entry.keys.pop("tcp_wrappers", None)
        return
    if wait or udp:
        entry.keys.pop("tcp_wrappers", None)
        entry.note("xinetd's libwrap checked hosts.allow/hosts.deny for it too; superd's "
                   "tcp_wrappers applies to the connections it accepts itself, not to a wait "
                   "or UDP service: write such rules as only_from / no_access")
        return
    if "tcp_wrappers" in entry.keys:
        return
    if "internal" in entry.keys or "redirect" in entry.keys:
        entry.keys["tcp_wrappers"] = name  # xinetd goes by the service name for those
    else:
        entry.keys["tcp_wrappers"] = True  # the server's (or argv[0]'s) base name, as xinetd


def flag(entry: Entry, name: str) -> bool:
    """IDONLY -> ident: required. True when handled."""
    if name == "IDONLY":
        entry.keys["ident"] = "required"
        return True
    return False


def groups(keys: dict, a: Attr, note: Note, drop: xv.Drop) -> None:
    """groups = yes: the user's supplementary groups (superd's default); no: none."""
    got = xv.yes_no(a.values)
    if got is None:
        drop(a.where, a.text, "expected yes or no")
    elif got:
        note("groups = yes: superd sets the supplementary groups of user (its default)")
    else:
        keys["groups"] = []


def default_attribute(dflt: dict, note: Note, drop: xv.Drop, a: Attr) -> bool:
    """The attributes of a `defaults` block that become superd defaults; True if handled."""
    if a.name.startswith("banner") and a.values:
        dflt[a.name] = a.values[0]
    elif a.name == "max_load" and a.values:
        try:
            dflt["max_load"] = float(a.values[0])
        except ValueError:
            drop(a.where, a.text, "not a load average")
    elif a.name == "groups":
        groups(dflt, a, note, drop)
    else:
        return False
    return True
