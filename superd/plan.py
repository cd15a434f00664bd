"""Which definition of each service runs once a table is read, at start or on a reload.

A service whose entry loads and whose addresses bind runs its new definition. One that does
not (a program removed by a package, a port someone else holds, a broken include file) keeps
the definition it runs, if it runs one, and otherwise waits to be tried again. A service
gone from the table stops, unless the file it came from could not be read at all: then
nothing is known of it, and it keeps running as it was. Nothing here touches a socket or a
process: `make_plan` only decides, the server carries it out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from superd.config import Service, Table
from superd.yamlsrc import Problem


@dataclass
class NotRunning:
    """A service the plan cannot run, and what to try again."""

    where: str  # FILE:LINE of its entry
    reason: str
    service: Service | None = None  # its definition, when only binding failed
    load: Callable[[], Service | list[Problem]] | None = None  # else: load it again


@dataclass
class Plan:
    run: dict[str, Service] = field(default_factory=dict)  # the definition each one runs
    kept: dict[str, str] = field(default_factory=dict)  # runs its old definition: why
    failed: dict[str, NotRunning] = field(default_factory=dict)  # does not run

    def summary(self, before: dict[str, Service]) -> str:
        """`N services; added a; removed b; changed c; kept d; failed e`, for the log."""
        added = sorted(self.run.keys() - before.keys())
        removed = sorted(before.keys() - self.run.keys())
        changed = sorted(n for n in self.run.keys() & before.keys()
                         if self.run[n] != before[n])
        parts = [f"{len(self.run)} services"] + [
            f"{what} {', '.join(names)}" for what, names in
            (("added", added), ("removed", removed), ("changed", changed),
             ("kept as they ran", sorted(self.kept)), ("not started", sorted(self.failed)))
            if names]
        return "; ".join(parts)


def make_plan(table: Table, running: dict[str, Service], bind_failures: dict[str, str]) -> Plan:
    """What runs after `table` was read and its services bound (`bind_failures` says which
    could not be), given what ran before (`running`: nothing at start)."""
    plan = Plan()
    for svc in table.enabled:
        why = bind_failures.get(svc.name)
        if why is None:
            plan.run[svc.name] = svc
        elif svc.name in running:
            plan.run[svc.name], plan.kept[svc.name] = running[svc.name], why
        else:
            plan.failed[svc.name] = NotRunning(svc.where, why, service=svc)
    for bad in table.failed:
        if bad.disabled:
            continue  # reported, never run
        if bad.name in running:
            plan.run[bad.name], plan.kept[bad.name] = running[bad.name], bad.reason
        else:
            plan.failed[bad.name] = NotRunning(bad.where, bad.reason,
                                               load=bad.retry if bad.transient else None)
    named = {s.name for s in table.services} | {f.name for f in table.failed}
    for name, svc in running.items():
        if name not in named and svc.file in table.broken_files:
            plan.run[name] = svc
            plan.kept[name] = f"{svc.file} could not be read"
    return plan
