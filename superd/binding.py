"""The listening sockets of a table, kept across reloads.

Listeners are kept in a pool keyed by what they are bound to, so that a reload reuses every
socket whose address did not change (an unchanged service refuses no connection) and binds new
ones before closing old ones. Sockets passed by systemd are kept apart, by service name.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from superd.config import Service, Table
from superd.listeners import Address, Key, Listener


class BindError(Exception):
    pass


def _bind_error(svc: Service, addr: Address, e: OSError) -> str:
    return f"services.{svc.name}.listen: cannot bind {addr}: {e.strerror} ({svc.where})"


def _in_the_way(going: dict[Key, Listener], svc: Service, addr: Address) -> bool:
    """Is one of the sockets this reload gives up bound over `addr`, for the same kind?"""
    return any(lst.address is not None and lst.stream == svc.stream and lst.address.overlaps(addr)
               for lst in going.values())


class ListenerPool:
    def __init__(self, passed: dict[str, list[Listener]], info: Callable[[str], None],
                 unwatch: Callable[[Listener], None]):
        self.pool: dict[Key, Listener] = {}
        self.passed = passed
        self.info, self.unwatch = info, unwatch

    def for_service(self, svc: Service) -> list[Listener]:
        if svc.name in self.passed:
            return list(self.passed[svc.name])
        keys = [a.key(svc.protocol, svc.sockopts) for a in svc.listen]
        return [self.pool[k] for k in keys if k in self.pool]

    def all(self) -> list[Listener]:
        return [*self.pool.values(), *(p for ps in self.passed.values() for p in ps)]

    def bind(self, table: Table) -> dict[Key, Listener]:
        """Listeners for `table`: reused from the pool where the address is the same.

        New addresses are bound while the old sockets still serve. Only an address that
        overlaps an old one going away (`7` becoming `0.0.0.0:7`) cannot be: the kernel
        refuses both at once. Those are bound last, right after closing what is in the way,
        and if that still fails the old sockets are bound again and BindError is raised.
        """
        pool: dict[Key, Listener] = {}
        deferred: list[tuple[Service, Address]] = []
        wanted = {a.key(s.protocol, s.sockopts) for s in table.enabled if s.name not in self.passed
                  for a in s.listen}
        going = {k: lst for k, lst in self.pool.items() if k not in wanted}
        try:
            for svc in table.enabled:
                if svc.name in self.passed:
                    continue
                for addr in svc.listen:
                    try:
                        pool[addr.key(svc.protocol, svc.sockopts)] = self._listener(svc, addr)
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
        listener = self.pool.get(addr.key(svc.protocol, svc.sockopts))
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
                listener.close()
        self.pool = pool

    def close_all(self) -> None:
        for listener in self.all():
            self.unwatch(listener)
            listener.close()
