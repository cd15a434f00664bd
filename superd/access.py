"""only_from / no_access: the most specific matching rule decides (SPEC §2, as xinetd does)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed(ip: str, only_from: tuple[Network, ...], no_access: tuple[Network, ...]) -> bool:
    """Is `ip` let in? No rules: yes. Otherwise the longest matching prefix wins, and on a tie
    `no_access` wins. With only_from given, an address it does not match is refused."""
    if not only_from and not no_access:
        return True
    return _decide(ip, only_from, no_access)


@lru_cache(maxsize=4096)
def _decide(ip: str, only_from: tuple[Network, ...], no_access: tuple[Network, ...]) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return not only_from  # a unix peer: address rules do not apply to it
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    allow = max((n.prefixlen for n in only_from if addr in n), default=-1)
    deny = max((n.prefixlen for n in no_access if addr in n), default=-1)
    if deny >= 0 and deny >= allow:
        return False
    return allow >= 0 or not only_from


@lru_cache(maxsize=4096)
def is_unicast(ip: str) -> bool:
    """False for multicast and broadcast sources, which no datagram service should answer."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return True
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return not (addr.is_multicast or (addr.version == 4 and str(addr).endswith(".255")))
