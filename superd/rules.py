"""`rules:`: an ordered list of access rules, each allowing or refusing, and adding variables.

The first rule whose hosts match the peer decides (tcpserver's rules decide by specificity;
`superd import tcprules` writes them in that order). An `allow` rule's `env` goes into the
handler's environment (`RELAYCLIENT: ""`, as qmail's tcp.smtp sets it); a `deny` rule
refuses (`rules`). No rule matching lets the client in with nothing added. Hosts are written
as in only_from (addresses, CIDRs, host names, .domains, `all`). A lookup that fails (no answer
in time) for a `deny` rule refuses (`dns`); for an `allow` rule, that rule is passed over: the
client never gets variables it was not proved to deserve. A name is looked up only when its
rule can change the answer: not for the trailing `allow` rules without `env`.
"""

from __future__ import annotations

from superd.hostpatterns import NO_MATCH, Rule
from superd.lookups import Facts, Key, LookupStage, Sources
from superd.pipeline import Connection


class Rules(LookupStage):
    name = "rules"

    def __init__(self, sources: Sources, timeout: float, rules: tuple[Rule, ...]):
        super().__init__(sources, timeout)
        self.rules = rules
        # from which rule on the answer is "let in, nothing added" whatever matches: the
        # names of those rules are never looked up
        self.moot = len(rules)
        while self.moot and rules[self.moot - 1].allow and not rules[self.moot - 1].env:
            self.moot -= 1

    def decide(self, conn: Connection, facts: Facts) -> str | None | list[Key]:
        if not isinstance(conn.addr, tuple):
            return None  # a unix peer: no address to match
        for rule in self.rules[:self.moot]:
            if rule.hosts.net_match(conn.peer) == NO_MATCH:
                if not rule.hosts.names:
                    continue
                missing = [k for k in rule.hosts.needs(conn.peer) if k not in facts]
                if missing:
                    return missing
                best, failed = rule.hosts.match(conn.peer, facts)
                if best == NO_MATCH:
                    if failed and not rule.allow:
                        return "dns"
                    continue
            if not rule.allow:
                return "rules"
            if rule.env:
                conn.env = {**(conn.env or {}), **dict(rule.env)}
            return None
        return None
