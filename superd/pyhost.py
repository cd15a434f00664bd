"""A python host: the process that forks a python service's handlers.

A python handler runs Python code, so it cannot exec into a fresh image: it is a fork of
whatever process starts it. Forked from superd, it would hold superd's whole memory, every
other service's configuration (their `env` secrets) included, readable by a `user: nobody`
handler. So each python service has a host of its own: a fresh interpreter (this file) that
is given that one service's record, loads its handler, and forks one child per connection.
It speaks the spawner protocol (superd/spawnproto.py): the same requests with the connection
attached, the same Started and Exited replies; superd/spawners.py runs it.

The first message from superd is the service record (pickled: superd is this process's
parent and only peer).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import sys
from typing import Any

if __name__ == "__main__":  # run as a script: the superd package is the folder above this file
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from superd import fields, spawn, spawnproto  # noqa: E402
from superd.config import Service  # noqa: E402
from superd.spawner import Start, serve  # noqa: E402

# What a python host does not need: how connections get to it, and what is logged of them.
NOT_FOR_HOST: dict[str, Any] = {
    "listen": (), "instances": None, "on_limit": "queue", "per_source": None, "rate": None,
    "only_from": (), "no_access": (), "timeout": None, "backlog": 128, "backoff": None,
    "log_on_success": frozenset(), "log_on_failure": frozenset(), "line": 0}


def host_record(config: Service) -> Service:
    """The part of a python service's record its host is given: a change elsewhere (limits,
    access rules, logging) does not replace the host."""
    return dataclasses.replace(config, function=None, **NOT_FOR_HOST)


def load(service: Service) -> spawn.Prepared:
    """The service with its handler loaded here, prepared for spawn.spawn()."""
    ctx = fields.Context(name=service.name, table_dir=os.path.dirname(service.file),
                         protocol=service.protocol)
    function = fields.load_handler(service.python, ctx)[0]
    return spawn.prepare(dataclasses.replace(service, function=function), dict(os.environ))


def python_handler(prep: spawn.Prepared) -> Start:
    def start(request: spawnproto.Request, fds: list[int],
              devnull: int) -> tuple[int, bytes | str | None]:
        env = dict(item.decode("utf-8", "surrogateescape").split("=", 1)
                   for item in request.env)
        sock = socket.socket(fileno=fds[0])
        try:
            started = spawn.spawn(prep, sock, env, prep.service.wait,
                                  fds[1] if request.stderr == "log" else -1, request.cgroup)
        except OSError as e:
            return 0, f"fork: {e.strerror}"
        finally:
            sock.detach()  # the fd is the caller's to close
        if started.exec_pipe >= 0:  # python handlers close it before their function runs
            failure = spawn.exec_outcome(started.exec_pipe)
        else:
            failure = started.failure
        return started.pid, failure
    return start


def main(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    prep = load(pickle.loads(spawnproto.receive_record(sock)))
    spawn.open_devnull()
    serve(sock, python_handler(prep))


if __name__ == "__main__":
    fd = int(sys.argv[1])
    os.closerange(3, fd)
    main(fd)
