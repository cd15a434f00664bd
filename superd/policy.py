"""Small per-connection policies, each a stage: banners, time windows, the load gate, the
sensor and its bans, a per-source rate, and tcpserver's host variables.

In the order `stages.build()` runs them: the sensor (a trap port: its caller is banned from
every service for `deny_time`) and the ban check come first, then `banner` (sent to every
client, before anything is looked up, as tcpserver -B does), `max_load`, `access_times` and
`per_source_rate`; after the access rules `host_env` (TCPREMOTEHOST, TCPLOCALHOST,
TCPCONNNUM) and last `banner_success`. `banner_fail` is sent by any stage that refuses.

A sensor bans only what a TCP handshake has proved: a datagram's source can be forged, so a
sensor on UDP would let anyone ban any address; the table refuses one.
"""

from __future__ import annotations

import math
import os
import socket
import time
from collections.abc import Callable

from superd.config import Service
from superd.facts import PARANOID, UNKNOWN
from superd.log import Log
from superd.lookups import Facts, Key, LookupStage, Sources, name_of
from superd.loop import WRITE, Loop
from superd.pipeline import WAIT, Connection, Done, Stage, Waiting

MAX_BANS = 100_000
MAX_SOURCES = 50_000  # sources a per_source_rate remembers; the oldest go first
BANNER_DEADLINE = 10.0


def wanted(config: Service) -> bool:
    return bool(config.sensor or config.sensor_bans or config.banner or config.max_load
                or config.access_times or config.per_source_rate or config.host_env
                or config.banner_success)


class Quick:
    """A stage that answers at once (the default parts of the Stage shape)."""

    name = "quick"
    deadline = 0.0

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        raise NotImplementedError

    def expired(self, conn: Connection) -> str | None:
        return None

    def cancel(self, conn: Connection) -> None:
        pass


class Bans:
    """Addresses a sensor caught, and until when (monotonic seconds; inf: until restart)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.until: dict[str, float] = {}

    def ban(self, ip: str, seconds: float) -> None:
        if len(self.until) >= MAX_BANS:
            now = self.clock()
            self.until = {k: t for k, t in self.until.items() if t > now}
            while len(self.until) >= MAX_BANS:
                del self.until[next(iter(self.until))]
        self.until.pop(ip, None)
        self.until[ip] = self.clock() + seconds

    def export(self) -> dict[str, float | None]:
        """The bans in force, as seconds left (None: until restart), for superd upgrade."""
        now = self.clock()
        return {ip: None if t == float("inf") else t - now
                for ip, t in self.until.items() if t > now}

    def restore(self, left: dict[str, float | None]) -> None:
        for ip, seconds in left.items():
            self.ban(ip, float("inf") if seconds is None else seconds)

    def banned(self, ip: str) -> bool:
        until = self.until.get(ip)
        if until is None:
            return False
        if until > self.clock():
            return True
        del self.until[ip]
        return False


class Sensor(Quick):
    """A trap: every caller is refused, and banned from every service for `deny_time`."""

    name = "sensor"

    def __init__(self, bans: Bans, seconds: float, log: Log, service: str):
        self.bans, self.seconds, self.log, self.service = bans, seconds, log, service

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        if not isinstance(conn.addr, tuple):
            return "sensor"
        if self.seconds > 0:
            self.bans.ban(conn.peer, self.seconds)
            what = "refused on every service " + (
                "until superd restarts" if math.isinf(self.seconds)
                else f"for {self.seconds / 60:g} min")
        else:
            what = "not banned (deny_time: never)"
        self.log.warning(f"SENSOR: {self.service} from={conn.peer}: {what}",
                         SUPERD_SERVICE=self.service, REMOTE_ADDR=conn.peer)
        return "sensor"


class Banned(Quick):
    """A source a sensor caught is refused (`address`, as xinetd's global no_access)."""

    name = "banned"

    def __init__(self, bans: Bans):
        self.bans = bans

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        return "address" if self.bans.until and self.bans.banned(conn.peer) else None


class MaxLoad(Quick):
    """Refuse (`load`) while the one-minute load average is at `limit` or above."""

    name = "load"

    def __init__(self, limit: float, clock: Callable[[], float] = time.monotonic):
        self.limit, self.clock = limit, clock
        self.read_at, self.load = -1.0, 0.0

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        now = self.clock()
        if now - self.read_at >= 1.0:  # /proc/loadavg changes every 5 s anyway
            self.read_at, self.load = now, os.getloadavg()[0]
        return "load" if self.load >= self.limit else None


class AccessTimes(Quick):
    """Serve only within the windows (minutes of the local day; a window may pass midnight)."""

    name = "time"

    def __init__(self, windows: tuple[tuple[int, int], ...],
                 now: Callable[[], time.struct_time] = time.localtime):
        self.windows, self.now = windows, now

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        t = self.now()
        minute = t.tm_hour * 60 + t.tm_min
        for start, end in self.windows:
            if start <= minute <= end if start <= end else (minute >= start or minute <= end):
                return None
        return "time"


class PerSourceRate(Quick):
    """A token bucket per source address (FreeBSD's max-connections-per-ip-per-minute)."""

    name = "per_source_rate"

    def __init__(self, rate: tuple[int, float], clock: Callable[[], float] = time.monotonic):
        self.capacity = float(rate[0])
        self.per_second = rate[0] / rate[1]
        self.clock = clock
        self.buckets: dict[str, tuple[float, float]] = {}  # peer -> (tokens, when)

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        now = self.clock()
        tokens, then = self.buckets.pop(conn.peer, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - then) * self.per_second)
        if tokens < 1:
            self._keep(conn.peer, tokens, now)
            return "per_source_rate"
        self._keep(conn.peer, tokens - 1, now)
        return None

    def _keep(self, peer: str, tokens: float, now: float) -> None:
        buckets = self.buckets
        if len(buckets) >= MAX_SOURCES:
            full = (self.capacity - 1) / self.per_second  # refilled since: forget it
            for key in [k for k, (_, t) in buckets.items() if now - t >= full][:MAX_SOURCES]:
                del buckets[key]
            while len(buckets) >= MAX_SOURCES:
                del buckets[next(iter(buckets))]
        buckets[peer] = (tokens, now)  # re-inserted: the dict stays in order of last use


class Banner:
    """Send a file's bytes to the client; wait (bounded) only when its buffer is full."""

    deadline = BANNER_DEADLINE

    def __init__(self, name: str, data: bytes, loop: Loop):
        self.name, self.data, self.loop = name, data, loop
        self.sent: dict[Connection, int] = {}

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        offset = send_some(conn.sock, self.data, 0)
        if offset < 0:
            return "banner"
        if offset == len(self.data):
            return None
        self.sent[conn] = offset
        self.loop.add(conn.sock, WRITE, lambda mask: self._writable(conn, done))
        return WAIT

    def _writable(self, conn: Connection, done: Done) -> None:
        offset = send_some(conn.sock, self.data, self.sent.get(conn, 0))
        if offset < 0 or offset == len(self.data):
            self.cancel(conn)
            done(conn, "banner" if offset < 0 else None)
        else:
            self.sent[conn] = offset

    def expired(self, conn: Connection) -> str | None:
        return "banner"

    def cancel(self, conn: Connection) -> None:
        if self.sent.pop(conn, None) is not None:
            self.loop.remove(conn.sock)


def send_some(sock: socket.socket, data: bytes, offset: int) -> int:
    """Send what fits now from `offset`; the new offset, or -1 when the client is gone."""
    try:
        return offset + sock.send(data[offset:], socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return offset
    except OSError:
        return -1


class HostEnv(LookupStage):
    """tcpserver's TCPREMOTEHOST and TCPLOCALHOST (confirmed names, left out when there is
    none) and s6's TCPCONNNUM (this peer's connections to the service, this one included)."""

    name = "host_env"
    on_timeout = None

    def __init__(self, sources: Sources, timeout: float, active_from: Callable[[str], int]):
        super().__init__(sources, timeout)
        self.active_from = active_from

    def decide(self, conn: Connection, facts: Facts) -> str | None | list[Key]:
        if not isinstance(conn.addr, tuple):
            return None
        local = conn.sock.getsockname()[0]
        local = local[7:] if local.startswith("::ffff:") and "." in local else local
        missing = [k for k in (name_of(conn.peer), name_of(local)) if k not in facts]
        if missing:
            return missing
        env = dict(conn.env or {})
        for var, ip in (("TCPREMOTEHOST", conn.peer), ("TCPLOCALHOST", local)):
            name = facts[name_of(ip)]
            if name not in (None, UNKNOWN, PARANOID):
                env[var] = name
        env["TCPCONNNUM"] = str(self.active_from(conn.peer) + 1)
        conn.env = env
        return None


class FailBanner:
    """Wraps a stage: a refusal from it first sends `banner_fail` (what fits, no waiting)."""

    def __init__(self, inner: Stage, data: bytes):
        self.inner, self.data = inner, data
        self.name, self.deadline = inner.name, inner.deadline

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        def failing(c: Connection, reason: str | None) -> None:
            if reason is not None:
                send_some(c.sock, self.data, 0)
            done(c, reason)

        result = self.inner.check(conn, failing)
        if isinstance(result, str):
            send_some(conn.sock, self.data, 0)
        return result

    def expired(self, conn: Connection) -> str | None:
        reason = self.inner.expired(conn)
        if reason is not None:
            send_some(conn.sock, self.data, 0)
        return reason

    def cancel(self, conn: Connection) -> None:
        self.inner.cancel(conn)


def early_stages(config: Service, bans: Bans, log: Log, loop: Loop) -> list[Stage]:
    stages: list[Stage] = []
    if config.sensor:
        stages.append(Sensor(bans, config.deny_time, log, config.name))
    elif config.sensor_bans:
        stages.append(Banned(bans))
    if config.banner:
        stages.append(Banner("banner", config.banner, loop))
    if config.max_load:
        stages.append(MaxLoad(config.max_load))
    if config.access_times:
        stages.append(AccessTimes(config.access_times))
    if config.per_source_rate:
        stages.append(PerSourceRate(config.per_source_rate))
    return stages


def late_stages(config: Service, sources: Sources, active_from: Callable[[str], int],
                loop: Loop) -> list[Stage]:
    stages: list[Stage] = []
    if config.host_env:
        stages.append(HostEnv(sources, config.lookup_timeout, active_from))
    if config.banner_success:
        stages.append(Banner("banner_success", config.banner_success, loop))
    return stages


def with_fail_banner(stages: list[Stage], data: bytes) -> list[Stage]:
    if not data:
        return stages
    return [s if isinstance(s, Banner) else FailBanner(s, data) for s in stages]
