"""The arbiter: owns the table, the listeners, the services and the process table; reloads
and stops.

Read `run()` first: it is the main loop. Signals arrive as events and are dispatched to
`handle_<name>()`. What happens to a connection is the services' business (superd/service.py);
the server only hands each service its listeners, the shared parts it needs, and the news
about processes (reaped here, or reported by a spawner) through the process table.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import traceback
from typing import Any

from superd import daemonize, report, takeover, upgrade
from superd.binding import ListenerPool, keys
from superd.config import Service, Table, read_table
from superd.control import ControlSocket
from superd.listeners import Key, Listener
from superd.log import Log
from superd.loop import READ, Loop, Timer
from superd.plan import NotRunning, Plan, make_plan
from superd.processes import ProcessTable
from superd.retry import Attempt, Retries
from superd.service import ServiceRuntime, Shared
from superd.sessions import SessionTable
from superd.spawn import HANDLED_SIGNALS, open_devnull
from superd.spawners import SPAWNER, Spawners
from superd.start import Starter
from superd.systemd import Notifier
from superd.yamlsrc import TableError

ORPHAN_WAIT = 0.2  # after a spawner died, when its handlers are surely superd's children
SPAWNERS = max(1, min(4, os.cpu_count() or 1))
MAX_TRACEBACKS = 10  # per minute; beyond, the internal errors are only counted


class Server:
    def __init__(self, table: Table, log: Log, passed: dict[str, list[Listener]] | None = None):
        self.table = table
        self.log = log
        self.loop = Loop(self.handle_signal, HANDLED_SIGNALS, self.internal_error)
        self.notifier = Notifier(self.loop.call_later)
        log.attach(self.loop)
        self.errors: list[float] = []
        self.processes = ProcessTable(
            table.settings.max_children, self.released, self.loop.call_later, self.helper_pids)
        self.pools: list[Spawners] = []  # every helper pool: the spawners, the python hosts
        self.listeners = ListenerPool(passed or {}, log.info, self.unwatch)
        self.services: dict[str, ServiceRuntime] = {}
        self.spawners: Spawners | None = None
        s = table.settings
        self.sessions = SessionTable(self.loop, s.max_sessions, s.idle_timeout, s.max_buffered)
        self.shared = Shared(self.loop, log, self.processes,
                             Starter(self.loop, self.processes, lambda: self.spawners),
                             self.sessions, self.counts_changed, self.new_pool)
        self.retries = Retries(self.loop.call_later, log.error, self.counts_changed)
        # When the table was last read and how it went: refused whole, or N problems.
        self.table_state: dict[str, Any] = {"read": int(time.time()), "refused": False,
                                            "problems": len(table.problems)}
        self.kept: dict[str, str] = {}  # services running an older definition: why
        self.started_at = time.monotonic()
        self.upgrades = 0  # superd upgrades this daemon (this pid) went through
        self.last_upgrade_error: str | None = None
        self.pidfile: str | None = None  # --daemon --pidfile: removed at exit
        self.stopping = False
        self.control: ControlSocket | None = None
        self.status_timer: Timer | None = None

    # -- main loop ---------------------------------------------------------------------------

    def start(self) -> None:
        """Serve every service of the table that loads and binds; the others wait for a
        retry (superd/retry.py) and say why."""
        named = {s.name for s in self.table.enabled} | {f.name for f in self.table.failed}
        passed = self.listeners.passed
        for name in [n for n in passed if n not in named]:
            self.log.error(f"socket passed by systemd named {name!r} matches no service; "
                           "closing it")
            for listener in passed.pop(name):
                listener.close()
        open_devnull()
        self.log_problems(self.table)
        self.apply(self.table)
        self.serving(f"started: {len(self.services)} services, pid {os.getpid()}")

    def serving(self, said: str) -> None:
        """The table is in place: the spawners, the control socket, and READY=1."""
        try:
            self.spawners = self.new_pool(SPAWNERS, SPAWNER)
        except OSError as e:
            self.log.error(f"{e}; exec handlers are started by the loop itself")
        self.open_control(self.table.settings.control_socket)
        self.log.info(said)
        self.notifier.notify("READY=1")
        self.send_status()
        self.watchdog()

    def resume(self, state: dict[str, Any]) -> None:
        """Start as the superd that takes over from an earlier one (superd upgrade): its
        sockets, handlers, sessions, helpers and counters are this one's now."""
        open_devnull()
        self.log_problems(self.table)
        self.listeners.inherit(takeover.inherited_listeners(state))
        self.apply(self.table)
        self.listeners.drop_inherited()
        self.pidfile = state.get("pidfile")
        said = takeover.resume(self, state)
        self.handle_chld()  # what ended during the exec
        self.serving(f"upgraded: pid {os.getpid()}, {len(self.services)} services; {said}")

    def upgrade(self) -> str | None:
        """Hand everything over to the superd installed now, in this very process (the same
        pid): it goes on from here. Returns why not, if it cannot (this one goes on then)."""
        if self.stopping:
            return "superd is stopping"
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        state, fds = takeover.export(self, self.pidfile)
        self.log.info(f"upgrading: handing {len(self.processes)} handlers and "
                      f"{len(self.sessions)} sessions over to {sys.executable} -m superd")
        self.log.close()
        why = upgrade.hand_over(state, self.table.path, fds)
        self.log.attach(self.loop)
        self.log.error(f"upgrade failed, going on as before: {why}")
        self.last_upgrade_error = why
        self.notifier.notify("READY=1")
        return why

    def run(self) -> None:
        while not (self.stopping and not len(self.processes)):
            self.loop.run_once()
        for pool in list(self.pools):
            pool.close()
        if self.upgrades and self.pidfile:  # python-daemon's own removal went with the exec
            daemonize.remove_pidfile(self.pidfile)
        self.log.info("stopped")
        self.log.close()
        self.loop.close()

    def handle_signal(self, signum: int) -> None:
        try:
            name = signal.Signals(signum).name[3:].lower()
        except ValueError:
            return  # a real-time signal our parent had ignored: ignored still
        handler = getattr(self, f"handle_{name}", None)
        if handler is not None:
            handler()

    def handle_hup(self) -> None:
        self.reload()  # problems, if any, are in the log

    def handle_term(self) -> None:
        self.stop()

    handle_int = handle_term

    def handle_usr1(self) -> None:
        """xinetd's state dump: what `superd status` shows, into the log."""
        for line in report.status_lines(self.status()):
            self.log.info(line)

    def handle_usr2(self) -> None:
        """`superd upgrade`: the installed superd takes over, in place."""
        self.upgrade()  # (if it cannot, why is in the log and in the status)

    def handle_quit(self) -> None:
        self.log.info("SIGQUIT ignored (SIGTERM stops superd)")

    def handle_chld(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.processes.exited(pid, status)

    def internal_error(self, exc: BaseException, where: str) -> None:
        """The last-resort guard (superd/loop.py): say what broke, with its traceback, and
        carry on. Tracebacks are capped per minute, so a fault that repeats cannot flood."""
        now = time.monotonic()
        self.errors = [t for t in self.errors if now - t < 60] + [now]
        self.log.error(f"internal error in {where}: {type(exc).__name__}: {exc}; carrying on")
        if len(self.errors) <= MAX_TRACEBACKS:
            for chunk in traceback.format_exception(exc):
                for line in chunk.rstrip("\n").split("\n"):
                    self.log.error(f"  {line}")

    # -- processes ---------------------------------------------------------------------------

    def unanswered(self, tokens: list[int]) -> None:
        """A spawner died before answering these requests: some may have become handlers,
        which are superd's children a moment later (subreaper). Find them then."""
        self.loop.call_later(ORPHAN_WAIT, lambda: self.adopt(tokens))

    def adopt(self, tokens: list[int]) -> None:
        for handler in self.processes.adopt(tokens, self.helper_pids()):
            self.log.info(f"{handler.owner.name}: handler pid {handler.pid} was started by a "
                          "spawner that died before saying so")

    def new_pool(self, count: int, script: str, record: bytes | None = None) -> Spawners:
        """Helper processes that start handlers (spawners, or a python service's host)."""
        pool = Spawners(count, **self.pool_callbacks(), script=script, record=record)
        self.pools.append(pool)
        return pool

    def pool_callbacks(self) -> dict[str, Any]:
        """What a pool of helpers tells (the process table) and asks (the loop)."""
        return {"watch": lambda sock, callback: self.loop.add(sock, READ, callback),
                "unwatch": self.loop.remove, "started": self.processes.answered,
                "exited": self.processes.exited, "lost": self.log.error,
                "unanswered": self.unanswered, "closed": self.pools.remove}

    def helper_pids(self) -> set[int]:
        return {pid for pool in self.pools for pid in pool.pids}

    def released(self, listener: Listener) -> None:
        """A wait handler exited: the service that has its listener may poll it again."""
        if listener.sock.fileno() >= 0:
            listener.sock.setblocking(False)  # it had it blocking (ServiceRuntime.start_wait)
        for runtime in self.services.values():
            if listener in runtime.listeners:
                runtime.poll()
                return

    def unwatch(self, listener: Listener) -> None:
        self.loop.remove(listener.sock)

    # -- the table ---------------------------------------------------------------------------

    def running(self) -> dict[str, Service]:
        return {name: runtime.config for name, runtime in self.services.items()}

    def apply(self, table: Table) -> Plan:
        """Take `table`: each service's new definition that loads and binds, the running one
        of each that does not; the rest wait for a retry."""
        pool, bind_failures = self.listeners.bind(list(table.enabled))
        plan = make_plan(table, self.running(), bind_failures)
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
        """Try a service that does not run again: load its entry (as it was read), bind it,
        start serving it."""
        def attempt() -> str | None:
            svc = why.service
            if svc is None and why.load is not None:
                got = why.load()
                if isinstance(got, list):
                    return "; ".join(str(p) for p in got)
                svc = got
            if svc is None or self.stopping:
                return why.reason
            listeners = self.listeners.try_bind(svc)
            if isinstance(listeners, str):
                return listeners
            self.services[svc.name] = ServiceRuntime(svc, self.shared)
            self._own_ports()
            self.services[svc.name].take(listeners)
            return None
        return attempt

    def install(self, table: Table, run: dict[str, Service], pool: dict[Key, Listener]) -> None:
        """Switch to `run` and `pool`: close what is gone, hand listeners to services."""
        for listener in self.listeners.all():
            self.unwatch(listener)  # each service watches its own again below
        self.listeners.install(pool)
        self.table = table
        self.processes.max_children = table.settings.max_children
        s = table.settings
        self.sessions.configure(s.max_sessions, s.idle_timeout, s.max_buffered)
        self.log.configure(table.settings, table.service_logs)
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

    def log_problems(self, table: Table) -> None:
        for problem in table.problems:
            self.log.error(f"table problem: {problem}")

    def reload(self) -> list[str]:
        """SIGHUP: read the table again and take of it what loads and binds (`apply`).

        Returns the problems found (empty when all of it was taken). Only a table that cannot
        be read at all changes nothing.
        """
        if self.stopping:
            return ["superd is stopping"]
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            table = read_table(self.table.path, self.table.settings)
        except TableError as e:
            problems = [str(p) for p in e.problems]
            for problem in problems:
                self.log.error(f"reload refused, keeping the running table: {problem}")
            self.table_state = {"read": int(time.time()), "refused": True,
                                "problems": len(problems)}
            self.notifier.notify("READY=1")
            self.send_status()
            return problems
        self.log_problems(table)
        before = self.running()
        plan = self.apply(table)
        if self.control is None or self.control.path != table.settings.control_socket:
            self.open_control(table.settings.control_socket)
        self.log.info("reloaded: " + plan.summary(before))
        problems = [str(p) for p in table.problems] + [
            f"services.{name}: {why.reason}" for name, why in plan.failed.items()
            if why.service is not None]
        self.table_state = {"read": int(time.time()), "refused": False,
                            "problems": len(problems)}
        self.notifier.notify("READY=1")
        self.send_status()
        return problems

    # -- the control socket ------------------------------------------------------------------

    def open_control(self, path: str) -> None:
        """Answer `superd status/reload/stop` at `path`; on a reload that moved it, leave the
        old path only once the new one answers (`superd` reads the path from the table)."""
        try:
            control = ControlSocket(self.loop, path, {"status": self.status,
                                                      "reload": self.control_reload,
                                                      "stop": self.control_stop,
                                                      "upgrade": self.control_upgrade})
        except OSError as e:
            where = (f"still answering on {self.control.path}" if self.control is not None
                     else "superd status/reload/stop will not reach this daemon")
            self.log.warning(f"control socket {path}: {e.strerror or e}; {where}")
            return
        if self.control is not None:
            self.control.close()
            self.log.info(f"control socket moved to {path}")
        self.control = control

    def control_reload(self) -> dict[str, Any]:
        problems = self.reload()
        if self.table_state["refused"]:
            return {"error": "reload refused, the running table stays:\n" + "\n".join(problems)}
        if problems:
            return {"error": "reloaded, but what these concern was refused (the services they "
                             "name run as they did, or not at all):\n" + "\n".join(problems)}
        return {"ok": True}

    def control_upgrade(self) -> dict[str, Any]:
        self.loop.call_later(0, self.handle_usr2)  # answer first: the exec ends this connection
        return {"ok": True, "upgrades": self.upgrades}

    def control_stop(self) -> dict[str, Any]:
        self.loop.call_later(0, self.stop)  # answer first
        return {"ok": True}

    def status(self) -> dict[str, Any]:
        """Live counters for `superd status` (SPEC §1)."""
        services = {name: rt.status() for name, rt in self.services.items()}
        for name, reason in self.kept.items():
            if name in services:
                services[name]["kept"] = reason
        return {"services": services, "failed": self.retries.status(),
                "problems": [str(p) for p in self.table.problems],
                "table_state": {**self.table_state,
                                "summary": report.table_summary(self.table_state)},
                "children": len(self.processes), "escaped": len(self.processes.escaped),
                "running": len(self.processes.by_pid), "upgrades": self.upgrades,
                "last_upgrade_error": self.last_upgrade_error,
                "uptime": int(time.monotonic() - self.started_at),
                "pid": os.getpid(), "table": self.table.path}

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM/SIGINT: stop listening, SIGTERM handlers, SIGKILL after shutdown_grace."""
        if self.stopping:
            return
        self.stopping = True
        self.retries.clear()
        self.notifier.notify("STOPPING=1")
        if self.control is not None:
            self.control.close()
        self.log.info(f"stopping: {len(self.processes)} handlers running")
        for runtime in self.services.values():
            runtime.stop()
        self.sessions.close_all()
        self.listeners.close_all()
        self.processes.stop()
        if len(self.processes):
            self.loop.call_later(self.table.settings.shutdown_grace, self.processes.kill_all)

    # -- under systemd -----------------------------------------------------------------------

    def counts_changed(self) -> None:
        """Under systemd, send STATUS= within a second (not once per connection)."""
        if self.status_timer is None and self.notifier.enabled:
            self.status_timer = self.loop.call_later(1.0, self.send_status)

    def send_status(self) -> None:
        self.status_timer = None
        self.notifier.notify("STATUS=" + report.status_line(self.status()))

    def watchdog(self) -> None:
        if self.notifier.watchdog and not self.stopping:
            self.notifier.notify("WATCHDOG=1")
            self.loop.call_later(self.notifier.watchdog / 2, self.watchdog)

