"""Address rules that may name hosts: `10.0.0.0/8`, `localhost`, `.example.com`.

A rule list is split once, at load, into networks (matched in the loop at no cost) and names:
a host name matches the addresses it resolves to, a `.domain` matches a peer whose confirmed
name (superd/resolver.py, tcpd's PARANOID check) ends with it. Both count as specific as a
single address. What must be looked up for one peer is given by `needs`, and `match` then
answers from the facts alone (superd/facts.py; superd/lookups.py looks them up): how specific
the best match is, and whether a lookup it needed failed (so a caller can refuse, not allow).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any, Protocol

from superd.facts import PARANOID, UNKNOWN, Key, Result, addrs, name_of

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?")
DOMAIN = re.compile(r"\.[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*")
NO_MATCH = -1


class Known(Protocol):
    """What is known of a connection (lookups.Facts): fact key -> answer."""

    def __contains__(self, key: Key) -> bool: ...
    def __getitem__(self, key: Key) -> Any: ...


def is_name(text: str) -> bool:
    """A host name or a .domain, not something that only looks like an address."""
    if DOMAIN.fullmatch(text):
        return True
    return bool(HOST.fullmatch(text)) and not re.fullmatch(r"[\d.]+", text)


def split(items: list[str]) -> tuple[tuple[Network, ...], tuple[str, ...]]:
    """Networks and names (lower case); ValueError naming the first item that is neither."""
    nets: list[Network] = []
    names: list[str] = []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
            continue
        except ValueError:
            pass
        if not is_name(item):
            raise ValueError(f"{item!r} is not an IP address, a CIDR, a host name or a "
                             ".domain")
        name = item.lower().rstrip(".") if not item.startswith(".") else item.lower()
        if name not in names:
            names.append(name)
    return tuple(nets), tuple(names)


@dataclass(frozen=True)
class HostSet:
    """One rule list: its networks and its names."""

    nets: tuple[Network, ...] = ()
    names: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.nets or self.names)

    def needs(self, ip: str) -> list[Key]:
        """The facts `match` needs for a peer at `ip`."""
        version = ipaddress.ip_address(ip).version
        keys = [addrs(n, version) for n in self.names if not n.startswith(".")]
        if any(n.startswith(".") for n in self.names):
            keys.append(name_of(ip))
        return keys

    def net_match(self, ip: str) -> int:
        """The longest matching prefix among the networks, or NO_MATCH."""
        addr = plain(ip)
        return max((n.prefixlen for n in self.nets if addr in n), default=NO_MATCH)

    def match(self, ip: str, facts: Known) -> tuple[int, bool]:
        """(specificity of the best match or NO_MATCH, whether a lookup it needed failed)."""
        addr = plain(ip)
        best = self.net_match(ip)
        full = addr.max_prefixlen
        failed = False
        for name in self.names:
            if name.startswith("."):
                host = facts[name_of(ip)]
                if host is None:
                    failed = True
                elif host not in (UNKNOWN, PARANOID) and host.lower().endswith(name):
                    best = full
            else:
                result: Result = facts[addrs(name, addr.version)]
                if not result.ok:
                    failed = True
                elif any(plain(a) == addr for a in result.values):
                    best = full
        return best, failed


def plain(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, IPv4-mapped IPv6 taken as the IPv4 address it is."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True)
class Rule:
    """One entry of `rules:` (superd/rules.py runs them)."""

    allow: bool
    hosts: HostSet
    env: tuple[tuple[str, str], ...] = ()
