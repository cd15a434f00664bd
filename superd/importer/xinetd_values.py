"""xinetd attribute values as superd values: counts, umask, rates, rlimits, ACLs, log fields.

Each converter takes the attribute's words and a `drop(where, what, why)` callback for the part
that cannot be carried over, so the caller decides where that comment goes (the service, or the
defaults block). A conversion that fails entirely returns None.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from superd.hostpatterns import is_name

Drop = Callable[[str, str, str], None]


def _quiet(where: str, what: str, why: str) -> None:
    """A drop callback for values already reported once."""


QUIET: Drop = _quiet

SUCCESS = {"PID": "pid", "HOST": "host", "EXIT": "exit", "DURATION": "duration",
           "TRAFFIC": "traffic", "USERID": "userid"}
FAILURE = {"HOST": "host", "ATTEMPT": "attempt", "USERID": "userid"}
RLIMITS = {"rlimit_as": "as", "rlimit_cpu": "cpu", "rlimit_files": "nofile", "rlimit_data": "data",
           "rlimit_rss": "rss", "rlimit_stack": "stack"}
FACTORIZED = re.compile(r"(\d{1,3}(?:\.\d{1,3}){0,2})\.\{(\d{1,3}(?:,\d{1,3})*)\}")


def count(values: list[str]) -> int | str | None:
    """instances / per_source: a number or UNLIMITED."""
    if len(values) != 1:
        return None
    if values[0].upper() == "UNLIMITED":
        return "unlimited"
    if values[0].isdigit() and 0 < int(values[0]) <= 1_000_000:
        return int(values[0])
    return None


def umask(values: list[str]) -> str | None:
    if len(values) == 1 and re.fullmatch(r"[0-7]{1,4}", values[0]) and int(values[0], 8) < 0o1000:
        return f"{int(values[0], 8):03o}"
    return None


def rate(values: list[str]) -> str | None:
    """cps N T: N connections a second (T, the pause after, has no equivalent)."""
    if len(values) == 2 and values[0].isdigit() and 0 < int(values[0]) <= 1_000_000:
        return f"{int(values[0])}/s"
    return None


def rlimit(values: list[str]) -> int | str | None:
    """A number of bytes (K or M allowed), seconds or files; or UNLIMITED."""
    if len(values) != 1:
        return None
    m = re.fullmatch(r"(\d+)([KkMm]?)", values[0])
    if values[0].upper() == "UNLIMITED":
        return "unlimited"
    if not m:
        return None
    return int(m[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[m[2].lower()]


def yes_no(values: list[str]) -> bool | None:
    if len(values) == 1 and values[0].lower() in ("yes", "no"):
        return values[0].lower() == "yes"
    return None


def acl_token(token: str) -> list[str] | str:
    """One only_from/no_access word as addresses/CIDRs, or the reason it cannot be one.

    xinetd's forms: a.b.c.d (trailing zero parts are wildcards: 10.1.0.0 is 10.1/16, 0.0.0.0
    is everything), a.b.{c,d} (factorized), CIDR, IPv6; host names and .domains (kept as
    they are: superd looks them up; a name from /etc/networks is taken as a host name).
    """
    m = FACTORIZED.fullmatch(token)
    if m:
        head = m[1].split(".")
        bits = 8 * (len(head) + 1)
        out = []
        for last in m[2].split(","):
            parts = head + [last] + ["0"] * (3 - len(head))
            try:
                out.append(str(ipaddress.ip_network(f"{'.'.join(parts)}/{bits}", strict=False)))
            except ValueError:
                return f"{token} is not a valid factorized address"
        return out
    try:
        if "/" in token:
            return [str(ipaddress.ip_network(token, strict=False))]
        ip = ipaddress.ip_address(token)
    except ValueError:
        if is_name(token):
            return [token]  # a host name or .domain: superd looks it up (a network name of
        return f"{token} is not an address, a CIDR or a host name"  # /etc/networks too)
    if ip.version == 6:
        return [str(ip)]
    trailing = 0
    for octet in reversed(token.split(".")):
        if octet.strip("0") or trailing == 4:
            break
        trailing += 1
    return [str(ipaddress.ip_network(f"{ip}/{32 - 8 * trailing}", strict=False))]


def acl(tokens: list[str], where: str, drop: Drop, what: str) -> list[str]:
    out: list[str] = []
    for token in tokens:
        got = acl_token(token)
        if isinstance(got, str):
            drop(where, f"{what} {token}", got)
            continue
        out += [g for g in got if g not in out]
    return out


def acl_keys(only: list[str] | None, deny: list[str] | None) -> tuple[dict, bool]:
    """superd only_from/no_access for xinetd's effective lists (None: not given).

    Returns (keys, names_in_no_access): an only_from that is given but matches nothing (empty,
    or only names) lets nobody in, so it becomes no_access for everyone.
    """
    keys: dict[str, list[str]] = {}
    if only is not None:
        allowed = acl(only, "", QUIET, "")
        if allowed:
            keys["only_from"] = allowed
        else:
            keys["no_access"] = ["0.0.0.0/0", "::/0"]
    names = False
    if deny:
        denied = acl(deny, "", QUIET, "")
        names = any(isinstance(acl_token(t), str) for t in deny)
        merged = keys.get("no_access", []) + [d for d in denied if d not in keys.get(
            "no_access", [])]
        if merged:
            keys["no_access"] = merged
    return keys, names


def log_fields(tokens: list[str], success: bool, where: str, drop: Drop, what: str) -> list[str]:
    table = SUCCESS if success else FAILURE
    out: list[str] = []
    for token in tokens:
        name = table.get(token.upper())
        if name is None:
            drop(where, f"{what} {token}", "not a field superd logs")
        elif name not in out:
            out.append(name)
    return out


def apply_op(current: list[str] | None, op: str, values: list[str]) -> list[str]:
    """xinetd's '=', '+=' and '-=' on a set-valued attribute."""
    if op == "=":
        return list(values)
    base = list(current or [])
    if op == "+=":
        return base + [v for v in values if v not in base]
    return [v for v in base if v not in values]
