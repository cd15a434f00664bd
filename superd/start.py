"""Starting what an admitted connection gets: an internal session, or a handler process.

A handler of an exec service (nowait, no nice or rlimits) is sent to a spawner process
(superd/spawners.py) and the loop goes on at once; the spawner's answer brings its pid. Every
other handler is forked by the loop itself (superd/spawn.py). Either way the handler is
entered in the process table, which tells its service when it runs and when it is gone.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from functools import partial

from superd import spawn
from superd.listeners import Listener
from superd.loop import READ, Loop
from superd.processes import Handler, Owner, ProcessTable
from superd.spawners import Spawners


class Starter:
    """Shared by all services: the loop, the process table and the spawner pool."""

    def __init__(self, loop: Loop, processes: ProcessTable,
                 spawners: Callable[[], Spawners | None]):
        self.loop, self.processes, self.spawners = loop, processes, spawners

    def handler(self, owner: Owner, prep: spawn.Prepared, sock: socket.socket, peer: str,
                env: dict[str, str], listener: Listener | None, stderr_fd: int,
                host: Spawners | None = None) -> Handler:
        """Start `owner`'s handler for `sock` (a connection, or for a wait service the
        listener itself). OSError when it cannot even be forked; the caller still owns
        `sock` and closes it. A python handler is forked by its service's `host`, never
        by superd itself: it would hold superd's memory, every other service's included."""
        cgroup = self.processes.place()
        try:
            if prep.service.python:
                return self._python(owner, prep, sock, peer, env, listener, stderr_fd, host,
                                    cgroup)
            return self._exec(owner, prep, sock, peer, env, listener, stderr_fd, cgroup)
        except BaseException:
            self.processes.unplaced(cgroup)
            raise

    def _exec(self, owner: Owner, prep: spawn.Prepared, sock: socket.socket, peer: str,
              env: dict[str, str], listener: Listener | None, stderr_fd: int,
              cgroup: str) -> Handler:
        spawners = self.spawners()
        if listener is None and prep.fast and spawners is not None:
            token = spawners.next_token()
            log_fd = stderr_fd if prep.service.stderr == "log" and stderr_fd >= 0 else -1
            fds = [sock.fileno()] if log_fd < 0 else [sock.fileno(), log_fd]
            if spawners.send(prep.request(token, env, log_fd, cgroup), fds):
                handler = Handler(owner, peer, inode=os.fstat(sock.fileno()).st_ino,
                                  cgroup=cgroup)
                self.processes.sent(handler, token)
                return handler
        started = spawn.spawn(prep, sock, env, listener is not None, stderr_fd, cgroup)
        handler = Handler(owner, peer, listener=listener, exec_pipe=started.exec_pipe,
                          failure=started.failure, cgroup=cgroup)
        if started.exec_pipe >= 0:
            self.loop.add(started.exec_pipe, READ, partial(self._exec_pipe, handler))
        self.processes.started(handler, started.pid)
        return handler

    def _python(self, owner: Owner, prep: spawn.Prepared, sock: socket.socket, peer: str,
                env: dict[str, str], listener: Listener | None, stderr_fd: int,
                host: Spawners | None, cgroup: str) -> Handler:
        if host is None:
            raise OSError(errno.EAGAIN, "its python host is not running")
        token = host.next_token()
        log_fd = stderr_fd if prep.service.stderr == "log" and stderr_fd >= 0 else -1
        fds = [sock.fileno()] if log_fd < 0 else [sock.fileno(), log_fd]
        if not host.send(prep.request(token, env, log_fd, cgroup), fds):
            raise OSError(errno.EAGAIN, "its python host cannot take the request")
        handler = Handler(owner, peer, listener=listener, inode=os.fstat(sock.fileno()).st_ino,
                          cgroup=cgroup)
        self.processes.sent(handler, token)
        return handler

    def _exec_pipe(self, handler: Handler, mask: int) -> None:
        """The exec-status pipe closed (exec worked) or says why it failed."""
        self.settle(handler)

    def settle(self, handler: Handler) -> None:
        """Read the exec outcome if still unread (the handler may be reaped first): no fd is
        kept open for it."""
        if handler.exec_pipe >= 0:
            self.loop.remove(handler.exec_pipe)
            handler.failure = spawn.exec_outcome(handler.exec_pipe)
            handler.exec_pipe = -1
