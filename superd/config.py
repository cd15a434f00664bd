"""The service table: YAML in, frozen records out, every mistake named by file and line.

`load_table()` is the only entry point. It reads the main file and its includes (yamlsrc), applies
`defaults`, checks every field of every service with the parsers in `fields`, then checks the
table as a whole (one handler kind per service, no two services on one address). Problems are
collected, not raised one by one, so `superd check` can list them all (SPEC §1).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from superd import fields, fields_policy
from superd.fields_policy import FACILITIES
from superd.hostpatterns import Rule
from superd.listeners import PROTOCOLS, Address
from superd.yamlsrc import Document, Path, Problem, TableError, load

DEFAULT_TABLE = "/etc/superd/superd.yaml"
__all__ = ["FACILITIES", "Service", "Settings", "Table", "load_table", "table_path"]


@dataclass(frozen=True)
class ServiceLog:
    """A service's own log target: syslog facility and level, or a file (superd/log.py)."""

    service: str
    facility: str = ""
    level: str = ""
    file: str = ""
    limits: tuple[int, int] | None = None


@dataclass(frozen=True)
class Settings:
    """Whole-daemon settings (the `settings:` map)."""

    syslog_address: str = "/dev/log"
    syslog_facility: str = "daemon"
    syslog_ident: str = "superd"
    control_socket: str = "/run/superd/control.sock"
    max_children: int = 1000
    shutdown_grace: float = 5.0
    # Where each service's lines go, when not to settings.syslog (from the services' keys).
    service_logs: tuple[ServiceLog, ...] = ()


@dataclass(frozen=True)
class Service:
    """One entry of `services:`, validated. Two records compare equal when they behave alike."""

    name: str
    listen: tuple[Address, ...] = ()
    protocol: str = "tcp"
    wait: bool = False
    argv: tuple[str, ...] = ()
    program: str = ""
    internal: str = ""
    python: str = ""
    user: str = ""
    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] | None = None
    umask: int | None = None
    nice: int = 0
    cwd: str = "/"
    env: tuple[tuple[str, str], ...] = ()
    passenv: tuple[str, ...] = ()
    rlimits: tuple[tuple[str, int, int], ...] = ()  # name, soft, hard
    instances: int | None = None
    on_limit: str = "queue"
    per_source: int | None = None
    rate: tuple[int, float] | None = None  # (tokens, seconds to refill them all)
    only_from: tuple[IPv4Network | IPv6Network, ...] = ()
    no_access: tuple[IPv4Network | IPv6Network, ...] = ()
    timeout: float | None = None
    backlog: int = 128
    stderr: str = "log"
    disabled: bool = False
    log_on_success: frozenset[str] = frozenset({"pid", "host", "exit", "duration"})
    log_on_failure: frozenset[str] = frozenset({"host"})
    # -- access, policy and execution (issue 14; parsers in superd/fields_policy.py) -------
    only_from_names: tuple[str, ...] = ()  # host names and .domains of only_from
    no_access_names: tuple[str, ...] = ()
    lookup_timeout: float = 5.0  # seconds a connection may wait for DNS or ident
    tcp_wrappers: str = ""  # the daemon name hosts.allow/deny know it by; "": off
    env_file: tuple[str, ...] = ()  # (read into env at load)
    syslog_facility: str = ""
    syslog_level: str = ""
    log_file: str = ""
    log_file_limits: tuple[int, int] | None = None  # soft, hard (bytes)
    redirect: tuple[int, str | tuple[str, int]] | None = None  # (family, address)
    rules: tuple[Rule, ...] = ()
    per_source_rate: tuple[int, float] | None = None
    ident: str = ""  # "on", "required" (IDONLY) or ""
    host_env: bool = False
    banner: bytes = b""
    banner_success: bytes = b""
    banner_fail: bytes = b""
    access_times: tuple[tuple[int, int], ...] = ()  # (first, last) minute of the day
    sensor: bool = False
    sensor_bans: bool = False  # a sensor is in the table: refuse who it caught
    deny_time: float = 3600.0  # seconds; inf: until superd restarts; 0: never
    max_load: float = 0.0
    chroot: str = ""
    no_new_privileges: bool = False
    capabilities: tuple[int, ...] = ()  # ambient
    capability_bounding_set: tuple[int, ...] | None = None
    # ---------------------------------------------------------------------------------------
    function: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def stream(self) -> bool:
        return self.protocol in ("tcp", "unix")

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Table:
    path: str
    settings: Settings
    services: tuple[Service, ...]

    @property
    def enabled(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if not s.disabled)


# Service keys that `defaults:` may not set: they say what a service *is*, not how it runs.
NOT_DEFAULTABLE = {"listen", "protocol", "exec", "program", "internal", "python", "redirect",
                   "sensor"}
# Every service key: fields.py's, and issue 14's from fields_policy.py (which also replaces
# the parsers of listen, only_from and no_access with ones that take host names).
SERVICE_KEYS = {**fields.SERVICE_KEYS, **fields_policy.KEYS}


def table_path(option: str | None) -> str:
    """`-c FILE`, else $SUPERD_CONFIG, else the system table (SPEC §1)."""
    return option or os.environ.get("SUPERD_CONFIG") or DEFAULT_TABLE


def load_table(path: str) -> Table:
    """Load and validate the whole table; raise TableError listing every problem."""
    path = os.path.abspath(path)
    main = load(path)
    problems: list[Problem] = []
    top = main.value if main.value is not None else {}
    if not isinstance(top, dict):
        raise TableError([main.problem((), "the table must be a mapping (settings, services...)")])
    for key in top:
        if key not in ("settings", "defaults", "include", "services"):
            problems.append(main.problem((key,), "unknown key (expected settings, defaults, "
                                                  "include, services)"))
    settings = _settings(main, problems)
    defaults = _mapping(main, ("defaults",), problems)
    for key in defaults:
        if key in NOT_DEFAULTABLE or key not in SERVICE_KEYS:
            problems.append(main.problem(("defaults", key), "not a key defaults may set"))
    entries: list[tuple[Document, str]] = []
    files = [path]
    _collect(main, [path], entries, files, problems)
    services: list[tuple[Service, Document]] = []
    seen: dict[str, Service] = {}
    for doc, name in entries:
        svc = _service(doc, name, defaults, main, problems)
        if svc is None:
            continue
        if name in seen:
            problems.append(doc.problem(("services", name),
                                        f"service defined twice (first at {seen[name].where})"))
            continue
        seen[name] = svc
        services.append((svc, doc))
    _check_addresses(services, problems)
    services = _with_sensors(services)
    if problems:
        order = {f: i for i, f in enumerate(files)}
        problems.sort(key=lambda p: (order.get(p.file, -1), p.line or 0))
        raise TableError(problems)
    enabled = [svc for svc, _ in services if not svc.disabled]
    logs = tuple(ServiceLog(s.name, s.syslog_facility, s.syslog_level, s.log_file,
                            s.log_file_limits) for s in enabled
                 if s.syslog_facility or s.syslog_level or s.log_file)
    if logs:
        settings = dataclasses.replace(settings, service_logs=logs)
    return Table(path, settings, tuple(svc for svc, _ in services))


def _with_sensors(services: list[tuple[Service, Document]]) -> list[tuple[Service, Document]]:
    """With a sensor in the table, every service superd accepts for refuses who it caught."""
    if not any(svc.sensor and not svc.disabled for svc, _ in services):
        return services
    return [(dataclasses.replace(svc, sensor_bans=True) if svc.stream and not svc.wait
             else svc, doc) for svc, doc in services]


def _collect(doc: Document, stack: list[str], entries: list[tuple[Document, str]],
             files: list[str], problems: list[Problem]) -> None:
    """Gather (document, service name) pairs from `doc` and, depth first, its includes."""
    for name in _mapping(doc, ("services",), problems):
        entries.append((doc, name))
    includes = doc.value.get("include", []) if isinstance(doc.value, dict) else []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        problems.append(doc.problem(("include",), "expected a list of file globs"))
        return
    base = os.path.dirname(doc.file)
    for i, pattern in enumerate(includes):
        if not isinstance(pattern, str):
            problems.append(doc.problem(("include", i), "expected a file glob"))
            continue
        full = os.path.join(base, pattern)
        matches = sorted(glob.glob(full))
        if not matches and not glob.has_magic(pattern):
            problems.append(doc.problem(("include", i), f"{full}: no such file"))
        for file in matches:
            real = os.path.realpath(file)
            if real in stack:
                problems.append(doc.problem(("include", i), f"include loop: {file} includes "
                                            "a file that includes it"))
                continue
            try:
                sub = load(real)
            except TableError as e:
                problems.extend(e.problems)
                continue
            if sub.value is None:
                continue
            if not isinstance(sub.value, dict):
                problems.append(sub.problem((), "an included file must be a mapping"))
                continue
            for key in sub.value:
                if key not in ("services", "include"):
                    problems.append(sub.problem((key,), "an included file may only hold "
                                                "services and include"))
            files.append(real)
            _collect(sub, stack + [real], entries, files, problems)


def _mapping(doc: Document, path: Path, problems: list[Problem]) -> dict[str, Any]:
    value: Any = doc.value
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(doc.problem(path, "expected a mapping"))
        return {}
    return value


def _settings(doc: Document, problems: list[Problem]) -> Settings:
    raw = _mapping(doc, ("settings",), problems)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path: Path = ("settings", key)
        try:
            if key == "syslog":
                out.update(_syslog(doc, value, problems))
            elif key == "control_socket":
                out[key] = fields.abs_path(value)
            elif key == "max_children":
                out[key] = fields.count(value)
            elif key == "shutdown_grace":
                out[key] = fields.seconds(value)
            else:
                problems.append(doc.problem(path, "unknown key (expected syslog, control_socket, "
                                                  "max_children, shutdown_grace)"))
        except ValueError as e:
            problems.append(doc.problem(path, str(e)))
    return Settings(**out)


def _syslog(doc: Document, value: Any, problems: list[Problem]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of address, facility, ident")
    out = {}
    for key, v in value.items():
        path: Path = ("settings", "syslog", key)
        if key not in ("address", "facility", "ident") or not isinstance(v, str) or not v:
            problems.append(doc.problem(path, "expected address, facility or ident, as a string"))
        elif key == "facility" and v not in FACILITIES:
            problems.append(doc.problem(path, f"unknown facility {v!r}"))
        elif key == "address" and not v.startswith("/"):
            problems.append(doc.problem(path, "expected the absolute path of a unix socket"))
        else:
            out[f"syslog_{key}"] = v
    return out


def _service(doc: Document, name: str, defaults: dict[str, Any], main: Document,
             problems: list[Problem]) -> Service | None:
    """Validate one service entry; None (with problems added) when it is unusable."""
    base: Path = ("services", name)
    raw = doc.value["services"][name]
    if not fields.NAME.fullmatch(name):
        problems.append(doc.problem(base, "a service name is letters, digits, '.', '_' and '-'"))
        return None
    if not isinstance(raw, dict):
        problems.append(doc.problem(base, "expected a mapping of service keys"))
        return None
    merged = {k: (main, ("defaults", k), v)
              for k, v in defaults.items() if k not in NOT_DEFAULTABLE}
    merged.update({k: (doc, base + (k,), v) for k, v in raw.items()})
    protocol = raw.get("protocol", "tcp")
    ctx = fields.Context(name=name, table_dir=os.path.dirname(doc.file),
                         protocol=protocol if isinstance(protocol, str) and protocol in PROTOCOLS
                         else "tcp", own=frozenset(raw))
    values: dict[str, Any] = {}
    before = len(problems)
    for key, (src, path, value) in merged.items():
        parser = SERVICE_KEYS.get(key)
        if parser is None:
            problems.append(src.problem(path, "unknown key"))
            continue
        try:
            values.update(parser(value, ctx))
        except ValueError as e:
            problems.append(src.problem(path, str(e)))
    if len(problems) > before:
        return None
    try:
        values = fields.whole_service(fields_policy.whole(values, ctx), ctx)
    except fields.FieldError as e:
        blame = next((k for k in e.keys if k in raw), None)
        problems.append(doc.problem(base + ((blame,) if blame else ()), str(e)))
        return None
    return Service(name=name, file=doc.file, line=doc.line(base), **values)


def _check_addresses(services: list[tuple[Service, Document]], problems: list[Problem]) -> None:
    """Two enabled services may not share an address of the same socket type.

    Addresses can only clash on the same port (or unix path), so they are grouped by it: the
    check stays linear for tables of thousands of services.
    """
    taken: dict[tuple, list[tuple[Service, Address]]] = {}
    for svc, doc in services:
        if svc.disabled:
            continue
        kind = socket.SOCK_STREAM if svc.stream else socket.SOCK_DGRAM
        for i, addr in enumerate(svc.listen):
            group = taken.setdefault((kind, addr.path or addr.port), [])
            for other, other_addr in group:
                if addr.overlaps(other_addr):
                    what = "the same address" if addr == other_addr else "an overlapping address"
                    problems.append(doc.problem(
                        ("services", svc.name, "listen", i),
                        f"{addr} is {what} as services.{other.name} ({other_addr}, "
                        f"{other.where})"))
                    break
            group.append((svc, addr))
