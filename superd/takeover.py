"""What superd hands over on `superd upgrade`, and how the new superd takes it up.

superd/upgrade.py carries the state over exec; this module says what is in it. Each part
exports its own share (the pools, the process table, the sessions, each service's counters
and stderr pipe) and takes it up again on the other side, so that nothing is known twice.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any, Protocol

from superd import relay, stages
from superd import spawners as spawner_pools
from superd.binding import ListenerPool
from superd.config import Service
from superd.internal import BUILTINS
from superd.listeners import Listener, sock_ident
from superd.log import Log
from superd.loop import Loop
from superd.pipeline import Connection
from superd.processes import ProcessTable
from superd.service import ServiceRuntime, Shared
from superd.sessions import SessionTable
from superd.spawners import Spawners
from superd.stderr import StderrLines
from superd.upgrade import decode_addr, encode_addr

KINDS = {b.stream: b.name for b in BUILTINS.values()}


class Daemon(Protocol):
    """The parts of the server this module reads and fills (superd/server.py)."""

    loop: Loop
    log: Log
    listeners: ListenerPool
    processes: ProcessTable
    sessions: SessionTable
    pools: list[Spawners]
    shared: Shared
    started_at: float
    upgrades: int

    @property
    def services(self) -> dict[str, ServiceRuntime]: ...

    def pool_callbacks(self) -> dict[str, Any]: ...


def export(daemon: Daemon, pidfile: str | None) -> tuple[dict[str, Any], list[int]]:
    """The state to hand over, and every fd in it (made inheritable for the exec)."""
    fds: list[int] = []

    def keep(sock: socket.socket) -> int:
        os.set_inheritable(sock.fileno(), True)
        fds.append(sock.fileno())
        return sock.fileno()

    listeners = [{"fd": keep(lst.sock), "passed": name}
                 for name, lst in _every_listener(daemon)]
    waiting = []
    for name, runtime in daemon.services.items():
        for pipeline in [*runtime.draining, runtime.pipeline]:
            for conn in list(pipeline.waiting) if pipeline is not None else []:
                waiting.append({"fd": keep(conn.sock), "service": name, "peer": conn.peer,
                                "addr": encode_addr(conn.addr),
                                "listener": sock_ident(conn.listener.sock)})
    services = {name: rt.export() for name, rt in daemon.services.items()}
    stderrs: dict[str, list[dict[str, Any]]] = {}
    for name, rt in [*daemon.services.items(), *_retired(daemon)]:
        lines = rt.stderr_lines.export() if rt.stderr_lines is not None else None
        if lines is not None:
            stderrs.setdefault(name, []).append(lines)
            fds += lines["fds"]
    pools = [pool.export() for pool in daemon.pools if pool.socks]
    for pool in pools:
        fds += [helper["fd"] for helper in pool["helpers"]]
    sessions = daemon.sessions.export(
        lambda s: "redirect" if isinstance(s, relay.Relay) else KINDS.get(type(s), ""))
    for item in sessions:
        fds += [item["fd"], *item["extra"].get("fds", [])]
    state = {"listeners": listeners, "waiting": waiting, "services": services, "pools": pools,
             "processes": daemon.processes.export(sock_ident_of),
             "sessions": sessions, "stderr": stderrs,
             "bans": stages.shared_for(daemon.loop).bans.export(),
             "next_token": spawner_pools.next_free_token(),
             "uptime": time.monotonic() - daemon.started_at, "upgrades": daemon.upgrades,
             "pidfile": pidfile}
    return state, fds


def _retired(daemon: Daemon) -> list[tuple[str, ServiceRuntime]]:
    """Services gone from the table whose handlers still run (their stderr still read)."""
    live = set(map(id, daemon.services.values()))
    owners = {id(h.owner): h.owner for h in daemon.processes.by_pid.values()}
    return [(o.name, o) for key, o in owners.items()
            if key not in live and isinstance(o, ServiceRuntime)]


def sock_ident_of(listener: Listener) -> str:
    return sock_ident(listener.sock)


def _every_listener(daemon: Daemon) -> list[tuple[str | None, Listener]]:
    out: list[tuple[str | None, Listener]] = [(None, lst) for lst in daemon.listeners.pool.values()]
    out += [(name, lst) for name, socks in daemon.listeners.passed.items() for lst in socks]
    return out


def inherited_listeners(state: dict[str, Any]) -> list[socket.socket]:
    """The listening sockets (not systemd's: those come back as passed ones)."""
    out = []
    for item in state["listeners"]:
        if item["passed"] is None:
            os.set_inheritable(item["fd"], False)
            out.append(socket.socket(fileno=item["fd"]))
    return out


def passed_listeners(state: dict[str, Any]) -> dict[str, list[socket.socket]]:
    out: dict[str, list[socket.socket]] = {}
    for item in state["listeners"]:
        if item["passed"] is not None:
            os.set_inheritable(item["fd"], False)
            out.setdefault(item["passed"], []).append(socket.socket(fileno=item["fd"]))
    return out


def resume(daemon: Daemon, state: dict[str, Any]) -> str:
    """Take up what the earlier superd held; say in a line what that was."""
    daemon.started_at = time.monotonic() - state["uptime"]
    daemon.upgrades = state["upgrades"] + 1
    spawner_pools.tokens_from(state["next_token"])
    stages.shared_for(daemon.loop).bans.restore(state.get("bans", {}))
    for name, counters in state["services"].items():
        if name in daemon.services:
            daemon.services[name].restore(counters)
    for name, readers in state["stderr"].items():
        for item in readers:  # what running handlers write there is read to its end
            lines = StderrLines.resume(daemon.loop, daemon.log, name, item)
            runtime = daemon.services.get(name)
            if runtime is not None and runtime.stderr_lines is not None \
                    and item is readers[0] and lines.write_fd >= 0:
                runtime.adopt_stderr(lines)
            else:
                lines.close_write()
    for item in state["pools"]:
        pool = Spawners.adopt(item, **daemon.pool_callbacks())
        daemon.pools.append(pool)
        pool.retire()  # (closes at once if it has nothing left to answer for)
    by_ident = {sock_ident(lst.sock): lst for _, lst in _every_listener(daemon)}
    ghosts: dict[str, ServiceRuntime] = {}
    handlers = daemon.processes.restore(
        state["processes"], lambda name: owner(daemon, name, ghosts),
        lambda ident: by_ident.get(ident) if ident else None)
    for runtime in daemon.services.values():
        runtime.poll()  # a listener a wait handler holds is not watched (nor made non-blocking)
    for item in state["sessions"]:
        runtime = owner(daemon, item["service"], ghosts)
        builtin = BUILTINS.get(item["kind"])
        if item["kind"] == "redirect":
            builtin = (runtime.builtin if runtime.builtin is not None
                       and runtime.builtin.name == "redirect"
                       else relay.resumed_builtin(runtime.name, daemon.log))
        if builtin is None:
            os.close(item["fd"])
            continue
        runtime.session_resumed(daemon.sessions.start_resumed(item, builtin, runtime))
    for item in state["waiting"]:
        os.set_inheritable(item["fd"], False)
        sock = socket.socket(fileno=item["fd"])
        runtime, listener = daemon.services.get(item["service"]), by_ident.get(item["listener"])
        if runtime is None or runtime.pipeline is None or listener is None:
            sock.close()
            continue
        runtime.pipeline.begin(Connection(sock, decode_addr(item["addr"]), item["peer"],
                                          listener))
    return (f"{handlers} handlers, {len(state['sessions'])} sessions and "
            f"{len(state['listeners'])} listening sockets taken over")


def owner(daemon: Daemon, name: str, ghosts: dict[str, ServiceRuntime]) -> ServiceRuntime:
    """The service of a handler or session handed over; one no longer in the table gets a
    retired stand-in, so that its handlers are still reaped and logged."""
    runtime = daemon.services.get(name) or ghosts.get(name)
    if runtime is None:
        runtime = ghosts[name] = ServiceRuntime(Service(name=name, stderr="null"),
                                                daemon.shared)
        runtime.retire()
    return runtime

