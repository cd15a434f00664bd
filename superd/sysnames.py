"""What the system says about names: /etc/nsswitch.conf, /etc/hosts and /etc/resolv.conf.

superd's resolver (superd/resolver.py) asks name servers itself, so it must read the files
the C library reads: which sources to use and in which order (`hosts:` in nsswitch.conf; of
those, `files` and `dns` are known here, `resolve` counts as `dns`), the hosts file, and the
name servers with their timeout and attempts. The files are read again when they change
(looked at no more than once every CHECK_EVERY seconds), so an edit takes effect at once.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from superd.safefile import read_regular

NSSWITCH, HOSTS, RESOLV = "/etc/nsswitch.conf", "/etc/hosts", "/etc/resolv.conf"
CHECK_EVERY = 2.0
MAX_FILE = 4 << 20  # a hosts file bigger than this is not read whole


@dataclass(frozen=True)
class Names:
    """One reading of the three files."""

    sources: tuple[str, ...] = ("files", "dns")
    forward: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> addresses
    reverse: dict[str, str] = field(default_factory=dict)  # address -> its first name
    servers: tuple[str, ...] = ("127.0.0.1",)
    timeout: float = 5.0
    attempts: int = 2

    def hosts_addresses(self, name: str, version: int) -> tuple[str, ...]:
        return tuple(a for a in self.forward.get(name.lower().rstrip("."), ())
                     if ipaddress.ip_address(a).version == version)


def _read(path: str) -> str:
    try:
        return read_regular(path, MAX_FILE).decode("utf-8", "replace")
    except OSError:
        return ""


def parse_sources(text: str) -> tuple[str, ...]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0] == "hosts:":
            names = [w for w in words[1:] if not w.startswith("[")]
            known = tuple(dict.fromkeys("dns" if n == "resolve" else n for n in names
                                        if n in ("files", "dns", "resolve")))
            return known
    return ("files", "dns")


def parse_hosts(text: str) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    forward: dict[str, list[str]] = {}
    reverse: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 2:
            continue
        try:
            addr = str(ipaddress.ip_address(words[0].split("%")[0]))
        except ValueError:
            continue
        reverse.setdefault(addr, words[1])
        for name in words[1:]:
            got = forward.setdefault(name.lower().rstrip("."), [])
            if addr not in got:
                got.append(addr)
    return {k: tuple(v) for k, v in forward.items()}, reverse


def parse_resolv(text: str) -> tuple[tuple[str, ...], float, int]:
    servers: list[str] = []
    timeout, attempts = 5.0, 2
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver" and len(servers) < 3:
            try:
                servers.append(str(ipaddress.ip_address(words[1].split("%")[0])))
            except ValueError:
                pass
        elif words and words[0] == "options":
            for opt in words[1:]:
                key, _, value = opt.partition(":")
                if key == "timeout" and value.isdigit():
                    timeout = float(min(max(int(value), 1), 30))
                elif key == "attempts" and value.isdigit():
                    attempts = min(max(int(value), 1), 5)
    return tuple(servers) or ("127.0.0.1",), timeout, attempts


def _stamp(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (0, 0, 0)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class SystemNames:
    """The current `Names`, read again when one of the files changed."""

    def __init__(self, clock: Callable[[], float],
                 paths: tuple[str, str, str] = (NSSWITCH, HOSTS, RESOLV)):
        self.clock, self.paths = clock, paths
        self.stamps: tuple[tuple[int, int, int], ...] = ()
        self.checked = -CHECK_EVERY
        self.names = Names()

    def current(self) -> Names:
        now = self.clock()
        if now - self.checked >= CHECK_EVERY:
            self.checked = now
            stamps = tuple(_stamp(p) for p in self.paths)
            if stamps != self.stamps:
                self.stamps = stamps
                self.names = self._load()
        return self.names

    def _load(self) -> Names:
        nsswitch, hosts, resolv = (_read(p) for p in self.paths)
        forward, reverse = parse_hosts(hosts)
        servers, timeout, attempts = parse_resolv(resolv)
        return Names(parse_sources(nsswitch) if nsswitch else ("files", "dns"), forward,
                     reverse, servers, timeout, attempts)
