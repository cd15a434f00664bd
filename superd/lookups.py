"""What the stages of one connection learn about its peer, each thing asked for once.

A fact is one of: the addresses of a name (`("addrs", NAME, 4|6)`: a resolver Result), the
confirmed name of an address (`("name", IP)`: a name, UNKNOWN, PARANOID, or None when the
lookup failed) or the ident answer for the connection (`USER`: an Identity or None). Stages
that need facts call `ask`: what is known (cached) answers at once, the rest is asked for in
parallel and `then` runs once everything is in. A connection's facts travel with it
(`Connection.facts`), so a later stage (tcp_wrappers after only_from, say) never asks again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from superd import ident
from superd.facts import FAILED, USER, Key, Result, addrs, name_of
from superd.loop import Loop
from superd.pipeline import WAIT, Connection, Done, Waiting
from superd.resolver import Resolver

__all__ = ["USER", "Key", "addrs", "name_of", "Facts", "Sources", "LookupStage", "facts_of"]
MAX_ROUNDS = 8  # lookups one stage may chain (a name, then its addresses...)
GRACE = 0.5  # a stage waits this much past its lookup_timeout: the lookups time out first
class Sources:
    """Where facts come from; one for the whole daemon."""

    def __init__(self, loop: Loop, resolver: Resolver):
        self.loop, self.resolver = loop, resolver


class Facts:
    def __init__(self, sources: Sources, conn: Connection, ident_timeout: float):
        self.sources, self.conn, self.ident_timeout = sources, conn, ident_timeout
        self.known: dict[Key, Any] = {}
        self.missing: set[Key] = set()
        self.then: Callable[[], None] | None = None
        self.ident: ident.Query | None = None
        self.until = time.monotonic() + ident_timeout  # the stage's end: what lookups have

    def left(self) -> float:
        return max(self.until - time.monotonic(), 0.0)

    def __contains__(self, key: Key) -> bool:
        return key in self.known

    def __getitem__(self, key: Key) -> Any:
        return self.known[key]

    def ask(self, keys: Iterable[Key], then: Callable[[], None]) -> bool:
        """Ask for what is not known yet: True when all of `keys` are known now; otherwise
        False, and `then()` runs once they are."""
        self.then = None
        for key in keys:
            if key in self.known or key in self.missing:
                continue
            self.missing.add(key)
            self._start(key)
        if not self.missing:
            return True
        self.then = then
        return False

    def _start(self, key: Key) -> None:
        resolver = self.sources.resolver
        if key[0] == "addrs":
            result = resolver.addresses(key[1], key[2], lambda r: self._got(key, r),
                                        self.left())
            if result is not None:
                self._set(key, result)
        elif key[0] == "name":
            name = resolver.confirmed_name(key[1], lambda n: self._got(key, n), self.left())
            if name is not False:
                self._set(key, name)
        elif not isinstance(self.conn.addr, tuple):
            self._set(key, None)  # a unix peer has no ident server
        else:
            self.ident = ident.Query(self.sources.loop, self.conn.sock, self.conn.addr,
                                     max(self.left(), 0.1), lambda i: self._got(key, i))

    def _got(self, key: Key, value: Result | str | ident.Identity | None) -> None:
        if key in self.known:
            return  # given up on (cancel) before the answer came
        self._set(key, value)
        if not self.missing and self.then is not None:
            then, self.then = self.then, None
            then()

    def _set(self, key: Key, value: object) -> None:
        self.known[key] = value
        self.missing.discard(key)

    def cancel(self) -> None:
        """A stage stops waiting (its deadline, or the connection is dropped): what is still
        missing counts as failed from now on, and answers that come later are ignored."""
        self.then = None
        for key in list(self.missing):
            self._set(key, FAILED if key[0] == "addrs" else None)
        if self.ident is not None:
            self.ident.cancel()


def facts_of(conn: Connection, sources: Sources, ident_timeout: float) -> Facts:
    facts: Facts | None = getattr(conn, "facts", None)
    if facts is None:
        facts = conn.facts = Facts(sources, conn, ident_timeout)
    return facts


class LookupStage:
    """A stage that decides from facts it may have to look up first (see the docstring)."""

    name = "lookup"
    on_timeout: str | None = "dns"  # what a passed deadline means: refuse, or go on

    def __init__(self, sources: Sources, timeout: float):
        self.sources, self.timeout = sources, timeout
        # the lookups a stage starts are given `timeout` (the resolver fits its tries to it,
        # an ident question times out by itself), so they fail before the stage gives up
        self.deadline = timeout + GRACE

    def decide(self, conn: Connection, facts: Facts) -> str | None | list[Key]:
        """None: go on; a reason: refuse; a list: the facts still missing."""
        raise NotImplementedError

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        facts = facts_of(conn, self.sources, self.timeout)
        facts.until = time.monotonic() + self.timeout  # this stage's own time to wait
        return self._step(conn, facts, done)

    def _step(self, conn: Connection, facts: Facts, done: Done) -> str | None | Waiting:
        for _ in range(MAX_ROUNDS):
            got = self.decide(conn, facts)
            if not isinstance(got, list):
                return got
            if not facts.ask(got, lambda: self._resume(conn, facts, done)):
                return WAIT
        return self.on_timeout

    def _resume(self, conn: Connection, facts: Facts, done: Done) -> None:
        result = self._step(conn, facts, done)
        if not isinstance(result, Waiting):
            done(conn, result)

    def expired(self, conn: Connection) -> str | None:
        return self.on_timeout

    def cancel(self, conn: Connection) -> None:
        facts: Facts | None = getattr(conn, "facts", None)
        if facts is not None:
            facts.cancel()
