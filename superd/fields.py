"""One parser per service key: raw YAML value in, `Service` field values out.

Each parser raises ValueError with a sentence a user can act on; config.py adds the file, line
and field path. `whole_service()` then checks what no single key can (one handler kind, an
executable program, datagram rules). Lookups that can fail at run time (users, programs,
python handlers) are done here, once, so a mistake shows up in `superd check`, not at 3 a.m.
"""

from __future__ import annotations

import ipaddress
import os
import re
import resource
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple

from superd import pyload, reader, sockopts
from superd.listeners import PROTOCOLS, STREAM_PROTOCOLS, parse_address
from superd.strict import Untrusted
from superd.values import Missing, boolean, group_entry, integer, user_entry

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
INTERNAL = ("echo", "discard", "chargen", "daytime", "time")
RLIMITS = {
    "nofile": resource.RLIMIT_NOFILE, "nproc": resource.RLIMIT_NPROC, "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU, "core": resource.RLIMIT_CORE, "fsize": resource.RLIMIT_FSIZE,
    # every other limit Linux has (setrlimit(2)); RLIMIT_LOCKS (10) is not in `resource`
    "data": resource.RLIMIT_DATA, "stack": resource.RLIMIT_STACK, "rss": resource.RLIMIT_RSS,
    "memlock": resource.RLIMIT_MEMLOCK, "msgqueue": resource.RLIMIT_MSGQUEUE,
    "nice": resource.RLIMIT_NICE, "rtprio": resource.RLIMIT_RTPRIO,
    "rttime": resource.RLIMIT_RTTIME, "sigpending": resource.RLIMIT_SIGPENDING, "locks": 10,
}
SUCCESS_FIELDS = ("pid", "host", "exit", "duration", "traffic", "userid")
FAILURE_FIELDS = ("host", "attempt", "userid")


class Backoff(NamedTuple):
    """When starting a handler keeps failing: pause the service after `after` failures in a
    row, `first` seconds, doubling up to `most` (the `backoff:` key)."""

    after: int = 5
    first: float = 1.0
    most: float = 60.0


@dataclass
class Context:
    """What a parser may need besides the value."""

    name: str
    table_dir: str
    protocol: str = "tcp"
    written: frozenset[str] = frozenset()  # the keys the service itself gives (not defaults)


class MissingField(Missing):
    """A Missing about the service as a whole, blamed on one of its keys."""

    def __init__(self, keys: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = (keys,) if isinstance(keys, str) else keys


class FieldError(ValueError):
    """A problem with the service as a whole, blamed on one of its keys."""

    def __init__(self, keys: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.keys = (keys,) if isinstance(keys, str) else keys


def _choice(options: tuple[str, ...], value: Any) -> str:
    if value not in options:
        raise ValueError(f"expected one of {', '.join(options)}, not {value!r}")
    return value


def count(value: Any) -> int:
    return integer(value, 1, 1_000_000)


def count_or_unlimited(value: Any) -> int | None:
    return None if value == "unlimited" else count(value)


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise ValueError(f"expected a number of seconds greater than 0, not {value!r}")
    return float(value)


def size(value: Any) -> int:
    """Bytes: a whole number, or one with K, M or G (powers of 1024): 65536, 64K, 32M."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", str(value)) if not isinstance(value, bool) \
        else None
    if not m or not 0 < int(m.group(1)):
        raise ValueError(f"expected a size in bytes (65536, 64K, 32M, 1G), not {value!r}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


def abs_path(value: Any) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError(f"expected an absolute path, not {value!r}")
    return value


def _strings(value: Any, what: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"expected a list of {what}")
    return items


def listen(value: Any, ctx: Context) -> dict[str, Any]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError("expected at least one address")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_address(item, ctx.protocol))
        except ValueError as e:
            raise ValueError(f"{e}" if len(items) == 1 else f"entry {i + 1}: {e}") from None
    return {"listen": tuple(out)}


def exec_argv(value: Any, ctx: Context) -> dict[str, Any]:
    if not isinstance(value, list) or not value:
        raise ValueError("expected an argv list, e.g. [/usr/bin/cat]")
    if not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in value):
        raise ValueError("every argument must be a string")
    argv = tuple(str(a) for a in value)
    for i, arg in enumerate(argv):
        _no_nul(arg, f"argument {i}")
    return {"argv": argv}


def _no_nul(text: str, what: str) -> None:
    """execve cannot carry a NUL byte: refuse it here, not at the first connection."""
    if "\0" in text:
        raise ValueError(f"{what} holds a NUL byte, which a program's arguments and "
                         "environment cannot carry")


def python_handler(value: Any, ctx: Context) -> dict[str, Any]:
    """`module:function` or `FILE.py:function`, imported now so that a typo fails the load,
    but in a child process of its own (superd/reader.py), within IMPORT_TIMEOUT: a module
    whose top level loops, or ends its process, fails this service alone. superd keeps no
    handler function: the service's host process imports it for itself (superd/pyhost.py)."""
    if not isinstance(value, str) or value.count(":") != 1 or value.endswith(":"):
        raise ValueError("expected module:function or FILE.py:function")
    target = value.split(":")[0]
    kind, got = reader.read_now(partial(_checked_source, value, ctx), f"the import of {target}",
                                reader.IMPORT_TIMEOUT)
    if kind == "ok":
        return {"python": value, "function": None, "python_source": got}
    if kind == "timeout":
        raise Missing(f"cannot import {target}: its import did not return within "
                      f"{reader.IMPORT_TIMEOUT:g} s")
    if kind == "died":
        raise Missing(f"cannot import {target}: its module ended the process while loading")
    raise (Missing if kind == "missing" else ValueError)(str(got))


def _checked_source(value: str, ctx: Context) -> str:
    """In the child: load the handler; the sha256 of a FILE.py's source (a changed source is
    a changed service: its host is replaced on reload), or ""."""
    module = load_handler(value, ctx)[1]
    return str(getattr(module, "__superd_source__", ""))


def load_handler(value: str, ctx: Context) -> tuple[Callable[..., Any], types.ModuleType]:
    """Import the handler and return its function (and module); Missing or ValueError with
    the reason. Whatever the module does while it loads is the table's problem, never
    superd's: an exception, sys.exit() (argparse at module level), anything BaseException."""
    target, func = value.split(":")
    try:
        if target.endswith(".py"):
            module = pyload.load_file(os.path.join(ctx.table_dir, target),
                                      f"superd_handler_{ctx.name.replace('-', '_')}")
        else:
            module = pyload.import_module(target, ctx.table_dir)
    except ValueError:
        raise
    except Untrusted as e:
        raise ValueError(str(e)) from None
    except SystemExit as e:  # (retried, as any other error of the module: it may be fixed)
        raise Missing(f"cannot import {target}: it called sys.exit({e.code!r}) while "
                      "loading (argparse at module level?)") from None
    except BaseException as e:  # any error of the handler's module is the table's problem
        text = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        raise Missing(f"cannot import {target}: {text}") from None
    function = getattr(module, func, None)
    if not callable(function):
        raise Missing(f"{target} has no function {func!r}")
    return function, module


def user(value: Any, ctx: Context) -> dict[str, Any]:
    _no_nul(str(value), "the user name")
    entry = user_entry(value)
    return {"user": entry.pw_name, "uid": entry.pw_uid, "gid": entry.pw_gid,
            "groups": tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))}


def group(value: Any, ctx: Context) -> dict[str, Any]:
    _no_nul(str(value), "the group name")
    entry = group_entry(value)
    return {"group_gid": entry.gr_gid}


def umask(value: Any, ctx: Context) -> dict[str, Any]:
    """`022` in YAML is already octal; a quoted "022" is read as octal too."""
    if isinstance(value, str) and re.fullmatch(r"0?[0-7]{1,3}", value):
        value = int(value, 8)
    return {"umask": integer(value, 0, 0o777)}


def cwd(value: Any, ctx: Context) -> dict[str, Any]:
    """Checked in whole_service: with chroot it is a path inside the new root."""
    return {"cwd": abs_path(value)}


def env(value: Any, ctx: Context) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of NAME: value")
    out = []
    for k, v in value.items():
        if not ENV_NAME.fullmatch(k) or isinstance(v, dict | list) or v is None:
            raise ValueError(f"{k}: expected NAME: value with a plain value")
        text = str(v).lower() if isinstance(v, bool) else str(v)
        _no_nul(text, f"the value of {k}")
        out.append((k, text))
    return {"env": tuple(out)}


def passenv(value: Any, ctx: Context) -> dict[str, Any]:
    names = _strings(value, "variable names")
    for n in names:
        if not ENV_NAME.fullmatch(n):
            raise ValueError(f"{n!r} is not a variable name")
    return {"passenv": tuple(names)}


def rlimits(value: Any, ctx: Context) -> dict[str, Any]:
    """Each limit a number or `unlimited` (soft and hard alike), or [SOFT, HARD]."""
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of {', '.join(RLIMITS)}")
    out = []
    for k, v in value.items():
        if k not in RLIMITS:
            raise ValueError(f"unknown limit {k!r} (expected {', '.join(RLIMITS)})")
        pair = v if isinstance(v, list) else [v, v]
        if len(pair) != 2:
            raise ValueError(f"{k}: expected a number, unlimited or [SOFT, HARD]")
        soft, hard = (resource.RLIM_INFINITY if x == "unlimited" else integer(x, 0, 2**62)
                      for x in pair)
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            raise ValueError(f"{k}: the soft limit is above the hard one")
        out.append((k, soft, hard))
    return {"rlimits": tuple(out)}


def rate(value: Any, ctx: Context) -> dict[str, Any]:
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(s|sec|min)\s*", str(value))
    if not m or not 0 < int(m.group(1)) <= 1_000_000:
        raise ValueError(f"expected N/s or N/min, not {value!r}")
    return {"rate": (int(m.group(1)), 1.0 if m.group(2) != "min" else 60.0)}


def networks(key: str) -> Callable[[Any, Context], dict[str, Any]]:
    def parse(value: Any, ctx: Context) -> dict[str, Any]:
        out = []
        for item in _strings(value, "addresses or CIDRs"):
            try:
                out.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return {key: tuple(out)}
    return parse


def fields_subset(key: str, allowed: tuple[str, ...]) -> Callable[[Any, Context], dict[str, Any]]:
    def parse(value: Any, ctx: Context) -> dict[str, Any]:
        items = [] if value == [] else _strings(value, ", ".join(allowed))
        for item in items:
            _choice(allowed, item)
        return {key: frozenset(items)}
    return parse


def backoff(value: Any) -> Any:
    """`backoff: false` (never pause), `true` (the default), or a mapping of `after` (failures
    in a row), `first` and `max` (seconds)."""
    if value is True:
        return Backoff()
    if value is False or value == "off":
        return None
    if not isinstance(value, dict):
        raise ValueError("expected true, false or a mapping of after, first, max")
    unknown = set(value) - {"after", "first", "max"}
    if unknown:
        raise ValueError(f"unknown {', '.join(sorted(unknown))} (expected after, first, max)")
    out = Backoff(after=integer(value.get("after", 5), 1, 1000),
                  first=seconds(value.get("first", 1.0)), most=seconds(value.get("max", 60.0)))
    if out.most < out.first:
        raise ValueError(f"max ({out.most:g}) is shorter than first ({out.first:g})")
    return out


def simple(key: str, parse: Callable[[Any], Any]) -> Callable[[Any, Context], dict[str, Any]]:
    return lambda value, ctx: {key: parse(value)}


SERVICE_KEYS: dict[str, Callable[[Any, Context], dict[str, Any]]] = {
    "listen": listen,
    "protocol": simple("protocol", lambda v: _choice(tuple(PROTOCOLS), v)),
    "wait": simple("wait", boolean),
    "exec": exec_argv,
    "program": simple("program", abs_path),
    "internal": simple("internal", lambda v: _choice(INTERNAL, v)),
    "python": python_handler,
    "user": user,
    "group": group,
    "umask": umask,
    "nice": simple("nice", lambda v: integer(v, -20, 19)),
    "cwd": cwd,
    "env": env,
    "passenv": passenv,
    "rlimits": rlimits,
    "instances": simple("instances", count_or_unlimited),
    "on_limit": simple("on_limit", lambda v: _choice(("queue", "refuse"), v)),
    "per_source": simple("per_source", count_or_unlimited),
    "rate": rate,
    "only_from": networks("only_from"),
    "no_access": networks("no_access"),
    "timeout": simple("timeout", seconds),
    "backlog": simple("backlog", lambda v: integer(v, 1, 65535)),
    # `stderr: null` unquoted is YAML's null: it means the word, as the docs write it
    "stderr": simple("stderr", lambda v: _choice(("log", "socket", "null"),
                                                  "null" if v is None else v)),
    "disabled": simple("disabled", boolean),
    "log_on_success": fields_subset("log_on_success", SUCCESS_FIELDS),
    "log_on_failure": fields_subset("log_on_failure", FAILURE_FIELDS),
    "backoff": lambda value, ctx: {"backoff": backoff(value)},
    # socket options: socket_user ... broadcast (superd/sockopts.py)
    **sockopts.KEYS,
}


def whole_service(values: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Checks across keys; returns adjusted values. Raises FieldError naming the key to blame."""
    out = dict(values)
    kinds = [k for k in ("argv", "internal", "python", "redirect", "sensor") if out.get(k)]
    if len(kinds) != 1:
        named = {"argv": "exec"}.get(kinds[1], kinds[1]) if len(kinds) > 1 else "exec"
        raise FieldError(named, "give exactly one of exec, internal, python, redirect or "
                                "sensor")
    gid = out.pop("group_gid", None)
    if gid is not None:
        out["gid"] = gid
        out.setdefault("groups", (gid,))
    protocol = out.get("protocol", "tcp")
    if out.get("internal"):
        out["wait"] = False  # accepted and ignored (SPEC §2)
        for key in ("user", "uid", "gid", "groups"):
            out.pop(key, None)
        if protocol not in STREAM_PROTOCOLS:
            for key in ("instances", "per_source"):
                if out.get(key) is not None and key not in ctx.written:
                    out.pop(key)  # from defaults: it applies to the services it fits
                elif out.get(key) is not None:
                    raise FieldError(key, f"{key} counts connections; an internal datagram "
                                          "service has none (rate: N/s limits its answers)")
    elif protocol not in STREAM_PROTOCOLS and not out.get("wait"):
        raise FieldError(("wait", "protocol"), f"protocol {protocol} with wait: false is only "
                                               "for internal services; use wait: true")
    if out.get("wait") and protocol in STREAM_PROTOCOLS:
        for key in ("only_from", "no_access", "per_source"):
            if out.get(key):
                raise FieldError(key, f"{key} cannot apply to a wait: true stream service: its "
                                      "handler accepts the connections, superd never sees them")
    if out.get("argv"):
        program = out.get("program") or out["argv"][0]
        if not program.startswith("/"):
            raise FieldError("exec", f"{program!r} is not an absolute path (or give program)")
        inside = out.get("chroot", "") + program  # with chroot, the program is inside it
        if not os.path.isfile(inside) or not os.access(inside, os.X_OK):
            raise MissingField("program" if out.get("program") else "exec",
                               f"{inside}: no such executable file")
        out["program"] = program
    elif out.get("program"):
        raise FieldError("program", "program goes with exec")
    where = out.get("chroot", "") + out["cwd"] if out.get("cwd") else ""
    if where and not os.path.isdir(where):
        raise MissingField("cwd", f"{where}: no such directory")
    abstract = bool(out.get("listen")) and all(a.abstract for a in out["listen"])
    misfit = sockopts.misfit(ctx.written, protocol, bool(out.get("wait")), abstract)
    if misfit:
        raise FieldError(*misfit)
    out["sockopts"] = sockopts.build(out, protocol, abstract)
    if out.get("internal") == "echo" and protocol == "unix-seqpacket":
        out["internal"] = "echo-packet"  # one reply per message: the boundaries are kept
    return out
