"""Parsers for the access, policy and execution keys (issue 14), and their cross-key checks.

The same contract as superd/fields.py: raw YAML value in, `Service` field values out, a
ValueError sentence a user can act on (config.py adds file, line and key). `whole()` runs
before `fields.whole_service()` and checks what needs several keys: which services a stage
can apply to (superd must accept the connection itself), the daemon name of tcp_wrappers,
env_file merged under env, `userid` asking for ident.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import re
import socket
from typing import Any

from superd import caps, envfile
from superd.facts import CONNECTION_VARS
from superd.fields import (
    ENV_NAME,
    Context,
    FieldError,
    _strings,
    abs_path,
    env,
    rate,
    seconds,
)
from superd.hostpatterns import HostSet, Rule, is_name, split
from superd.listeners import parse_address
from superd.resolver import addresses_now
from superd.safefile import read_regular
from superd.values import boolean, integer

FACILITIES = (
    "kern user mail daemon auth syslog lpr news uucp cron authpriv ftp "
    "local0 local1 local2 local3 local4 local5 local6 local7"
).split()
LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
MAX_BANNER = 64 << 10
SIZE = re.compile(r"(\d+)\s*([KMG]?)", re.I)


def hosts(key: str) -> Any:
    def parse(value: Any, ctx: Context) -> dict[str, Any]:
        nets, names = split(_strings(value, "addresses, CIDRs, host names or .domains"))
        return {key: nets, f"{key}_names": names}
    return parse


def listen_names(value: Any, ctx: Context) -> dict[str, Any]:
    """listen, where HOST may be a name: resolved now (at load and every reload)."""
    items = value if isinstance(value, list) else [value]
    out = []
    for i, item in enumerate(items):
        host, _, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        try:
            if ctx.protocol in ("tcp", "udp") and host and is_name(host) \
                    and not host.startswith("."):
                for ip in addresses_now(host):
                    addr = parse_address(f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}",
                                         ctx.protocol)
                    out.append(dataclasses.replace(addr, text=f"{item} ({ip})"))
            else:
                out.append(parse_address(item, ctx.protocol))
        except ValueError as e:  # Missing stays Missing: the service is tried again
            raise type(e)(f"{e}" if len(items) == 1 else f"entry {i + 1}: {e}") from None
    if not out:
        raise ValueError("expected at least one address")
    return {"listen": tuple(dict.fromkeys(out))}


def tcp_wrappers(value: Any, ctx: Context) -> dict[str, Any]:
    if isinstance(value, str) and value and not value.isspace() and value.isprintable():
        return {"tcp_wrappers": value}
    return {"tcp_wrappers": "-" if boolean(value) else ""}  # "-": the default daemon name


def env_files(value: Any, ctx: Context) -> dict[str, Any]:
    specs = _strings(value, "files (absolute paths, - in front for optional ones)")
    found: list[tuple[str, str]] = []
    for spec in specs:
        found += envfile.read(spec)
    return {"env_file": tuple(specs), "env_file_vars": tuple(found)}


def size(value: Any) -> int:
    m = SIZE.fullmatch(str(value).strip()) if not isinstance(value, bool) else None
    if m is None:
        raise ValueError(f"expected a size in bytes (K, M, G allowed), not {value!r}")
    return int(m[1]) << {"": 0, "K": 10, "M": 20, "G": 30}[m[2].upper()]


def log_file_limits(value: Any, ctx: Context) -> dict[str, Any]:
    items = value if isinstance(value, list) else [value]
    if not 1 <= len(items) <= 2:
        raise ValueError("expected [SOFT] or [SOFT, HARD]: sizes such as 5M")
    soft = size(items[0])
    hard = size(items[1]) if len(items) == 2 else soft + max(soft // 100, 5 << 10)
    if hard < soft:
        raise ValueError("the hard limit is below the soft one")
    return {"log_file_limits": (soft, hard)}


def redirect(value: Any, ctx: Context) -> dict[str, Any]:
    if isinstance(value, str) and value.startswith("/"):
        return {"redirect": (socket.AF_UNIX, value)}
    host, sep, port = str(value).rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ValueError(f"expected HOST:PORT, [V6]:PORT or /unix/path, not {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if is_name(host) and not host.startswith("."):
        host = addresses_now(host)[0]
    addr = parse_address(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "tcp")
    return {"redirect": (addr.family, (addr.host, addr.port))}


def rules(value: Any, ctx: Context) -> dict[str, Any]:
    if not isinstance(value, list):
        raise ValueError("expected a list of {allow: [...]} / {deny: [...]} rules")
    out = []
    for i, item in enumerate(value, 1):
        if not isinstance(item, dict) or len({"allow", "deny"} & item.keys()) != 1 or \
                not item.keys() <= {"allow", "deny", "env"}:
            raise ValueError(f"rule {i}: expected allow: HOSTS or deny: HOSTS, and env")
        allowing = "allow" in item
        try:
            raw = _strings(item["allow" if allowing else "deny"], "hosts")
            nets, names = split(["0.0.0.0/0" if v == "all" else v for v in raw] +
                                (["::/0"] if "all" in raw else []))
            variables = env(item.get("env", {}), ctx)["env"]
        except ValueError as e:
            raise ValueError(f"rule {i}: {e}") from None
        if variables and not allowing:
            raise ValueError(f"rule {i}: env goes with allow (a refused client runs nothing)")
        taken = sorted(CONNECTION_VARS & {name for name, _ in variables})
        if taken:
            raise ValueError(f"rule {i}: {', '.join(taken)}: superd sets it from the connection")
        out.append(Rule(allowing, HostSet(nets, names), variables))
    return {"rules": tuple(out)}


def ident(value: Any, ctx: Context) -> dict[str, Any]:
    if value == "required":
        return {"ident": "required"}
    return {"ident": "on" if boolean(value) else ""}


def banner(key: str) -> Any:
    def parse(value: Any, ctx: Context) -> dict[str, Any]:
        path = abs_path(value)
        try:
            data = read_regular(path, MAX_BANNER + 1)
        except OSError as e:
            raise ValueError(f"{path}: {e.strerror}") from None
        if len(data) > MAX_BANNER:
            raise ValueError(f"{path}: a banner is at most {MAX_BANNER} bytes")
        return {key: data}
    return parse


def access_times(value: Any, ctx: Context) -> dict[str, Any]:
    out = []
    for item in _strings(value, "windows HH:MM-HH:MM"):
        m = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", item)
        start, end = (int(m[1]) * 60 + int(m[2]), int(m[3]) * 60 + int(m[4])) if m else (-1, -1)
        if not m or int(m[2]) > 59 or int(m[4]) > 59 or start > 1439 or end > 1440:
            raise ValueError(f"{item!r} is not a window HH:MM-HH:MM (00:00 to 24:00)")
        out.append((start, min(end, 1439)))  # 24:00: to the end of the day
    return {"access_times": tuple(out)}


def deny_time(value: Any, ctx: Context) -> dict[str, Any]:
    if value in ("forever", "never"):
        return {"deny_time": float("inf") if value == "forever" else 0.0}
    return {"deny_time": integer(value, 1, 10_000_000) * 60.0}


def max_load(value: Any, ctx: Context) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e6:
        raise ValueError(f"expected a load average greater than 0, such as 4.5, not {value!r}")
    return {"max_load": float(value)}


def groups(value: Any, ctx: Context) -> dict[str, Any]:
    if value in ("none", []):
        return {"groups_explicit": ()}
    out = []
    for item in value if isinstance(value, list) else [value]:
        try:
            entry = grp.getgrgid(item) if isinstance(item, int) and not isinstance(item, bool) \
                else grp.getgrnam(str(item))
        except (KeyError, OverflowError):
            raise ValueError(f"no such group {item!r}") from None
        out.append(entry.gr_gid)
    return {"groups_explicit": tuple(dict.fromkeys(out))}


def chroot(value: Any, ctx: Context) -> dict[str, Any]:
    path = abs_path(value)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such directory")
    return {"chroot": os.path.normpath(path)}


def capabilities(key: str) -> Any:
    def parse(value: Any, ctx: Context) -> dict[str, Any]:
        names = [] if value == [] else _strings(value, "capability names")
        return {key: caps.bounding(names) if key.endswith("set") else caps.parse(names)}
    return parse


def simple(key: str, parse: Any) -> Any:
    return lambda value, ctx: {key: parse(value)}


KEYS: dict[str, Any] = {
    "listen": listen_names,
    "only_from": hosts("only_from"),
    "no_access": hosts("no_access"),
    "lookup_timeout": simple("lookup_timeout", seconds),
    "tcp_wrappers": tcp_wrappers,
    "env_file": env_files,
    "syslog_facility": simple("syslog_facility", lambda v: _one(FACILITIES, v)),
    "syslog_level": simple("syslog_level", lambda v: _one(LEVELS, v)),
    "log_file": simple("log_file", abs_path),
    "log_file_limits": log_file_limits,
    "redirect": redirect,
    "rules": rules,
    "per_source_rate": lambda v, ctx: {"per_source_rate": rate(v, ctx)["rate"]},
    "ident": ident,
    "host_env": simple("host_env", boolean),
    "banner": banner("banner"),
    "banner_success": banner("banner_success"),
    "banner_fail": banner("banner_fail"),
    "access_times": access_times,
    "sensor": simple("sensor", boolean),
    "deny_time": deny_time,
    "max_load": max_load,
    "groups": groups,
    "chroot": chroot,
    "no_new_privileges": simple("no_new_privileges", boolean),
    "capabilities": capabilities("capabilities"),
    "capability_bounding_set": capabilities("capability_bounding_set"),
}
ACCEPTED_ONLY = ("tcp_wrappers", "rules", "ident", "host_env", "banner", "banner_success",
                 "banner_fail", "access_times", "max_load", "per_source_rate", "sensor",
                 "redirect")
IP_ONLY = ("tcp_wrappers", "ident", "host_env", "sensor")


def _one(options: tuple[str, ...] | list[str], value: Any) -> str:
    if value not in options:
        raise ValueError(f"expected one of {', '.join(options)}, not {value!r}")
    return str(value)


def _userid(out: dict[str, Any], ctx: Context, fits: bool) -> None:
    """`userid` in a log list asks ident for the client's user name: only a tcp service with
    wait: false has one to ask. From defaults it is left out where it does not fit; a
    service that writes it itself where it cannot work, or with `ident: false`, is refused."""
    for key in ("log_on_success", "log_on_failure"):
        fields = out.get(key, frozenset())
        if "userid" not in fields:
            continue
        if key not in ctx.written and (not fits or out.get("ident") == ""):
            out[key] = fields - {"userid"}
        elif not fits:
            raise FieldError(key, "userid needs a tcp service with wait: false")
        elif out.get("ident") == "":
            raise FieldError(key, "userid needs ident, which this service turns off")
        else:
            out.setdefault("ident", "on")


def whole(values: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Cross-key checks of these keys; returns adjusted values (FieldError blames a key)."""
    out = dict(values)
    protocol = out.get("protocol", "tcp")
    accepted = protocol in ("tcp", "unix") and not out.get("wait")
    for key in ACCEPTED_ONLY + ("only_from_names", "no_access_names"):
        blame = key.replace("_names", "")
        if out.get(key) and not accepted:
            if blame not in ctx.written and not key.endswith("_names"):
                out.pop(key)  # from defaults: it applies to the services it fits
                continue
            if blame not in ctx.written:  # dropping names would let their hosts in: refuse
                raise FieldError(blame, f"{blame} from defaults names hosts, which superd looks "
                                        "up only for connections it accepts itself (tcp or unix "
                                        "with wait: false); give this service its own "
                                        f"{blame} of addresses")
            raise FieldError(blame, f"{blame} applies to connections superd accepts itself: "
                                    "protocol tcp or unix with wait: false")
    for key in IP_ONLY:
        if out.get(key) and protocol != "tcp":
            if key not in ctx.written:
                out.pop(key)
                continue
            raise FieldError(key, f"{key} needs protocol tcp (a unix peer has no address)")
    _userid(out, ctx, accepted and protocol == "tcp")
    if out.get("sensor") or out.get("redirect"):
        for key in ("user", "uid", "gid", "groups", "group_gid", "stderr"):
            out.pop(key, None)
    if out.get("tcp_wrappers") == "-":
        argv = out.get("argv")
        out["tcp_wrappers"] = os.path.basename(argv[0]) if argv else ctx.name
    if "env_file_vars" in out:
        merged = dict(out.get("env", ()))
        merged.update(out.pop("env_file_vars"))  # systemd: EnvironmentFile= wins over env
        out["env"] = tuple(merged.items())
    if "groups_explicit" in out:
        out["groups"] = out.pop("groups_explicit")
    if "log_file_limits" in out and not out.get("log_file"):
        raise FieldError("log_file_limits", "log_file_limits goes with log_file")
    for name, _ in out.get("env", ()):
        if not ENV_NAME.fullmatch(name):
            raise FieldError("env_file", f"{name!r} is not a variable name")
    return out
