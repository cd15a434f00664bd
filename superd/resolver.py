"""Names and addresses looked up without ever stalling the loop.

A lookup in the C library (getaddrinfo, getnameinfo) blocks its caller for as long as a name
server takes, up to the resolver timeout times its attempts. superd asks the name servers of
/etc/resolv.conf itself instead, over UDP sockets watched by the loop, after /etc/hosts when
nsswitch.conf says so (superd/sysnames.py): each question is one datagram, each answer is
cached for its TTL (a negative one for the SOA's negative TTL, RFC 2308), and questions asked
again while one is on its way wait for the same answer. Each query goes out from a socket of
its own (a random source port) and the answer must come back from the server asked, with the
query's random id and the same question.

Every lookup answers at once when it can (cached, or in /etc/hosts) and otherwise calls back
later, exactly once. A lookup that fails (no answer within the timeouts, a server failure, a
truncated answer) is reported as failed, never as "no such name": a caller deciding about
access must refuse on it, not allow.

`confirmed_name(ip)` is tcpd's PARANOID check: the address's name (PTR) counts only if that
name's own addresses include it; otherwise the name is `paranoid` (no PTR: `unknown`).
"""

from __future__ import annotations

import ipaddress
import secrets
import socket
import threading
import time
from collections.abc import Callable

from superd import dnswire
from superd.facts import FAILED, PARANOID, UNKNOWN, Result
from superd.loop import READ, Loop, Timer
from superd.sysnames import Names, SystemNames
from superd.values import Missing

MAX_CACHE = 10_000  # answers kept; beyond, the oldest go first
MAX_INFLIGHT = 512  # questions on their way at once; beyond, a lookup fails at once
MAX_TTL = 86_400
HOSTS_TTL = 0  # /etc/hosts answers are not cached: the file is read again when it changes
MIN_TRY = 0.25  # seconds one datagram is given at least; tries that do not fit are left out


Then = Callable[[Result], None]


def version_of(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def plan(names: Names, budget: float | None) -> tuple[list[str], float]:
    """The servers to ask in turn (each server, `attempts` rounds) and the seconds each try
    waits: resolv.conf's timeout, shortened so that every try fits in `budget` (the time the
    asking connection may wait: its lookup_timeout), so that no server is left untried."""
    servers = [s for _ in range(names.attempts) for s in names.servers]
    if budget is None or names.timeout * len(servers) <= budget:
        return servers, names.timeout
    tries = max(1, min(len(servers), int(budget / MIN_TRY)))
    return servers[:tries], max(budget / tries, MIN_TRY / 2)


class _Query:
    """One question on its way: tries each server in turn, `attempts` rounds."""

    def __init__(self, resolver: Resolver, key: tuple[int, str], names: Names,
                 budget: float | None):
        self.resolver, self.key = resolver, key
        self.plan, self.timeout = plan(names, budget)
        self.waiting: list[Then] = []
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        self.qid = 0
        self.server = ""

    def next(self) -> None:
        self._close()
        if not self.plan:
            self.resolver.answered(self.key, None)
            return
        self.server = self.plan.pop(0)
        self.qid = secrets.randbelow(0x10000)
        qtype, name = self.key
        family = socket.AF_INET6 if ":" in self.server else socket.AF_INET
        try:
            self.sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                      | socket.SOCK_CLOEXEC)
            self.sock.connect((self.server, 53))
            self.sock.send(dnswire.query(self.qid, name, qtype))
        except (OSError, ValueError):
            self.resolver.loop.call_later(0, self.next)  # not now, not recursively
            self._close()
            return
        loop = self.resolver.loop
        loop.add(self.sock, READ, self.readable)
        self.timer = loop.call_later(self.timeout, self.next)

    def readable(self, mask: int) -> None:
        if self.sock is None:
            return
        qtype, name = self.key
        for _ in range(8):  # stray datagrams are dropped; a few a turn at most
            try:
                data = self.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # ICMP port unreachable: this server is not there
                self.next()
                return
            try:
                _, answer = dnswire.parse(data, self.qid, name, qtype)
            except dnswire.BadMessage:
                continue
            except (dnswire.Truncated, ValueError):
                self.plan = []  # not usable, and no other server would answer shorter
                answer = None
            if answer is None:  # the server failed: ask the next one
                self.next()
                return
            self._close()
            self.resolver.answered(self.key, answer)
            return

    def _close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.resolver.loop.remove(self.sock)
            self.sock.close()
            self.sock = None

    def abandon(self) -> None:
        self.plan = []
        self._close()


class Resolver:
    """Lookups for the whole daemon (one per loop): see the module docstring."""

    def __init__(self, loop: Loop, clock: Callable[[], float] = time.monotonic,
                 system: SystemNames | None = None):
        self.loop, self.clock = loop, clock
        self.system = system or SystemNames(clock)
        self.cache: dict[tuple[int, str], tuple[float, dnswire.Answer]] = {}
        self.inflight: dict[tuple[int, str], _Query] = {}

    # -- what callers ask --------------------------------------------------------------------

    def addresses(self, name: str, version: int, then: Then,
                  budget: float | None = None) -> Result | None:
        """The IPv4 (version 4) or IPv6 addresses of `name`; None: `then(result)` later, within
        `budget` seconds when one is given."""
        names = self.system.current()
        for source in names.sources:
            if source == "files":
                found = names.hosts_addresses(name, version)
                if found:
                    return Result(True, found)
            elif source == "dns":
                return self._ask(dnswire.A if version == 4 else dnswire.AAAA, name, then,
                                 budget)
        return Result(True)

    def name_of(self, ip: str, then: Then, budget: float | None = None) -> Result | None:
        """The name (PTR) of `ip`, unconfirmed; None: `then(result)` later."""
        names = self.system.current()
        for source in names.sources:
            if source == "files":
                if ip in names.reverse:
                    return Result(True, (names.reverse[ip],))
            elif source == "dns":
                return self._ask(dnswire.PTR, dnswire.reverse_name(ip), then, budget)
        return Result(True)

    def confirmed_name(self, ip: str, then: Callable[[str | None], None],
                       budget: float | None = None) -> str | None | bool:
        """`ip`'s name confirmed by its forward lookup, UNKNOWN, PARANOID, or None when a
        lookup failed. Returns it, or False: `then(name)` comes later. The PTR question is
        given half of `budget`, the forward one what is left."""
        return _Confirm(self, _plain(ip), then, budget).run()

    # -- the cache and the queries ------------------------------------------------------------

    def _ask(self, qtype: int, name: str, then: Then, budget: float | None) -> Result | None:
        key = (qtype, name.lower().rstrip("."))
        hit = self.cache.get(key)
        if hit is not None:
            if hit[0] > self.clock():
                return Result(True, hit[1].values)
            del self.cache[key]
        query = self.inflight.get(key)
        if query is None:
            if len(self.inflight) >= MAX_INFLIGHT:
                return FAILED
            try:
                dnswire.encode_name(key[1])
            except ValueError:
                return Result(True)  # not a name DNS can carry: there is no such name
            query = self.inflight[key] = _Query(self, key, self.system.current(),
                                                         budget)
            query.waiting.append(then)
            query.next()
            return None
        query.waiting.append(then)
        return None

    def answered(self, key: tuple[int, str], answer: dnswire.Answer | None) -> None:
        query = self.inflight.pop(key, None)
        if query is None:
            return
        if answer is not None and answer.ttl > 0:
            self._remember(key, answer)
        result = FAILED if answer is None else Result(True, answer.values)
        for then in query.waiting:
            then(result)

    def _remember(self, key: tuple[int, str], answer: dnswire.Answer) -> None:
        if len(self.cache) >= MAX_CACHE:
            now = self.clock()
            for k in [k for k, (t, _) in self.cache.items() if t <= now][:MAX_CACHE // 2]:
                del self.cache[k]
            while len(self.cache) >= MAX_CACHE:
                del self.cache[next(iter(self.cache))]
        self.cache[key] = (self.clock() + min(answer.ttl, MAX_TTL), answer)

    def close(self) -> None:
        for query in list(self.inflight.values()):
            query.abandon()
        self.inflight.clear()


class _Confirm:
    """PTR, then the forward lookup of the name found: at once or by callback, not both."""

    def __init__(self, resolver: Resolver, ip: str, then: Callable[[str | None], None],
                 budget: float | None):
        self.resolver, self.ip, self.then = resolver, ip, then
        self.until = None if budget is None else resolver.clock() + budget
        self.waited = False
        self.verdict: str | None | bool = False

    def left(self, share: float = 1.0) -> float | None:
        if self.until is None:
            return None
        return max((self.until - self.resolver.clock()) * share, MIN_TRY)

    def run(self) -> str | None | bool:
        got = self.resolver.name_of(self.ip, self.ptr_done, self.left(0.5))
        if got is not None:
            self.ptr_done(got)
        self.waited = True
        return self.verdict

    def ptr_done(self, r: Result) -> None:
        if not r.ok or not r.values:
            self.finish(None if not r.ok else UNKNOWN)
            return
        name = r.values[0].rstrip(".")
        got = self.resolver.addresses(name, version_of(self.ip),
                                      lambda f: self.forward_done(f, name), self.left())
        if got is not None:
            self.forward_done(got, name)

    def forward_done(self, r: Result, name: str) -> None:
        self.finish(None if not r.ok else (name if self.ip in _plain_all(r.values)
                                           else PARANOID))

    def finish(self, verdict: str | None) -> None:
        if self.waited:
            self.then(verdict)
        else:
            self.verdict = verdict


def _plain(ip: str) -> str:
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _plain_all(values: tuple[str, ...]) -> set[str]:
    return {_plain(v) for v in values}


LOAD_TIMEOUT = 5.0  # seconds a table load waits for the addresses of one name


def addresses_now(name: str, timeout: float = LOAD_TIMEOUT) -> list[str]:
    """The addresses of `name` as the C library finds them (nsswitch, /etc/hosts, DNS), for
    the table's own names (listen, redirect) when it is loaded. The lookup runs in a thread
    so that it can be given up after `timeout`. Missing when there is no address: a name
    server not reachable yet (at boot) is a reason to try the service again, not a mistake."""
    found: list[list[str]] = []

    def look() -> None:
        try:
            infos = socket.getaddrinfo(name, None, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            infos = []
        found.append(list(dict.fromkeys(str(i[4][0]).split("%")[0] for i in infos)))

    thread = threading.Thread(target=look, name=f"resolve {name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not found:
        raise Missing(f"{name}: no answer from the name service within {timeout:g} s")
    if not found[0]:
        raise Missing(f"{name}: the name does not resolve")
    return found[0]
