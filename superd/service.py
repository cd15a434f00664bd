"""One service at run time: accept its connections, check them, start their handlers.

The loop calls `ready()` when a listener of this service is readable; everything a connection
goes through happens here, in order: accept (in a batch, until EAGAIN), ask `limits` whether
it may proceed, then start an internal session or spawn a handler. The record (`config`) is
replaced on reload; counters, running handlers and sessions stay with this object.
"""

from __future__ import annotations

import _socket
import errno
import os
import socket
import struct
import time
from collections import Counter
from functools import partial
from typing import TYPE_CHECKING

from superd import spawn
from superd.access import is_unicast
from superd.children import Child, StderrLines
from superd.config import Service
from superd.internal import BUILTINS, Session
from superd.limits import Limits
from superd.listeners import Listener, plain_ip
from superd.loop import READ

if TYPE_CHECKING:
    from superd.server import Server

ACCEPT_BATCH = 64  # connections per wake-up per listener; the rest wait for the next turn
DATAGRAM_BATCH = 256
WAIT_RETRY = 0.1  # a wait service over a limit looks again this much later
FD_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
PROTO = {socket.AF_INET: "TCP", socket.AF_INET6: "TCP", socket.AF_UNIX: "UNIX"}


class ServiceRuntime:
    def __init__(self, server: Server, config: Service):
        self.server = server
        self.log = server.log
        self.loop = server.loop
        self.listeners: list[Listener] = []
        self.sessions: set[Session] = set()
        self.children: set[Child] = set()
        self.accepted = 0
        self.refused: Counter[str] = Counter()
        self.last_exit: int | None = None
        self.stderr_w = -1
        self.retired = False
        self.limits = Limits(self)
        self.configure(config)

    def configure(self, config: Service) -> None:
        self.config = config
        self.name = config.name
        self.prepared = spawn.prepare(config, dict(os.environ))
        self.builtin = BUILTINS.get(config.internal)
        self.limits.configure(config)

    @property
    def active(self) -> int:
        return len(self.children) + len(self.sessions)

    @property
    def paused(self) -> str | None:
        return self.limits.paused

    # -- readiness --------------------------------------------------------------------------

    def ready(self, listener: Listener) -> None:
        if self.builtin is not None and not listener.stream:
            self.datagrams(listener)
        elif self.config.wait:
            self.start_wait(listener)
        else:
            self.accept(listener)

    def accept(self, listener: Listener) -> None:
        sock = listener.sock
        family, kind = listener.family, listener.kind
        for _ in range(ACCEPT_BATCH):
            if self.limits.paused:
                return
            try:
                # The C-level accept and socket type: socket.accept() spends twice the
                # syscall's time building a Python socket object we do not need.
                fd, addr = sock._accept()  # type: ignore[attr-defined]
                conn = _socket.socket(family, kind, 0, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in FD_ERRORS:
                    self.limits.out_of_fds(e)
                elif e.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    self.log.error(f"{self.name}: accept on {listener}: {e.strerror}")
                return
            if self.limits.fd_backoff:
                self.limits.accepted_ok()
            self.connection(conn, addr, listener)

    def connection(self, conn: socket.socket, addr: object, listener: Listener) -> None:
        peer = peer_of(conn, addr)
        reason = self.limits.admit(peer)
        if reason is not None:
            self.refuse(reason, peer)
            conn.close()
            return
        self.accepted += 1
        self.server.touch()
        if self.builtin is not None:
            self.start_session(conn, peer)
        else:
            self.start_handler(conn, peer, handler_env(conn, addr, peer, listener), None)
            conn.close()

    def refuse(self, reason: str, peer: str) -> None:
        self.refused[reason] += 1
        self.server.touch()
        if not self.config.log_on_failure:
            return  # log_on_failure: [] keeps FAIL lines out of the log; the count stays
        host = f" from={peer}" if "host" in self.config.log_on_failure and peer else ""
        self.log.warning(f"FAIL: {self.name} {reason}{host}",
                         SUPERD_SERVICE=self.name, REMOTE_ADDR=peer)

    # -- internal services ------------------------------------------------------------------

    def start_session(self, conn: socket.socket, peer: str) -> None:
        self.log_start(0, peer)
        session = self.builtin.stream(self.loop, conn, self.session_done, peer)
        self.sessions.add(session)
        session.start()
        if self.config.timeout and not session.closed:
            session.timer = self.loop.call_later(self.config.timeout,
                                                 lambda: self.session_overrun(session))

    def session_overrun(self, session: Session) -> None:
        """`timeout` holds for internal sessions too: a silent client must not keep its slot."""
        if not session.closed:
            self.refuse("timeout", session.peer)
            session.close()

    def session_done(self, session: Session) -> None:
        self.sessions.discard(session)
        if session.timer is not None:
            session.timer.cancel()
        self.limits.freed(session.peer)
        if "traffic" in self.config.log_on_success:
            self.log.info(f"EXIT: {self.name} status=0 pid=0 duration="
                          f"{int(time.monotonic() - session.started)}(sec) "
                          f"in={session.bytes_in}(bytes) out={session.bytes_out}(bytes)",
                          SUPERD_SERVICE=self.name, REMOTE_ADDR=session.peer)

    def datagrams(self, listener: Listener) -> None:
        """Answer queued datagrams until the socket is empty (or a batch is done).

        The hot loop of UDP echo: names are bound to locals and the common case (no access
        rules, an unprivileged unicast source) costs no method call.
        """
        answer = self.builtin.datagram
        recvfrom, sendto = listener.sock.recvfrom, listener.sock.sendto
        checked = self.limits.has_rules or listener.sock.family == socket.AF_UNIX
        allowed = self.limits.datagram_allowed
        for _ in range(DATAGRAM_BATCH):
            try:
                data, addr = recvfrom(65536)
            except OSError:
                return  # EAGAIN: drained
            if checked:
                if not allowed(addr):
                    continue
            elif addr[1] < 1024 or not is_unicast(addr[0]):
                continue
            reply = answer(data)
            if reply is not None:
                try:
                    sendto(reply, addr)
                except OSError:
                    pass

    # -- handlers ---------------------------------------------------------------------------

    def start_wait(self, listener: Listener) -> None:
        """Hand the listening socket itself to a handler; stop polling it until that exits."""
        peer, env = wait_peer_env(listener)
        reason = self.limits.admit(peer)
        if reason is not None:
            self.refuse(reason, peer)
            if reason in ("service_limit", "process_limit"):
                # The socket stays readable: wait for room instead of asking again at once.
                self.limits.pause(reason, WAIT_RETRY)
            elif not listener.stream:
                _drop_datagram(listener.sock)  # a datagram from a refused address
            return
        self.accepted += 1
        self.start_handler(listener.sock, peer, env, listener)

    def start_handler(self, sock: socket.socket, peer: str, env: dict[str, str],
                      listener: Listener | None) -> None:
        spawners = self.server.spawners
        if listener is None and self.prepared.fast and spawners is not None:
            mode, request = spawn.remote_request(self.prepared, env)
            fds = [sock.fileno()] + ([self.stderr_pipe()] if mode == "log" else [])
            token = spawners.spawn(mode, request, fds)
            if token is not None:  # the pid comes back later: Server.spawned()
                child = Child(0, self, peer, -1, inode=os.fstat(sock.fileno()).st_ino)
                self.children.add(child)
                self.server.pending[token] = child
                return
        try:
            started = spawn.spawn(self.prepared, sock, env, listener is not None,
                                  self.stderr_pipe())
        except OSError as e:
            self.log.error(f"{self.name}: cannot fork: {e.strerror}")
            self.refuse("exec", peer)
            self.limits.freed(peer)
            return
        child = Child(started.pid, self, peer, started.status, failure=started.failure)
        if started.status >= 0:
            self.loop.add(started.status, READ, partial(self.status_ready, child))
        self.children.add(child)
        if listener is not None:
            child.listener = listener
            self.server.hold(listener, child)
        self.running(child)

    def running(self, child: Child) -> None:
        """The handler has a pid: adopt it, log START, start its clock."""
        self.server.adopt(child)
        if self.config.timeout:
            child.timers.append(self.loop.call_later(self.config.timeout,
                                                     lambda: self.server.overrun(child)))
        self.log_start(child.pid, child.peer)

    def not_started(self, child: Child, failure: str | None) -> None:
        """A spawner could not even fork: the client is closed (by the spawner)."""
        self.children.discard(child)
        self.log.error(f"{self.name}: cannot start handler: {failure}")
        self.refuse("exec", child.peer)
        self.limits.freed(child.peer)
        if self.retired:
            self.retire()

    def stderr_pipe(self) -> int:
        """The write end of this service's stderr pipe (one for all its handlers), or -1."""
        if self.config.stderr != "log":
            return -1
        if self.stderr_w < 0:
            r, self.stderr_w = os.pipe2(os.O_CLOEXEC)
            StderrLines(self.loop, self.log, r, self.name)
        return self.stderr_w

    def retire(self) -> None:
        """Removed from the table: once its last handler is gone, release what it holds."""
        self.retired = True
        self.listeners = []
        if not self.children and self.stderr_w >= 0:
            os.close(self.stderr_w)  # the reader sees EOF once no handler holds it either
            self.stderr_w = -1

    def status_ready(self, child: Child, mask: int) -> None:
        """The exec-status pipe closed (exec worked) or says why it failed: keep no fd open."""
        if child.status_fd < 0:
            return  # already read when the child was reaped earlier in this batch
        self.loop.remove(child.status_fd)
        child.failure = spawn.exec_failure(child.status_fd)
        child.status_fd = -1

    def log_start(self, pid: int, peer: str) -> None:
        opts = self.config.log_on_success
        if not opts & {"pid", "host"}:
            return
        text = f"START: {self.name}"
        if "pid" in opts:
            text += f" pid={pid}"
        if "host" in opts and peer:
            text += f" from={peer}"
        self.log.info(text, SUPERD_SERVICE=self.name, REMOTE_ADDR=peer)

    def exited(self, child: Child, status: int) -> None:
        """The loop reaped `child`: log it, free its slot."""
        self.children.discard(child)
        self.server.touch()
        child.cancel_timers()
        failure = child.failure
        if child.status_fd >= 0:  # reaped before the loop saw the pipe
            self.loop.remove(child.status_fd)
            failure = spawn.exec_failure(child.status_fd)
            child.status_fd = -1
        duration = time.monotonic() - child.started
        if failure is not None:
            self.log.error(f"{self.name}: cannot start handler: {failure}")
            self.refuse("exec", child.peer)
            code = spawn.EXEC_FAILED
        else:
            code = os.waitstatus_to_exitcode(status)
            self.last_exit = code
            self.log_exit(child, code, duration)
        self.limits.exited(child.peer, code, duration)
        if self.retired:
            self.retire()

    def log_exit(self, child: Child, code: int, duration: float) -> None:
        opts = self.config.log_on_success
        if not opts & {"exit", "pid", "duration"}:
            return
        text = f"EXIT: {self.name}"
        if "exit" in opts:
            text += f" signal={-code}" if code < 0 else f" status={code}"
        if "pid" in opts:
            text += f" pid={child.pid}"
        if "duration" in opts:
            text += f" duration={int(duration)}(sec)"
        self.log.info(text, SUPERD_SERVICE=self.name, REMOTE_ADDR=child.peer,
                      EXIT_STATUS=str(code))

    def close_sessions(self) -> None:
        for session in list(self.sessions):
            session.close()


def peer_of(conn: socket.socket, addr: object) -> str:
    """The peer as logged and limited: its IP (IPv4-mapped shown as IPv4), or uid:N on unix."""
    if isinstance(addr, tuple):
        return plain_ip(addr[0])
    pid, uid, gid = _peercred(conn)
    return f"uid:{uid}"


def _peercred(conn: socket.socket) -> tuple[int, int, int]:
    return struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))


def handler_env(conn: socket.socket, addr: object, peer: str,
                listener: Listener) -> dict[str, str]:
    """The connection's part of the handler environment (SPEC §3)."""
    if not isinstance(addr, tuple):
        pid, uid, gid = _peercred(conn)
        return {"PROTO": "UNIX", "UNIXREMOTEEUID": str(uid), "UNIXREMOTEEGID": str(gid),
                "UNIXREMOTEPID": str(pid)}
    local = listener.address
    if local is not None and local.host not in ("0.0.0.0", "::"):
        lip, lport = local.host, local.port
    else:
        lip, lport = conn.getsockname()[:2]
        lip = plain_ip(lip)
    return _ip_env("TCP", peer, addr[1], lip, lport)


def _ip_env(proto: str, ip: str, port: int, lip: str, lport: int) -> dict[str, str]:
    p, lp = str(port), str(lport)
    return {"PROTO": proto, "TCPREMOTEIP": ip, "TCPREMOTEPORT": p, "TCPLOCALIP": lip,
            "TCPLOCALPORT": lp, "REMOTE_ADDR": ip, "REMOTE_PORT": p, "REMOTE_HOST": ip}


def wait_peer_env(listener: Listener) -> tuple[str, dict[str, str]]:
    """For a wait handler: the sender of the first queued datagram, if any (MSG_PEEK)."""
    sock = listener.sock
    proto = "UDP" if sock.family != socket.AF_UNIX and not listener.stream else PROTO[sock.family]
    if listener.stream or sock.family == socket.AF_UNIX:
        return "", {"PROTO": proto}
    try:
        _, addr = sock.recvfrom(1, socket.MSG_PEEK)
    except OSError:
        return "", {"PROTO": proto}
    ip = plain_ip(addr[0])
    lip, lport = sock.getsockname()[:2]
    return ip, _ip_env(proto, ip, addr[1], plain_ip(lip), lport)


def _drop_datagram(sock: socket.socket) -> None:
    try:
        sock.recv(1)
    except OSError:
        pass
