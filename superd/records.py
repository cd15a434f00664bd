"""The parsed service table as frozen records: what superd/config.py makes of the YAML.

Settings (the `settings:` map), one Service per entry that loaded, one Failed per entry that
did not (with a way to try it again), and the Table holding them. Nothing here reads a file:
the records are what every other module is given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Any

from superd.fields import Backoff
from superd.hostpatterns import Rule
from superd.listeners import STREAM_PROTOCOLS, Address
from superd.sockopts import DEFAULT as DEFAULT_SOCKOPTS
from superd.sockopts import SocketOptions
from superd.yamlsrc import Problem


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
    stop: str = "terminate"  # what stopping does with running handlers: terminate, drain, leave
    drain_timeout: float = 20.0  # stop: drain waits this long for handlers before terminating
    read_timeout: float = 120.0  # seconds reading the table may take (superd/reader.py)
    max_sessions: int | None = None  # internal sessions at once; None: half the fd limit
    idle_timeout: float = 300.0  # an internal session that moves no byte for this long ends
    max_buffered: int = 32 << 20  # bytes all echo sessions together may hold unsent
    cgroups: str = "auto"  # a cgroup per handler: auto, yes or no (superd/cgroups.py)


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
    backoff: Backoff | None = Backoff()
    # socket options (superd/sockopts.py: socket_user ... broadcast), one record
    sockopts: SocketOptions = DEFAULT_SOCKOPTS
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
    python_source: str = field(default="", repr=False)  # sha256 of a FILE.py handler
    file: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    @property
    def stream(self) -> bool:
        return self.protocol in STREAM_PROTOCOLS

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Failed:
    """A service entry that does not load, and how to try it again as it was written."""

    name: str
    where: str  # FILE:LINE of its name
    problems: tuple[Problem, ...]
    disabled: bool  # a `disabled: true` entry: reported, never tried
    retry: Callable[[], Service | list[Problem]] = field(compare=False, repr=False)

    @property
    def transient(self) -> bool:
        """Only things missing from the machine: worth trying again without a reload."""
        return all(p.transient for p in self.problems)

    @property
    def reason(self) -> str:
        return "; ".join(f"{p.where}: {p.message}" if p.where else p.message
                         for p in self.problems)


@dataclass(frozen=True)
class Table:
    path: str
    settings: Settings
    services: tuple[Service, ...]
    failed: tuple[Failed, ...] = ()  # entries that did not load (superd serves the others)
    problems: tuple[Problem, ...] = ()  # every problem found, once, in file and line order
    broken_files: tuple[str, ...] = ()  # included files that could not be read at all

    @property
    def enabled(self) -> tuple[Service, ...]:
        return tuple(s for s in self.services if not s.disabled)

    @property
    def service_logs(self) -> tuple[ServiceLog, ...]:
        """Where each service's lines go when not to settings.syslog (from its keys)."""
        return tuple(ServiceLog(s.name, s.syslog_facility, s.syslog_level, s.log_file,
                                s.log_file_limits) for s in self.enabled
                     if s.syslog_facility or s.syslog_level or s.log_file)
