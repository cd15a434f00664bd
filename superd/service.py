"""One service at run time: its listeners, its pipeline, its counters and its log lines.

When a listener of the service is readable, `readable()` takes the work off it
(superd/accept.py) and each connection goes through the service's pipeline: its stages
(superd/stages.py), admission (superd/limits.py), then `start_session` or `start_handler`
(superd/start.py). The service decides whether its listeners are polled (`poll`), and hears
from the process table how its handlers fare. The table record (`config`) is replaced on
reload; counters, running handlers and sessions stay with this object.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from superd import execfail, loglines, relay, spawn, stages, stderr
from superd.accept import (
    FD_ERRORS,
    accept_connections,
    answer_datagrams,
    answer_unix_datagrams,
    drop_datagram,
    handler_env,
    looped,
    wait_peer_env,
    waiting_on,
)
from superd.access import allowed
from superd.config import Service
from superd.faillines import FailLines
from superd.internal import Session
from superd.limits import Limits
from superd.listeners import Listener
from superd.log import Log
from superd.loop import READ, Loop
from superd.pipeline import STARTED, Connection, Pipeline
from superd.processes import KILL_AFTER_TERM, RUNNING, Handler, ProcessTable
from superd.pyhost import host_record
from superd.sessions import SessionTable
from superd.spawners import PYHOST, Spawners
from superd.start import Starter

WAIT_RETRY = 0.1  # a wait service over a limit looks again this much later


@dataclass
class Shared:
    """What every service is given by the server."""

    loop: Loop
    log: Log
    processes: ProcessTable
    starter: Starter
    sessions: SessionTable
    changed: Callable[[], None]  # counters changed (STATUS= under systemd, in a while)
    new_pool: Callable[[int, str, bytes | None], Spawners]  # helper processes
    udp_ports: frozenset[int] = frozenset()  # of superd's own datagram listeners



class ServiceRuntime:
    def __init__(self, config: Service, shared: Shared):
        self.loop, self.log, self.processes = shared.loop, shared.log, shared.processes
        self.starter, self.changed = shared.starter, shared.changed
        self.sessions = shared.sessions
        self.shared = shared
        self.listeners: list[Listener] = []
        self.accepted = 0
        self.answered = self.dropped = 0  # datagrams, for internal datagram services
        self.refused: Counter[str] = Counter()
        self.fail_lines = FailLines(config.name, self.log.warning, self.loop.call_later)
        self.last_exit: int | None = None
        self.start_failure: str | None = None  # why the last start failed (until one works)
        self.stderr_lines: stderr.StderrLines | None = None  # `stderr: log`: the reader
        self.retired = False
        self.stopping = False
        self.pipeline: Pipeline | None = None
        self.host: Spawners | None = None  # a python service's host process
        self.draining: list[Pipeline] = []  # earlier pipelines with connections still in a stage
        self.limits = Limits(config, active=self.active, clock=time.monotonic,
                             call_later=self.loop.call_later, changed=self.poll,
                             warn=self.log.warning)
        self.configure(config)

    def configure(self, config: Service) -> None:
        """Take a (new) table record; what runs stays."""
        old = getattr(self, "config", None)
        self.config = config
        self.name = config.name
        self.prepared = spawn.prepare(config, dict(os.environ))
        self.builtin = relay.builtin_for(config, self.log)  # internal, redirect or None
        self.limits.configure(config, self.session_room if self.builtin is not None
                              else self.process_room)
        if config != old or self.pipeline is None:
            self.draining = [p for p in self.draining if p.waiting]
            if self.pipeline is not None and self.pipeline.waiting:
                self.draining.append(self.pipeline)
            self.pipeline = Pipeline(
                stages.build(config, stages.Tools(self.loop, self.log,
                                                  self.limits.per_peer.__getitem__)),
                admit=lambda conn: self.limits.admit(conn.peer),
                start=self.start_session if self.builtin is not None else self.start_handler,
                refuse=self.refuse_connection, call_later=self.loop.call_later)
        self._stderr_pipe()
        if config.python and (self.host is None or old is None
                              or host_record(config) != host_record(old)):
            self._new_host()
        elif not config.python and self.host is not None:
            self.host.retire()
            self.host = None
        if self.builtin is not None and not config.stream:
            self.on_readable = self._datagrams
        elif config.wait:
            self.on_readable = self.start_wait
        else:
            self.on_readable = self._accept

    def _stderr_pipe(self) -> None:
        """Made at load, not on a connection's way: a service with `stderr: log` has one."""
        want = self.config.stderr == "log" and self.builtin is None
        if want and self.stderr_w < 0:
            try:
                self.stderr_lines = stderr.open_pipe(self.loop, self.log, self.name)
            except OSError as e:
                self.log.error(f"{self.name}: cannot make its stderr pipe ({e.strerror}); "
                               "its handlers' stderr goes to /dev/null")
        elif not want and self.stderr_lines is not None:
            self.stderr_lines.close_write()  # running handlers keep their copies

    @property
    def stderr_w(self) -> int:
        """The write end new handlers get as fd 2; -1: none (they get /dev/null)."""
        return self.stderr_lines.write_fd if self.stderr_lines is not None else -1

    def adopt_stderr(self, lines: stderr.StderrLines) -> None:
        """superd upgrade: go on with the reader the earlier superd had (its handlers write
        there) instead of the one made at load."""
        if self.stderr_lines is not None:
            self.stderr_lines.close_write()
        self.stderr_lines = lines

    def _new_host(self) -> None:
        """A python service's handlers are forked by a host of their own (superd/pyhost.py),
        which holds this service's record and no other's; a new one for a new record."""
        if self.host is not None:
            self.host.retire()  # it stays until its handlers are reported gone
            self.host = None
        record = pickle.dumps(host_record(self.config))
        try:
            self.host = self.shared.new_pool(1, PYHOST, record)
        except OSError as e:
            self.log.error(f"{self.name}: {e}; its connections are refused until a reload")

    def active(self) -> int:
        return self.processes.count(self) + self.sessions.count(self)

    def process_room(self) -> str | None:
        return "process_limit" if self.processes.full() else None

    def session_room(self) -> str | None:
        return "session_limit" if self.sessions.full() else None

    @property
    def paused(self) -> str | None:
        return self.limits.paused

    # -- listeners ---------------------------------------------------------------------------

    def take(self, listeners: list[Listener]) -> None:
        self.listeners = listeners
        if self.builtin is not None and self.config.protocol == "unix-dgram":
            for listener in listeners:  # the kernel tells each datagram's uid (a reply's due)
                listener.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.poll()

    def poll(self) -> None:
        """Watch each listener exactly when this service may take work from it."""
        may = not self.stopping and not self.retired and not self.limits.paused
        for listener in self.listeners:
            sock = listener.sock
            if sock.fileno() < 0:
                continue
            want = may and self.processes.holder(listener) is None
            watching = self.loop.watching(sock)
            if want and not watching:
                self.loop.add(sock, READ, partial(self.readable, listener))
            elif watching and not want:
                self.loop.remove(sock)

    def readable(self, listener: Listener, mask: int) -> None:
        self.on_readable(listener)

    def _accept(self, listener: Listener) -> None:
        accept_connections(listener, self.limits, self.pipeline.begin,  # type: ignore[union-attr]
                           self.log.error)

    def _datagrams(self, listener: Listener) -> None:
        answer = self.builtin.datagram  # type: ignore[union-attr]
        if listener.family == socket.AF_UNIX:
            answered, dropped = answer_unix_datagrams(listener, answer, self.limits)
        else:
            answered, dropped = answer_datagrams(
                listener, answer, self.config.only_from, self.config.no_access,
                self.shared.udp_ports, self.limits)
        self.answered += answered
        self.dropped += dropped

    # -- refusals and log lines --------------------------------------------------------------

    def refuse_connection(self, conn: Connection, reason: str) -> None:
        self.refuse(reason, conn.peer)
        conn.sock.close()

    def refuse(self, reason: str, peer: str, datagram: bool = False) -> None:
        """Count a refusal and log its FAIL line.

        A datagram's source address is whatever its sender wrote, so a FAIL line for one says
        so, and there are few of them: one per source a minute, DATAGRAM_FAILS a second in
        all; the rest are counted, and said in one line a minute. Otherwise a spoofer would
        choose what goes into the log, and whom a log watcher bans."""
        self.refused[reason] += 1
        self.changed()
        if not self.config.log_on_failure:
            return  # log_on_failure: [] keeps FAIL lines out of the log; the count stays
        if datagram and not self.fail_lines.allow(peer, time.monotonic()):
            return
        self.log.warning(loglines.fail_line(self.name, self.config.log_on_failure, reason,
                                            peer, datagram),
                         SUPERD_SERVICE=self.name, REMOTE_ADDR=peer)

    def log_start(self, pid: int, peer: str) -> None:
        line = loglines.start_line(self.name, self.config.log_on_success, pid, peer)
        if line is not None:
            self.log.info(line, SUPERD_SERVICE=self.name, REMOTE_ADDR=peer)

    def log_exit(self, handler: Handler, code: int, duration: float) -> None:
        line = loglines.exit_line(self.name, self.config.log_on_success, handler.pid, code,
                                  duration)
        if line is not None:
            self.log.info(line, SUPERD_SERVICE=self.name, REMOTE_ADDR=handler.peer,
                          EXIT_STATUS=str(code))

    # -- internal services -------------------------------------------------------------------

    def start_session(self, conn: Connection) -> None:
        conn.state = STARTED
        self.accepted += 1
        self.changed()
        self.log_start(0, conn.peer)
        session = self.sessions.start(self.builtin, conn.sock, conn.peer,  # type: ignore[arg-type]
                                      self)
        if self.config.timeout and not session.closed:
            session.timer = self.loop.call_later(self.config.timeout,
                                                 lambda: self.session_overrun(session))

    def session_overrun(self, session: Session) -> None:
        """`timeout` holds for internal sessions too: a silent client must not keep its slot."""
        if not session.closed:
            self.refuse("timeout", session.peer)
            session.close()

    def session_idle(self, session: Session) -> None:
        """The session has moved no byte for settings.idle_timeout: it is closed."""
        self.refuse("idle", session.peer)

    def session_done(self, session: Session) -> None:
        if session.timer is not None:
            session.timer.cancel()
        self.limits.freed(session.peer)
        line = loglines.session_line(self.name, self.config.log_on_success,
                                     time.monotonic() - session.started, session.bytes_in,
                                     session.bytes_out)
        if line is not None:
            self.log.info(line, SUPERD_SERVICE=self.name, REMOTE_ADDR=session.peer)

    # -- handlers ----------------------------------------------------------------------------

    def start_handler(self, conn: Connection) -> None:
        conn.state = STARTED
        self.accepted += 1
        self.changed()
        self._start(conn.sock, conn.peer, handler_env(conn), None)
        conn.sock.close()  # the handler (or its spawner) has its own copy

    def start_wait(self, listener: Listener) -> None:
        """Hand the listening socket itself to a handler; do not poll it until that exits."""
        peer, env = wait_peer_env(listener)
        reason = "address" if not allowed(peer, self.config.only_from, self.config.no_access) \
            else self.limits.admit(peer)
        if reason is not None:
            self.refuse(reason, peer, datagram=not listener.stream)
            if reason in ("service_limit", "process_limit"):
                # The socket stays readable: wait for room instead of asking again at once.
                self.limits.pause(reason, WAIT_RETRY)
            elif not listener.stream:
                drop_datagram(listener.sock)  # a datagram from a refused address or source
            return
        self.accepted += 1
        self.changed()
        # O_NONBLOCK belongs to the open socket, which the handler shares: it gets the socket
        # blocking, as from inetd (a plain recvfrom/accept loop would fail with EAGAIN).
        # superd leaves it alone meanwhile, and makes it non-blocking again when the handler
        # is gone (server.released).
        listener.sock.setblocking(True)
        handler = self._start(listener.sock, peer, env, listener)
        if handler is not None:
            handler.pending = waiting_on(listener)
        else:
            listener.sock.setblocking(False)
        self.poll()

    def _start(self, sock: socket.socket, peer: str, env: dict[str, str],
               listener: Listener | None) -> Handler | None:
        try:
            return self.starter.handler(self, self.prepared, sock, peer, env, listener,
                                        self.stderr_w, self.host)
        except (OSError, ValueError) as e:
            fds = e if isinstance(e, OSError) and e.errno in FD_ERRORS else None
            self.start_failed(f"fork: {getattr(e, 'strerror', None) or e}", peer, fds)
            self.limits.freed(peer)
            return None

    def start_failed(self, failure: str | bytes | None, peer: str,
                     fds: OSError | None = None) -> None:
        """Log and show (`superd status`) what failed and why: `exec PATH: STEP: reason`."""
        self.start_failure = execfail.describe(failure, self.config) or "no reason given"
        self.log.error(f"{self.name}: cannot start handler: {self.start_failure}")
        self.refuse("exec", peer)
        if fds is not None:
            self.limits.out_of_fds(fds, "start")  # out of fds, as accept: pause, back off
        else:
            self.limits.failed()  # a loop no client causes: back off

    def handler_running(self, handler: Handler) -> None:
        """The handler has a pid: log START, start its clock."""
        if self.config.timeout:
            handler.deadline = handler.started + self.config.timeout
            handler.timers.append(self.loop.call_later(self.config.timeout,
                                                       lambda: self.overrun(handler)))
        self.log_start(handler.pid, handler.peer)
        if self.stderr_lines is not None:
            self.stderr_lines.started_handler(handler.pid)

    def handler_resumed(self, handler: Handler) -> None:
        """A handler an earlier superd started (superd upgrade): its slot, its clock."""
        self.limits.per_peer[handler.peer] += 1
        if handler.deadline is not None and handler.state == RUNNING:
            handler.timers.append(self.loop.call_later(
                max(0.0, handler.deadline - time.monotonic()), lambda: self.overrun(handler)))

    def handler_not_started(self, handler: Handler, failure: bytes | str | None) -> None:
        """A spawner could not even fork: the client is closed (by the spawner)."""
        self.start_failed(failure, handler.peer)
        self.limits.freed(handler.peer)
        self._release_if_retired()

    def handler_exited(self, handler: Handler, status: int) -> None:
        """The handler is reaped: log it, free its slot."""
        if self.stderr_lines is not None:
            self.stderr_lines.ended_handler(handler.pid)  # its stderr before its EXIT line
        self.changed()
        self.starter.settle(handler)
        duration = time.monotonic() - handler.started
        if handler.failure:
            self.start_failed(handler.failure, handler.peer)
        else:
            self.start_failure = None
            code = os.waitstatus_to_exitcode(status)
            self.last_exit = code
            self.log_exit(handler, code, duration)
            if looped(handler, duration):
                self.log.warning(f"{self.name}: the handler exited without taking what waits "
                                 "on its socket")
                self.limits.failed()
            else:
                self.limits.succeeded()
        self.limits.freed(handler.peer)
        self._release_if_retired()

    def overrun(self, handler: Handler) -> None:
        """`timeout` expired: SIGTERM the handler's process group, SIGKILL it 2 s later."""
        if handler.state != RUNNING:
            return
        self.refuse("timeout", handler.peer)
        self.processes.end(handler, signal.SIGTERM)
        handler.timers.append(self.loop.call_later(
            KILL_AFTER_TERM, lambda: self.processes.end(handler, signal.SIGKILL)))

    # -- the end -----------------------------------------------------------------------------

    def retire(self) -> None:
        """Removed from the table: once its last handler is gone, release what it holds."""
        self.retired = True
        if self.host is not None:
            self.host.retire()
            self.host = None
        self.poll()
        self.listeners = []
        self._release_if_retired()

    def _release_if_retired(self) -> None:
        if self.retired and not self.processes.count(self) and self.stderr_lines is not None:
            self.stderr_lines.close_write()  # the reader sees EOF once no handler holds it

    def stop(self) -> None:
        """superd stops: take no more work, drop what waits in a stage."""
        self.stopping = True
        self.poll()
        for pipeline in [*self.draining, self.pipeline]:
            if pipeline is not None:
                pipeline.abort()

    COUNTED = ("accepted", "last_exit", "answered", "dropped")

    def export(self) -> dict[str, Any]:
        """The counters, for the superd that takes over (superd upgrade)."""
        return {**{k: getattr(self, k) for k in self.COUNTED}, "refused": dict(self.refused)}

    def restore(self, counters: dict[str, Any]) -> None:
        for key in self.COUNTED:
            setattr(self, key, counters.get(key, getattr(self, key)))
        self.refused.update(counters.get("refused", {}))

    def session_resumed(self, session: Session) -> None:
        """An internal session an earlier superd served goes on here (superd upgrade)."""
        self.limits.per_peer[session.peer] += 1

    def status(self) -> dict[str, object]:
        return {"accepted": self.accepted, "active": self.active(),
                "refused": dict(self.refused), "paused": self.paused,
                "answered": self.answered, "dropped": self.dropped,
                "backoff": self.limits.backoff_left(), "start_failure": self.start_failure,
                "last_exit": self.last_exit,
                "listen": [str(listener) for listener in self.listeners]}
