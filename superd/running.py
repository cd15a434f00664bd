"""What runs: the table in force, a runtime per service on its listeners, the services that
wait for a retry; and how a new table, or a retry of one service, is taken.

A table is taken service by service (`apply`): each new definition that loads and binds
replaces the running one, one that does not leaves the running one in place (it is `kept`,
with the reason) or, for a new service, waits in `retries`. A retry loads the entry again in
a child process (superd/reader.py: loading runs handler code and may wait for names), then
binds and starts it in the loop. The server reads whole tables and says what happened;
this module only takes them.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

from superd.binding import ListenerPool, keys
from superd.config import Service, Table
from superd.listeners import Key, Listener
from superd.log import Log
from superd.plan import NotRunning, Plan, make_plan
from superd.reader import Reader, Result
from superd.retry import Attempt, Retries
from superd.service import ServiceRuntime, Shared


class Running:
    def __init__(self, table: Table, listeners: ListenerPool, shared: Shared, log: Log,
                 retries: Retries, reader: Reader, configure: Callable[[Table], None]):
        self.table = table
        self.listeners, self.shared, self.log = listeners, shared, log
        self.retries, self.reader = retries, reader
        self.configure = configure  # the daemon-wide settings of a table taken (log, limits)
        self.services: dict[str, ServiceRuntime] = {}
        self.kept: dict[str, str] = {}  # services running an older definition: why
        # When the table was last read and how it went: refused whole, or N problems.
        self.state: dict[str, Any] = {"read": int(time.time()), "refused": False,
                                      "problems": len(table.problems)}
        self.stopping = False

    def definitions(self) -> dict[str, Service]:
        return {name: runtime.config for name, runtime in self.services.items()}

    def apply(self, table: Table) -> Plan:
        """Take `table`: each service's new definition that loads and binds, the running one
        of each that does not; the rest wait for a retry."""
        pool, bind_failures = self.listeners.bind(list(table.enabled))
        plan = make_plan(table, self.definitions(), bind_failures)
        for name in list(plan.kept):  # a kept service keeps its sockets
            if plan.run[name].name in self.listeners.passed:
                continue
            old = keys(plan.run[name])
            if any(key in pool or key not in self.listeners.pool for key in old):
                del plan.run[name]
                reason = f"{plan.kept.pop(name)}; its old address is another's now"
                plan.failed[name] = NotRunning(f"{table.path}", reason)
                continue
            pool.update({key: self.listeners.pool[key] for key in old})
        self.install(table, plan.run, pool)
        self.retries.clear()
        for name, why in plan.failed.items():
            retry = why.service is not None or why.load is not None
            self.retries.add(name, why.where, why.reason, self.attempt(why) if retry else None)
        self.kept = dict(plan.kept)
        for name, reason in plan.kept.items():
            self.log.error(f"{name}: its new definition is not taken, it runs as it did: "
                           f"{reason}")
        return plan

    def attempt(self, why: NotRunning) -> Attempt:
        """Try a service that does not run again: load its entry (as it was read, in a child
        process), bind it, start serving it; `done` hears why not, or None."""
        def attempt(done: Callable[[str | None], None]) -> None:
            if why.service is None and why.load is not None:
                self.reader.run(why.load, lambda result: done(self._loaded(why, result)),
                                why.where)
            else:
                done(self._start(why.service, why.reason))
        return attempt

    def _loaded(self, why: NotRunning, result: Result) -> str | None:
        kind, value = result
        if kind != "ok":
            return "; ".join(map(str, value)) if kind == "refused" else str(value)
        if isinstance(value, list):
            return "; ".join(str(p) for p in value)
        return self._start(value, why.reason)

    def _start(self, svc: Service | None, reason: str) -> str | None:
        if svc is None or self.stopping:
            return reason
        if svc.name in self.services:
            return None  # a reload took it meanwhile
        listeners = self.listeners.try_bind(svc)
        if isinstance(listeners, str):
            return listeners
        self.services[svc.name] = ServiceRuntime(svc, self.shared)
        self._own_ports()
        self.services[svc.name].take(listeners)
        return None

    def install(self, table: Table, run: dict[str, Service], pool: dict[Key, Listener]) -> None:
        """Switch to `run` and `pool`: close what is gone, hand listeners to services."""
        for listener in self.listeners.all():
            self.unwatch(listener)  # each service watches its own again below
        self.listeners.install(pool)
        self.table = table
        self.configure(table)
        services: dict[str, ServiceRuntime] = {}
        for name, svc in run.items():
            runtime = self.services.get(name)
            if runtime is None:
                runtime = ServiceRuntime(svc, self.shared)
            else:
                runtime.configure(svc)
            services[name] = runtime
        for name, runtime in self.services.items():
            if name not in services:
                runtime.retire()  # its running handlers finish on their own
        self.services = services
        self._own_ports()
        for runtime in services.values():
            runtime.take(self.listeners.for_service(runtime.config))

    def _own_ports(self) -> None:
        self.shared.udp_ports = frozenset(
            lst.sock.getsockname()[1] for lst in self.listeners.all()
            if not lst.stream and lst.family in (socket.AF_INET, socket.AF_INET6))

    def unwatch(self, listener: Listener) -> None:
        self.shared.loop.remove(listener.sock)

    def released(self, listener: Listener) -> None:
        """A wait handler exited: the service that has its listener may poll it again."""
        if listener.sock.fileno() >= 0:
            listener.sock.setblocking(False)  # it had it blocking (ServiceRuntime.start_wait)
        for runtime in self.services.values():
            if listener in runtime.listeners:
                runtime.poll()
                return

    def log_problems(self, table: Table) -> None:
        for problem in table.problems:
            self.log.error(f"table problem: {problem}")

    def stop(self) -> None:
        self.stopping = True
        self.retries.clear()
        for runtime in self.services.values():
            runtime.stop()
