"""The arbiter: owns the table, the listening sockets and the children; reloads and stops.

Read `run()` first: it is the main loop. Signals arrive as events and are dispatched to
`handle_<name>()`. Listeners are kept in `pool`, keyed by what they are bound to, so that a
reload reuses every socket whose address did not change and binds new ones before closing old
ones. Whether a listener is polled is decided in one place, `poll()`.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from functools import partial

from superd.children import Child
from superd.config import Service, Table, TableError, load_table
from superd.control import ControlSocket
from superd.listeners import Address, Listener
from superd.log import Log
from superd.loop import READ, Loop, Timer
from superd.service import ServiceRuntime
from superd.spawn import HANDLED_SIGNALS, failure_text
from superd.spawner import Spawners
from superd.systemd import Notifier

KILL_AFTER_TERM = 2.0  # `timeout`: SIGKILL this long after SIGTERM (SPEC §2)
ORPHAN_WAIT = 0.2  # after a spawner died, when its handlers are surely superd's children
SPAWNERS = max(1, min(4, os.cpu_count() or 1))


class BindError(Exception):
    pass


def _bind_error(svc: Service, addr: Address, e: OSError) -> str:
    return f"services.{svc.name}.listen: cannot bind {addr}: {e.strerror} ({svc.where})"


def _in_the_way(going: dict[tuple, Listener], svc: Service, addr: Address) -> bool:
    """Is one of the sockets this reload gives up bound over `addr`, for the same kind?"""
    return any(lst.address is not None and lst.stream == svc.stream and lst.address.overlaps(addr)
               for lst in going.values())


class Server:
    def __init__(self, table: Table, log: Log, passed: dict[str, list[Listener]] | None = None):
        self.table = table
        self.log = log
        self.notifier = Notifier()
        self.loop = Loop(self.handle_signal, HANDLED_SIGNALS)
        log.attach(self.loop)
        self.pool: dict[tuple, Listener] = {}
        self.passed = passed or {}
        self.services: dict[str, ServiceRuntime] = {}
        self.children: dict[int, Child] = {}
        self.pending: dict[int, Child] = {}  # sent to a spawner, pid not known yet
        self.spawners: Spawners | None = None
        self.held: dict[Listener, Child] = {}
        self.stopping = False
        self.max_children = table.settings.max_children
        self.control: ControlSocket | None = None
        self.status_timer: Timer | None = None

    # -- main loop --------------------------------------------------------------------------

    def start(self) -> None:
        """Bind every listener, or raise BindError having bound nothing."""
        for name, listeners in self.passed.items():
            if name not in {s.name for s in self.table.enabled}:
                self.log.error(f"socket passed by systemd named {name!r} matches no service; "
                               "closing it")
                for listener in listeners:
                    listener.close()
        self.passed = {n: ls for n, ls in self.passed.items()
                       if n in {s.name for s in self.table.enabled}}
        self.install(self.table, self.bind(self.table))
        try:
            self.spawners = Spawners(
                SPAWNERS, lambda sock, cb: self.loop.add(sock, READ, cb), self.loop.remove,
                self.spawned, self.exited, self.log.error, self.orphaned)
        except OSError as e:
            self.log.error(f"{e}; exec handlers are started by the loop itself")
        self.open_control(self.table.settings.control_socket)
        self.log.info(f"started: {len(self.services)} services, pid {os.getpid()}")
        self.notifier.notify("READY=1")
        self.send_status()
        self.watchdog()

    def run(self) -> None:
        while not (self.stopping and not self.children and not self.pending):
            self.loop.run_once()
        if self.spawners is not None:
            self.spawners.close()
        self.log.info("stopped")
        self.log.close()
        self.loop.close()

    def handle_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name[3:].lower()
        getattr(self, f"handle_{name}")()

    def handle_hup(self) -> None:
        self.reload()  # problems, if any, are in the log

    def handle_term(self) -> None:
        self.stop()

    handle_int = handle_term

    def handle_chld(self) -> None:
        self.reap()

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.exited(pid, status)

    def exited(self, pid: int, status: int) -> None:
        """A handler is gone (reaped here, or reported by a spawner)."""
        child = self.children.pop(pid, None)
        if child is None:
            return  # a spawner, or an orphaned grandchild we adopted as subreaper
        child.service.exited(child, status)
        if child.listener is not None:
            self.held.pop(child.listener, None)
            self.poll(child.listener)

    def spawned(self, token: int, pid: int, failure: bytes | str | None) -> None:
        """A spawner answered a request: the handler runs (or could not be forked)."""
        child = self.pending.pop(token, None)
        if child is None:
            return
        if not pid:
            child.service.not_started(child, failure_text(failure))
            return
        child.pid = pid
        child.failure = failure_text(failure)
        child.service.running(child)
        if self.stopping:
            self.signal_group(child, signal.SIGTERM)

    def orphaned(self, tokens: list[int]) -> None:
        """A spawner died before answering these requests: some may have become handlers,
        which are superd's children a moment later (subreaper). Find them then."""
        self.loop.call_later(ORPHAN_WAIT, lambda: self.adopt_orphans(tokens))

    def adopt_orphans(self, tokens: list[int]) -> None:
        """Match unknown children to unanswered requests by the connection on their stdin."""
        by_inode = {self.pending[t].inode: t for t in tokens if t in self.pending}
        spawner_pids = set(self.spawners.pids) if self.spawners is not None else set()
        for pid in own_children():
            if pid in self.children or pid in spawner_pids:
                continue
            try:
                link = os.readlink(f"/proc/{pid}/fd/0")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1].isdigit():
                token = by_inode.pop(int(link[8:-1]), None)
                if token is not None:
                    self.log.info(f"{self.pending[token].service.name}: handler pid {pid} was "
                                  "started by a spawner that died before saying so")
                    self.spawned(token, pid, None)
        for token in by_inode.values():
            self.spawned(token, 0, "its spawner process died before starting it")

    def handlers(self) -> int:
        """Handler processes of all services, started or on their way (max_children)."""
        return len(self.children) + len(self.pending)

    # -- listeners --------------------------------------------------------------------------

    def bind(self, table: Table) -> dict[tuple, Listener]:
        """Listeners for `table`: reused from the pool where the address is the same.

        New addresses are bound while the old sockets still serve. Only an address that
        overlaps an old one going away (`7` becoming `0.0.0.0:7`) cannot be: the kernel
        refuses both at once. Those are bound last, right after closing what is in the way,
        and if that still fails the old sockets are bound again and the reload refused.
        """
        pool: dict[tuple, Listener] = {}
        deferred: list[tuple[Service, Address]] = []
        wanted = {a.key(s.protocol) for s in table.enabled if s.name not in self.passed
                  for a in s.listen}
        going = {k: lst for k, lst in self.pool.items() if k not in wanted}
        try:
            for svc in table.enabled:
                if svc.name in self.passed:
                    continue
                for addr in svc.listen:
                    try:
                        pool[addr.key(svc.protocol)] = self._listener(svc, addr)
                    except OSError as e:
                        if e.errno == errno.EADDRINUSE and _in_the_way(going, svc, addr):
                            deferred.append((svc, addr))
                        else:
                            raise BindError(_bind_error(svc, addr, e)) from None
            if deferred:
                self._rebind_over(going, deferred, pool)
        except BindError:
            for key, listener in pool.items():
                if key not in self.pool:
                    listener.close()
            raise
        return pool

    def _listener(self, svc: Service, addr: Address) -> Listener:
        listener = self.pool.get(addr.key(svc.protocol))
        if listener is None:
            listener = Listener.bind(addr, svc.protocol, svc.backlog)
        elif listener.stream and svc.backlog != listener.backlog:
            listener.sock.listen(svc.backlog)
        listener.backlog = svc.backlog
        return listener

    def _rebind_over(self, going: dict[tuple, Listener], deferred: list[tuple[Service, Address]],
                     pool: dict[tuple, Listener]) -> None:
        """Close the old sockets in the way of `deferred`, bind those; undo on failure."""
        closed = {k: lst for k, lst in going.items()
                  if any(_in_the_way({k: lst}, svc, addr) for svc, addr in deferred)}
        for key, listener in closed.items():
            self.loop.remove(listener.sock)
            listener.close()
            del self.pool[key]
        try:
            for svc, addr in deferred:
                pool[addr.key(svc.protocol)] = self._listener(svc, addr)
                self.log.info(f"{svc.name}: {addr} overlaps an address given up by this reload; "
                              "closed the old socket first")
        except OSError as e:
            for key in [k for k in pool if k not in self.pool]:
                pool.pop(key).close()  # first free the addresses, then
            for key, old in closed.items():  # put the old sockets back, as far as we can
                try:
                    again = Listener.bind(old.address, old.protocol, old.backlog)
                except OSError:
                    continue
                again.owner, again.backlog = old.owner, old.backlog
                self.pool[key] = again
                if old.owner is not None:
                    old.owner.listeners = [again if x is old else x for x in old.owner.listeners]
                self.poll(again)
            raise BindError(_bind_error(svc, addr, e)) from None

    def install(self, table: Table, pool: dict[tuple, Listener]) -> None:
        """Switch to `table` and `pool`: close what is gone, hand listeners to services."""
        for key, listener in self.pool.items():
            if key not in pool:
                listener.owner = None
                self.loop.remove(listener.sock)
                listener.close()
        self.pool = pool
        self.table = table
        self.max_children = table.settings.max_children
        self.log.configure(table.settings)
        services: dict[str, ServiceRuntime] = {}
        for svc in table.enabled:
            runtime = self.services.get(svc.name)
            if runtime is None:
                runtime = ServiceRuntime(self, svc)
            else:
                runtime.configure(svc)
            runtime.listeners = [pool[a.key(svc.protocol)] for a in svc.listen
                                 if svc.name not in self.passed]
            runtime.listeners += self.passed.get(svc.name, [])
            for listener in runtime.listeners:
                listener.owner = runtime
            services[svc.name] = runtime
        for name, runtime in self.services.items():
            if name not in services:
                runtime.retire()  # its running handlers finish on their own
        self.services = services
        for runtime in services.values():
            self.poll_service(runtime)

    def poll(self, listener: Listener) -> None:
        """Watch `listener` exactly when its service may take a connection from it."""
        owner = getattr(listener, "owner", None)
        want = (owner is not None and not self.stopping and not owner.paused
                and listener not in self.held and listener.sock.fileno() >= 0)
        watching = listener.sock.fileno() >= 0 and self.loop.watching(listener.sock)
        if want and not watching:
            self.loop.add(listener.sock, READ, partial(self._ready, listener))
        elif watching and not want:
            self.loop.remove(listener.sock)

    def poll_service(self, runtime: ServiceRuntime) -> None:
        for listener in runtime.listeners:
            self.poll(listener)

    def _ready(self, listener: Listener, mask: int) -> None:
        if listener.owner is not None:
            listener.owner.ready(listener)

    # -- children ---------------------------------------------------------------------------

    def adopt(self, child: Child) -> None:
        self.children[child.pid] = child

    def hold(self, listener: Listener, child: Child) -> None:
        """A wait handler has the listener now: do not poll it until the handler exits."""
        self.held[listener] = child
        self.poll(listener)

    def overrun(self, child: Child) -> None:
        """`timeout` expired: SIGTERM the handler's process group, SIGKILL it 2 s later."""
        if child.pid not in self.children:
            return
        child.timed_out = True
        child.service.refuse("timeout", child.peer)
        self.signal_group(child, signal.SIGTERM)
        child.timers.append(self.loop.call_later(
            KILL_AFTER_TERM, lambda: self.signal_group(child, signal.SIGKILL)))

    def signal_group(self, child: Child, sig: int) -> None:
        if child.pid in self.children:
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                pass
            except PermissionError:
                os.kill(child.pid, sig)

    # -- reload and stop --------------------------------------------------------------------

    def reload(self) -> list[str]:
        """SIGHUP: validate the new table whole, then switch; a bad one changes nothing.

        Returns the problems that kept the new table out (empty when it was taken).
        """
        if self.stopping:
            return ["superd is stopping"]
        self.notifier.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            table = load_table(self.table.path)
            pool = self.bind(table)
        except (TableError, BindError) as e:
            problems = [str(p) for p in e.problems] if isinstance(e, TableError) else [str(e)]
            for problem in problems:
                self.log.error(f"reload refused, keeping the running table: {problem}")
            self.notifier.notify("READY=1")
            return problems
        old = {s.name: s for s in self.table.enabled}
        new = {s.name: s for s in table.enabled}
        added = sorted(new.keys() - old.keys())
        removed = sorted(old.keys() - new.keys())
        changed = sorted(n for n in new.keys() & old.keys() if new[n] != old[n])
        self.install(table, pool)
        if self.control is None or self.control.path != table.settings.control_socket:
            self.open_control(table.settings.control_socket)
        parts = [f"{len(new)} services"] + [f"{what} {', '.join(names)}" for what, names in
                                             (("added", added), ("removed", removed),
                                              ("changed", changed)) if names]
        self.log.info("reloaded: " + "; ".join(parts))
        self.notifier.notify("READY=1")
        self.send_status()
        return []

    def open_control(self, path: str) -> None:
        """Answer `superd status/reload/stop` at `path`; on a reload that moved it, leave the
        old path only once the new one answers (`superd` reads the path from the table)."""
        try:
            control = ControlSocket(self, path)
        except OSError as e:
            where = (f"still answering on {self.control.path}" if self.control is not None
                     else "superd status/reload/stop will not reach this daemon")
            self.log.warning(f"control socket {path}: {e.strerror or e}; {where}")
            return
        if self.control is not None:
            self.control.close()
            self.log.info(f"control socket moved to {path}")
        self.control = control

    def stop(self) -> None:
        """SIGTERM/SIGINT: stop listening, SIGTERM handlers, SIGKILL after shutdown_grace."""
        if self.stopping:
            return
        self.stopping = True
        self.notifier.notify("STOPPING=1")
        if self.control is not None:
            self.control.close()
        self.log.info(f"stopping: {self.handlers()} handlers running")
        for listener in [*self.pool.values(), *(p for ps in self.passed.values() for p in ps)]:
            self.loop.remove(listener.sock)
            listener.close()
        for runtime in self.services.values():
            runtime.close_sessions()
        for child in list(self.children.values()):
            self.signal_group(child, signal.SIGTERM)
        if self.children:
            self.loop.call_later(self.table.settings.shutdown_grace, self.kill_all)

    def kill_all(self) -> None:
        for child in list(self.children.values()):
            self.signal_group(child, signal.SIGKILL)

    def touch(self) -> None:
        """Counts changed: under systemd, send STATUS= within a second (not per connection)."""
        if self.status_timer is None and self.notifier.enabled:
            self.status_timer = self.loop.call_later(1.0, self.send_status)

    def send_status(self) -> None:
        self.status_timer = None
        served = sum(rt.accepted for rt in self.services.values())
        refused = sum(sum(rt.refused.values()) for rt in self.services.values())
        paused = sum(1 for rt in self.services.values() if rt.paused)
        self.notifier.notify(f"STATUS={len(self.services)} services, {len(self.children)} "
                             f"handlers running, {served} served, {refused} refused"
                             + (f", {paused} paused" if paused else ""))

    def watchdog(self) -> None:
        if self.notifier.watchdog and not self.stopping:
            self.notifier.notify("WATCHDOG=1")
            self.loop.call_later(self.notifier.watchdog / 2, self.watchdog)

    def status(self) -> dict[str, object]:
        """Live counters for `superd status` (SPEC §1)."""
        services = {}
        for name, rt in self.services.items():
            services[name] = {
                "accepted": rt.accepted, "active": rt.active, "refused": dict(rt.refused),
                "paused": rt.paused, "last_exit": rt.last_exit,
                "listen": [str(listener) for listener in rt.listeners],
            }
        return {"services": services, "children": self.handlers(), "pid": os.getpid(),
                "table": self.table.path}


def own_children() -> list[int]:
    """This process's children (Linux: /proc/PID/task/TID/children)."""
    pids: list[int] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return pids
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return pids
