"""The names of what a connection's stages may learn about its peer, and the answers' shapes.

Kept apart from the code that looks things up (superd/resolver.py, superd/lookups.py) so that
the table's records (superd/config.py) and the matching of host rules (hostpatterns.py) can
speak of them without importing the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What superd sets from the connection itself: a rule or hosts.allow's setenv may not set them.
CONNECTION_VARS = frozenset({"PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP",
                             "TCPLOCALPORT", "REMOTE_ADDR", "REMOTE_PORT", "REMOTE_HOST"})
UNKNOWN, PARANOID = "unknown", "paranoid"  # the words tcpd uses: no name / a name that lies
USER = ("user",)  # the ident answer for the connection: an ident.Identity, or None
Key = tuple[Any, ...]


@dataclass(frozen=True)
class Result:
    """`ok` False: the lookup failed and nothing is known. Otherwise `values` (empty: no such
    name or record) are the addresses or names found."""

    ok: bool
    values: tuple[str, ...] = ()


FAILED = Result(False)


def addrs(name: str, version: int) -> Key:
    """The IPv4 (4) or IPv6 (6) addresses of a name: a Result."""
    return ("addrs", name.lower().rstrip("."), version)


def name_of(ip: str) -> Key:
    """The confirmed name of an address: a name, UNKNOWN, PARANOID, or None (failed)."""
    return ("name", ip)
