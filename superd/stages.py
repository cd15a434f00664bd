"""The pre-start stages a connection may pass before admission, and which a service has.

A stage is a small class with the `pipeline.Stage` shape: `check` answers at once or WAITs,
`expired` says what a passed deadline means, `cancel` undoes what a waiting check set up.
`build()` makes a service's list once, from its table entry, in the order they run: a new
stage is one class here (or in a module of its own) and one line in `build()`. A service
whose entry asks for none of them gets an empty list, and its connections skip this step.

Stages that must look something up (a name, the ident answer) are `lookups.LookupStage`s:
they say which facts they miss, `superd/lookups.py` asks for them without blocking, and the
stage decides once they are in. The daemon's one resolver and sensor ban list are `Shared` by all
services of a loop.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

from superd import policy, wrappers
from superd.access import Network, allowed
from superd.config import Service
from superd.hostpatterns import NO_MATCH, HostSet, plain
from superd.log import Log
from superd.lookups import USER, Facts, Key, LookupStage, Sources
from superd.loop import Loop
from superd.pipeline import Connection, Done, Stage, Waiting
from superd.resolver import Resolver
from superd.rules import Rules


class Shared:
    """What every service of one loop shares: the resolver and the sensor bans."""

    def __init__(self, loop: Loop):
        self.sources = Sources(loop, Resolver(loop))
        self.bans = policy.Bans()


_SHARED: weakref.WeakKeyDictionary[Loop, Shared] = weakref.WeakKeyDictionary()


def shared_for(loop: Loop) -> Shared:
    """The loop's resolver and bans (made on first use)."""
    shared = _SHARED.get(loop)
    if shared is None:
        shared = _SHARED[loop] = Shared(loop)
    return shared


@dataclass
class Tools:
    """What a service's stages are given: the loop, the log, and how many connections of a
    peer the service has now (its limits count them)."""

    loop: Loop
    log: Log
    active_from: Callable[[str], int]

    @property
    def shared(self) -> Shared:
        return shared_for(self.loop)


class Access:
    """only_from / no_access: the most specific matching rule decides (refused: `address`)."""

    name = "access"
    deadline = 0.0  # never waits

    def __init__(self, only_from: tuple[Network, ...], no_access: tuple[Network, ...]):
        self.only_from, self.no_access = only_from, no_access

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        return None if allowed(conn.peer, self.only_from, self.no_access) else "address"

    def expired(self, conn: Connection) -> str | None:
        return None

    def cancel(self, conn: Connection) -> None:
        pass


class NameAccess(LookupStage):
    """only_from / no_access with host names or .domains in them (refused: `address`, or
    `dns` when a lookup that could have refused the peer failed)."""

    name = "access"

    def __init__(self, sources: Sources, timeout: float, only: HostSet, deny: HostSet):
        super().__init__(sources, timeout)
        self.only, self.deny = only, deny

    def decide(self, conn: Connection, facts: Facts) -> str | None | list[Key]:
        """Names are looked up only when they can change what the addresses decide."""
        ip = conn.peer
        if not isinstance(conn.addr, tuple):
            return None if not self.only else "address"  # a unix peer: no address to match
        allow_net, deny_net = self.only.net_match(ip), self.deny.net_match(ip)
        if deny_net == plain(ip).max_prefixlen:
            return "address"  # nothing can be more specific: no lookup needed
        if (allow_net != NO_MATCH or not self.only) and deny_net < allow_net or (
                not self.only and deny_net == NO_MATCH):
            # the addresses let it in: only a no_access name can change that
            missing = [k for k in self.deny.needs(ip) if k not in facts]
            if missing:
                return missing
            deny, deny_failed = self.deny.match(ip, facts)
            if deny_failed:
                return "dns"  # a no_access rule might have matched: refuse, never allow
            return "address" if deny != NO_MATCH and deny >= allow_net else None
        if not self.only.names:
            return "address"  # refused by the addresses, and no only_from name can let it in
        # an only_from name may let it in; a no_access name would then still win the tie
        missing = [k for k in self.only.needs(ip) + self.deny.needs(ip) if k not in facts]
        if missing:
            return missing
        allow, allow_failed = self.only.match(ip, facts)
        deny, deny_failed = self.deny.match(ip, facts)
        if deny_failed:
            return "dns"
        if deny != NO_MATCH and deny >= allow:
            return "address"
        if allow != NO_MATCH:
            return None
        return "dns" if allow_failed else "address"


class Ident(LookupStage):
    """Ask the client's ident server; TCPREMOTEINFO for the handler, a USERID log line.
    `required` (xinetd's IDONLY) refuses a client without an answer (reason `ident`)."""

    name = "ident"
    on_timeout = None

    def __init__(self, sources: Sources, timeout: float, required: bool,
                 log_userid: bool, log: Log, service: str):
        super().__init__(sources, timeout)
        self.required, self.log_userid, self.log, self.service = (required, log_userid, log,
                                                                  service)
        if required:
            self.on_timeout = "ident"

    def decide(self, conn: Connection, facts: Facts) -> str | None | list[Key]:
        if USER not in facts:
            return [USER]
        identity = facts[USER]
        if identity is None:
            return "ident" if self.required else None
        conn.userid = identity.user
        conn.env = {**(conn.env or {}), "TCPREMOTEINFO": identity.user}
        if self.log_userid:
            self.log.info(f"USERID: {self.service} {identity.text}", SUPERD_SERVICE=self.service,
                          REMOTE_ADDR=conn.peer)
        return None


def build(config: Service, tools: Tools | None = None) -> tuple[Stage, ...]:
    """The stages of `config`'s connections, in the order they run."""
    stages: list[Stage] = []
    if tools is not None and policy.wanted(config):
        stages += policy.early_stages(config, tools.shared.bans, tools.log, tools.loop)
    only = HostSet(config.only_from, config.only_from_names)
    deny = HostSet(config.no_access, config.no_access_names)
    if tools is not None and (only.names or deny.names):
        stages.append(NameAccess(tools.shared.sources, config.lookup_timeout, only, deny))
    elif config.only_from or config.no_access:
        stages.append(Access(config.only_from, config.no_access))
    if tools is not None:
        sources, timeout = tools.shared.sources, config.lookup_timeout
        if config.rules:
            stages.append(Rules(sources, timeout, config.rules))
        if config.ident:
            stages.append(Ident(sources, timeout, config.ident == "required",
                                "userid" in config.log_on_success | config.log_on_failure,
                                tools.log, config.name))
        if config.tcp_wrappers:
            stages.append(wrappers.TcpWrappers(sources, timeout, config.tcp_wrappers,
                                               tools.log))
        if policy.wanted(config):
            stages += policy.late_stages(config, sources, tools.active_from, tools.loop)
    return tuple(policy.with_fail_banner(stages, config.banner_fail))
