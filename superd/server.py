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
from functools import partial
from typing import Any

from superd import activation, daemonize, report, takeover, upgrade
from superd.binding import ListenerPool
from superd.config import Table, read_table
from superd.control import ControlSocket, Reply
from superd.fdstore import FdStore
from superd.listeners import Listener
from superd.log import Log
from superd.loop import READ, Loop, Timer
from superd.processes import ProcessTable
from superd.reader import Reader, Result
from superd.retry import Retries
from superd.running import Running
from superd.service import ServiceRuntime, Shared
from superd.sessions import SessionTable
from superd.spawn import HANDLED_SIGNALS, open_devnull
from superd.spawners import SPAWNER, Spawners
from superd.start import Starter
from superd.systemd import Notifier

ORPHAN_WAIT = 0.2  # after a spawner died, when its handlers are surely superd's children
SPAWNERS = max(1, min(4, os.cpu_count() or 1))
MAX_TRACEBACKS = 10  # per minute; beyond, the internal errors are only counted


class Server:
    def __init__(self, table: Table, log: Log, passed: dict[str, list[Listener]] | None = None,
                 stored: list[socket.socket] | None = None):
        self.log = log
        self.loop = Loop(self.handle_signal, HANDLED_SIGNALS, self.internal_error)
        self.notifier = Notifier(self.loop.call_later)
        self.fdstore = FdStore(self.notifier.notify, self.notifier.enabled
                               and bool(os.environ.get("INVOCATION_ID")))
        self.stored = stored or []  # our own sockets systemd kept over a restart
        log.attach(self.loop)
        self.errors: list[float] = []
        self.processes = ProcessTable(
            table.settings.max_children, self.released, self.loop.call_later, self.helper_pids)
        self.pools: list[Spawners] = []  # every helper pool: the spawners, the python hosts
        self.listeners = ListenerPool(passed or {}, log.info, self.unwatch, self.fdstore.forget)
        self.spawners: Spawners | None = None
        s = table.settings
        self.sessions = SessionTable(self.loop, s.max_sessions, s.idle_timeout, s.max_buffered)
        self.shared = Shared(self.loop, log, self.processes,
                             Starter(self.loop, self.processes, lambda: self.spawners),
                             self.sessions, self.counts_changed, self.new_pool)
        self.retries = Retries(self.loop.call_later, log.error, self.counts_changed)
        # tables are read in a child (superd/reader.py), within settings.read_timeout
        self.reader = Reader(self.loop, table.settings.read_timeout)
        self.running = Running(table, self.listeners, self.shared, log, self.retries,
                               self.reader, self.configure)
        self.reading: list[Reply] | None = None  # a reload under way: who waits for it
        self.read_again: list[Reply] | None = None  # asked for meanwhile: the next one's
        self.started_at = time.monotonic()
        self.upgrades = 0  # superd upgrades this daemon (this pid) went through
        self.last_upgrade_error: str | None = None
        self.pidfile: str | None = None  # --daemon --pidfile: removed at exit
        self.stopping = False
        self.unpassed: dict[str, str] = {}  # services systemd passed no socket (activation.py)
        self.draining = False  # stop: drain, handlers still running (stopped() waits)
        self.control: ControlSocket | None = None
        self.status_timer: Timer | None = None

    @property
    def table(self) -> Table:
        return self.running.table

    @property
    def services(self) -> dict[str, ServiceRuntime]:
        return self.running.services

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
        self.running.log_problems(self.table)
        self.listeners.inherit(self.stored)
        self.running.apply(self.table)
        self.unserved()
        kept = len(self.stored) - len(self.listeners.inherited)
        self.listeners.drop_inherited()
        self.serving(f"started: {len(self.services)} services, pid {os.getpid()}"
                     + (f"; {kept} listening sockets kept by systemd taken up" if kept else ""))

    def unserved(self) -> None:
        """Say so when systemd passed no socket to a service that expected one (activation)."""
        memory = activation.memory(self.table.settings.control_socket)
        self.unpassed = activation.unserved(self.table.enabled, self.listeners.passed, memory)
        for name, said in self.unpassed.items():
            self.log.warning(f"services.{name}: {said}", SUPERD_SERVICE=name)

    def serving(self, said: str) -> None:
        """The table is in place: the spawners, the control socket, and READY=1."""
        try:
            self.spawners = self.new_pool(SPAWNERS, SPAWNER)
        except OSError as e:
            self.log.error(f"{e}; exec handlers are started by the loop itself")
        self.open_control(self.table.settings.control_socket)
        activation.remember(activation.memory(self.table.settings.control_socket),
                            self.listeners.passed)
        self.log.info(said)
        self.notifier.notify("READY=1")
        self.send_status()
        self.watchdog()

    def resume(self, state: dict[str, Any]) -> None:
        """Start as the superd that takes over from an earlier one (superd upgrade): its
        sockets, handlers, sessions, helpers and counters are this one's now."""
        open_devnull()
        self.running.log_problems(self.table)
        self.listeners.inherit(takeover.inherited_listeners(state))
        self.running.apply(self.table)
        self.listeners.drop_inherited()
        self.pidfile = state.get("pidfile")
        said = takeover.resume(self, state)
        self.handle_chld()  # what ended during the exec
        self.serving(f"upgraded: pid {os.getpid()}, {len(self.services)} services; {said}")

    def upgrade(self) -> None:
        """Hand everything over to the superd installed now, in this very process (the same
        pid): it goes on from here. If it cannot, this one goes on, and says why (in the log
        and as last_upgrade_error in the status)."""
        mask = upgrade.block_signals()  # from here on they wait for the new superd
        for signum in self.loop.caught():  # caught before: obeyed here (the pipe goes)
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.stop()
            elif signum not in (signal.SIGHUP, signal.SIGUSR2):  # (the new one reads it all)
                self.handle_signal(signum)
        if self.stopping:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        state, fds = takeover.export(self, self.pidfile)
        self.log.info(f"upgrading: handing {len(self.processes)} handlers and "
                      f"{len(self.sessions)} sessions over to {sys.executable} -m superd")
        self.log.close()
        why = upgrade.hand_over(state, self.table.path, fds)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.log.attach(self.loop)
        self.log.error(f"upgrade failed, going on as before: {why}")
        self.last_upgrade_error = why
        self.notifier.notify("READY=1")

    def run(self) -> None:
        while not self.stopped():
            self.loop.run_once()
        for pool in list(self.pools):
            pool.close()
        self.processes.remains.close()
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
        """`superd upgrade`: the installed superd takes over, in place, once the signals
        read with this one are dealt with (upgrade() takes the rest)."""
        self.loop.call_later(0, self.upgrade)  # (if it cannot, why is in the log and status)

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
        return {pid for pool in self.pools for pid in pool.pids} | self.reader.pids()

    def released(self, listener: Listener) -> None:
        self.running.released(listener)

    def unwatch(self, listener: Listener) -> None:
        self.loop.remove(listener.sock)

    # -- the table ---------------------------------------------------------------------------

    def configure(self, table: Table) -> None:
        """The daemon-wide settings of a table being taken."""
        s = table.settings
        self.processes.max_children = s.max_children
        error = self.processes.remains.use_cgroups(s.cgroups)
        if error:
            self.log.error(error)
        self.reader.timeout = s.read_timeout
        self.sessions.configure(s.max_sessions, s.idle_timeout, s.max_buffered)
        self.log.configure(s, table.service_logs)

    def reload(self, reply: Reply | None = None) -> None:
        """SIGHUP: read the table again, in a child (superd/reader.py), then take of it what
        loads and binds (`reloaded`). Only a table that cannot be read at all changes
        nothing. One read at a time: one asked for meanwhile follows it (the file may have
        changed since the first began). `reply` hears the outcome (superd reload)."""
        if self.stopping:
            if reply is not None:
                reply({"error": "superd is stopping"})
            return
        replies = [reply] if reply else []
        if self.reading is not None:
            self.read_again = (self.read_again or []) + replies
            return
        self._read(replies)

    def _read(self, replies: list[Reply]) -> None:
        self.reading = replies
        self.running.state["reading_since"] = int(time.time())
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        self.reader.run(partial(read_table, self.table.path, self.table.settings),
                        self.reloaded, self.table.path)

    def reloaded(self, result: Result) -> None:
        kind, value = result
        replies, self.reading = self.reading or [], None
        if self.stopping:
            problems, refused = ["superd is stopping"], True
        elif kind != "ok":
            problems, refused = [str(p) for p in value] if kind == "refused" else [value], True
            for problem in problems:
                self.log.error(f"reload refused, keeping the running table: {problem}")
        else:
            problems, refused = self._take(value), False
        self.running.state = {"read": int(time.time()), "refused": refused,
                              "problems": len(problems)}
        self.notifier.notify("READY=1")
        self.send_status()
        for reply in replies:
            reply(report.reload_answer(problems, refused))
        if self.read_again is not None and not self.stopping:
            again, self.read_again = self.read_again, None
            self._read(again)

    def _take(self, table: Table) -> list[str]:
        """A table that was read: take it, say what changed, return the problems."""
        self.running.log_problems(table)
        before = self.running.definitions()
        plan = self.running.apply(table)
        if self.control is None or self.control.path != table.settings.control_socket:
            self.open_control(table.settings.control_socket)
        self.log.info("reloaded: " + plan.summary(before))
        return [str(p) for p in table.problems] + [
            f"services.{name}: {why.reason}" for name, why in plan.failed.items()
            if why.service is not None]

    # -- the control socket ------------------------------------------------------------------

    def open_control(self, path: str) -> None:
        """Answer `superd status/reload/stop` at `path`; on a reload that moved it, leave the
        old path only once the new one answers (`superd` reads the path from the table)."""
        try:
            control = ControlSocket(self.loop, path, {
                "status": lambda reply: reply(self.status()), "reload": self.reload,
                "stop": self.control_stop, "upgrade": self.control_upgrade})
        except OSError as e:
            where = (f"still answering on {self.control.path}" if self.control is not None
                     else "superd status/reload/stop will not reach this daemon")
            self.log.warning(f"control socket {path}: {e.strerror or e}; {where}")
            return
        if self.control is not None:
            self.control.close()
            self.log.info(f"control socket moved to {path}")
        self.control = control

    def control_upgrade(self, reply: Reply) -> None:
        reply({"ok": True, "upgrades": self.upgrades})
        self.loop.call_later(0, self.handle_usr2)  # answered first: the exec ends this one

    def control_stop(self, reply: Reply) -> None:
        reply({"ok": True})
        self.loop.call_later(0, self.stop)

    def status(self) -> dict[str, Any]:
        """Live counters for `superd status` (SPEC §1)."""
        services = {name: rt.status() for name, rt in self.services.items()}
        for name, reason in self.running.kept.items():
            if name in services:
                services[name]["kept"] = reason
        for name, said in self.unpassed.items():
            if name in services:
                services[name]["socket_activation"] = said
        state = self.running.state
        return {"services": services, "failed": self.retries.status(),
                "problems": [str(p) for p in self.table.problems],
                "table_state": {**state, "summary": report.table_summary(state)},
                "children": len(self.processes), "escaped": len(self.processes.remains.escaped),
                "running": len(self.processes.by_pid), "upgrades": self.upgrades,
                "cgroups": self.processes.remains.state,
                "last_upgrade_error": self.last_upgrade_error,
                "uptime": int(time.monotonic() - self.started_at),
                "pid": os.getpid(), "table": self.table.path}

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM/SIGINT: stop listening, then settings.stop says what becomes of the
        handlers: terminate (SIGTERM, SIGKILL after shutdown_grace), drain (wait for them up
        to drain_timeout, then terminate) or leave (superd exits, they run on)."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.notify("STOPPING=1")
        self.reader.stop()  # a reload under way ends: its callers hear superd is stopping
        if self.control is not None:
            self.control.close()
        mode = self.table.settings.stop
        self.log.info(f"stopping: {len(self.processes)} handlers running"
                      + (f"; {mode} them" if mode != "terminate" else ""))
        self.running.stop()
        self.listeners.close_all()
        if mode == "drain" and (len(self.processes) or len(self.sessions)):
            self.draining = True
            self.loop.call_later(self.table.settings.drain_timeout, self.terminate)
        elif mode != "leave":
            self.terminate()

    def terminate(self) -> None:
        """End every session and handler: SIGTERM, SIGKILL after shutdown_grace."""
        if self.draining:
            self.log.info(f"stopping: drain_timeout reached, {len(self.processes)} handlers "
                          "and sessions still running; terminating them")
        self.draining = False
        self.sessions.close_all()
        self.processes.stop()
        if len(self.processes):
            self.loop.call_later(self.table.settings.shutdown_grace, self.processes.kill_all)

    def stopped(self) -> bool:
        """Time to exit: nothing left to wait for (settings.stop)."""
        if not self.stopping:
            return False
        if self.table.settings.stop == "leave":
            return True
        if self.draining:
            return not len(self.processes) and not len(self.sessions)
        return not len(self.processes)

    # -- under systemd -----------------------------------------------------------------------

    def counts_changed(self) -> None:
        """Under systemd, send STATUS= within a second (not once per connection)."""
        if self.status_timer is None and self.notifier.enabled:
            self.status_timer = self.loop.call_later(1.0, self.send_status)

    def send_status(self) -> None:
        self.status_timer = None
        self.fdstore.sync(self.listeners.pool.values())  # (after each change, as the counts)
        self.notifier.notify("STATUS=" + report.status_line(self.status()))

    def watchdog(self) -> None:
        if self.notifier.watchdog and not self.stopping:
            self.notifier.notify("WATCHDOG=1")
            self.loop.call_later(self.notifier.watchdog / 2, self.watchdog)

