"""The listening sockets of a table, kept across reloads.

Listeners are kept in a pool keyed by what they are bound to, so that a reload reuses every
socket whose address did not change (an unchanged service refuses no connection) and binds new
ones before closing old ones. Sockets passed by systemd are kept apart, by service name.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable

from superd import caps
from superd.config import Service
from superd.listeners import PROTOCOLS, Address, Key, Listener, ident, sock_ident


class BindError(Exception):
    pass


def _bind_error(svc: Service, addr: Address, e: OSError) -> str:
    """The reason a bind failed; a privileged port names the capability superd lacks."""
    why = caps.port_needs(addr.port) if e.errno == errno.EACCES and addr.inet else None
    return (f"services.{svc.name}.listen: cannot bind {addr}: {e.strerror}"
            + (f" ({why})" if why else "") + f" ({svc.where})")


def _in_the_way(going: dict[Key, Listener], svc: Service, addr: Address) -> bool:
    """Is one of the sockets this reload gives up bound over `addr`, for the same kind?"""
    return any(lst.address is not None and lst.stream == svc.stream and lst.address.overlaps(addr)
               for lst in going.values())


def keys(svc: Service) -> list[Key]:
    """What each listener of `svc` is keyed by in the pool."""
    return [a.key(svc.protocol, svc.sockopts) for a in svc.listen]


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError:
        return 0


class ListenerPool:
    def __init__(self, passed: dict[str, list[Listener]], info: Callable[[str], None],
                 unwatch: Callable[[Listener], None],
                 forget: Callable[[socket.socket], None] = lambda sock: None):
        self.pool: dict[Key, Listener] = {}
        self.passed = passed
        self.info, self.unwatch = info, unwatch
        self.forget = forget  # told of each socket closed for good (superd/fdstore.py)
        self.inherited: dict[str, socket.socket] = {}  # from the superd before an upgrade

    def for_service(self, svc: Service) -> list[Listener]:
        if svc.name in self.passed:
            return list(self.passed[svc.name])
        return [self.pool[k] for k in keys(svc) if k in self.pool]

    def all(self) -> list[Listener]:
        return [*self.pool.values(), *(p for ps in self.passed.values() for p in ps)]

    def bind(self, services: list[Service]) -> tuple[dict[Key, Listener], dict[str, str]]:
        """Listeners for `services`, reused from the pool where the address is the same, and
        the services that could not be bound, with why. A service gets all its addresses or
        none (what it had bound is let go again).

        New addresses are bound while the old sockets still serve. Only an address that
        overlaps an old one going away (`7` becoming `0.0.0.0:7`) cannot be: the kernel
        refuses both at once. Those are bound last, right after closing what is in the way;
        if that still fails the old sockets are bound again and the service fails.
        """
        pool: dict[Key, Listener] = {}
        failures: dict[str, str] = {}
        deferred: list[tuple[Service, Address]] = []
        wanted = {a.key(s.protocol, s.sockopts) for s in services
                  if s.name not in self.passed for a in s.listen}
        going = {k: lst for k, lst in self.pool.items() if k not in wanted}
        for svc in services:
            if svc.name in self.passed:
                continue
            mine: dict[Key, Listener] = {}
            later: list[tuple[Service, Address]] = []
            try:
                for addr in svc.listen:
                    try:
                        mine[addr.key(svc.protocol, svc.sockopts)] = self._listener(svc, addr)
                    except OSError as e:
                        if e.errno == errno.EADDRINUSE and _in_the_way(going, svc, addr):
                            later.append((svc, addr))
                        else:
                            raise BindError(_bind_error(svc, addr, e)) from None
            except BindError as e:
                self._let_go(mine)
                failures[svc.name] = str(e)
                continue
            pool.update(mine)
            deferred += later
        if deferred:
            try:
                self._rebind_over(going, deferred, pool)
            except BindError as e:
                for svc in {s.name: s for s, _ in deferred}.values():
                    failures[svc.name] = str(e)
                    self._let_go({k: pool.pop(k) for k in keys(svc) if k in pool})
        return pool, failures

    def _let_go(self, listeners: dict[Key, Listener]) -> None:
        """Close what this bind made anew (a reused socket stays the pool's)."""
        for key, listener in listeners.items():
            if key not in self.pool:
                listener.close()

    def try_bind(self, svc: Service) -> list[Listener] | str:
        """Bind one service now (a retry): its listeners, added to the pool, or why not."""
        _, failures = self.bind_more([svc])
        return failures[svc.name] if svc.name in failures else self.for_service(svc)

    def bind_more(self, services: list[Service]) -> tuple[dict[Key, Listener], dict[str, str]]:
        """Bind `services` beside what the pool holds, which stays as it is."""
        mine: dict[Key, Listener] = {}
        failures: dict[str, str] = {}
        for svc in services:
            made: dict[Key, Listener] = {}
            try:
                for addr in svc.listen:
                    key = addr.key(svc.protocol, svc.sockopts)
                    if key in self.pool or key in mine:
                        raise BindError(f"services.{svc.name}.listen: {addr} is already "
                                        f"another service's ({svc.where})")
                    try:
                        made[key] = Listener.bind(addr, svc.protocol, svc.backlog,
                                                  svc.sockopts)
                    except OSError as e:
                        raise BindError(_bind_error(svc, addr, e)) from None
                    made[key].backlog = svc.backlog
            except BindError as e:
                for listener in made.values():
                    listener.close()
                failures[svc.name] = str(e)
                continue
            mine.update(made)
        self.pool.update(mine)
        return mine, failures

    def inherit(self, socks: list[socket.socket]) -> None:
        """Sockets an earlier superd bound (superd upgrade, or kept in systemd's fd store over
        a restart): used where the table has their address, instead of binding again (which
        would fail: they are still bound)."""
        self.inherited = {sock_ident(s): s for s in socks}

    def drop_inherited(self) -> None:
        """What the table no longer has: closed, as a reload would."""
        for sock in self.inherited.values():
            self.forget(sock)
            sock.close()
        self.inherited.clear()

    def _listener(self, svc: Service, addr: Address) -> Listener:
        listener = self.pool.get(addr.key(svc.protocol, svc.sockopts))
        old = self.inherited.pop(ident(addr.family, PROTOCOLS[svc.protocol], addr.sockaddr),
                                 None) if listener is None and self.inherited else None
        if old is not None:
            # Blocking only while a wait handler holds it (ServiceRuntime.start_wait): then it
            # stays so, and is made non-blocking when that handler is gone.
            if not os.get_blocking(old.fileno()):
                old.setblocking(False)
            listener = Listener(addr, svc.protocol, old, options=svc.sockopts,
                                inode=_inode(addr.path) if addr.file else 0)
            listener.backlog = -1  # (set again below, with listen())
        if listener is None:
            listener = Listener.bind(addr, svc.protocol, svc.backlog, svc.sockopts)
        else:
            if listener.stream and svc.backlog != listener.backlog:
                listener.sock.listen(svc.backlog)
            problem = listener.configure(svc.sockopts)
            if problem:
                self.info(f"{svc.name}: {problem}")
        listener.backlog = svc.backlog
        return listener

    def _rebind_over(self, going: dict[Key, Listener], deferred: list[tuple[Service, Address]],
                     pool: dict[Key, Listener]) -> None:
        """Close the old sockets in the way of `deferred`, bind those; undo on failure."""
        closed = {k: lst for k, lst in going.items()
                  if any(_in_the_way({k: lst}, svc, addr) for svc, addr in deferred)}
        for key, listener in closed.items():
            self.unwatch(listener)
            self.forget(listener.sock)
            listener.close()
            del self.pool[key]
        try:
            for svc, addr in deferred:
                pool[addr.key(svc.protocol, svc.sockopts)] = self._listener(svc, addr)
                self.info(f"{svc.name}: {addr} overlaps an address given up by this reload; "
                          "closed the old socket first")
        except OSError as e:
            for key in [k for k in pool if k not in self.pool]:
                pool.pop(key).close()  # first free the addresses, then
            for key, old in closed.items():  # put the old sockets back, as far as we can
                try:
                    again = Listener.bind(old.address, old.protocol, old.backlog,  # type: ignore[arg-type]
                                          old.options)
                except OSError:
                    continue
                again.backlog = old.backlog
                self.pool[key] = again
            raise BindError(_bind_error(svc, addr, e)) from None

    def install(self, pool: dict[Key, Listener]) -> None:
        """Switch to `pool`: close the sockets it does not keep."""
        for key, listener in self.pool.items():
            if key not in pool:
                self.unwatch(listener)
                self.forget(listener.sock)
                listener.close()
        self.pool = pool

    def close_all(self) -> None:
        for listener in self.all():
            self.unwatch(listener)
            listener.close()
