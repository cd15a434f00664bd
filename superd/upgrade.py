"""`superd upgrade`: the superd installed now takes over, in place, losing nothing.

The running superd writes what it holds into a memfd (every listening socket, every running
handler and what it left behind, every internal session and its unsent bytes, the helper
processes, the counters, the stderr pipes), keeps the fds of all of it open over exec, and
execs the superd that is installed now, in the same process: systemd sees no restart, clients
see nothing (the kernel keeps queueing connections on the listening sockets meanwhile), and
handlers stay superd's children. The new superd reads the memfd and goes on as if nothing
happened: it reaps, logs and limits the handlers, serves the sessions, keeps the counts.

If the exec fails, the running superd undoes what it prepared and goes on; the reason is in the
log and in `superd status`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Iterable
from typing import Any

from superd.config import Settings, Table

ENV = "SUPERD_UPGRADE_STATE"  # the fd of the memfd, in the new superd's environment
VERSION = 1


def hand_over(state: dict[str, Any], table: str, keep: Iterable[int]) -> str:
    """Exec the installed superd with `state`; only returns (with why) if that fails. The
    caller has blocked every signal (see block_signals): those that come during the exec
    wait, blocked, for the new superd's handlers (the mask survives exec; a default
    disposition would end the process)."""
    keep = list(keep)
    fd = os.memfd_create("superd-upgrade", 0)
    cwd = os.getcwd()
    # `-m superd` imports from the current directory first: exec from where this superd's
    # package lies, so that the same installation (a checkout too) is the one taking over,
    # whatever directory superd runs in (/ once daemonized). The new one goes back to `cwd`.
    home = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        os.write(fd, json.dumps({"version": VERSION, "cwd": cwd, **state}).encode())
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        env = {**os.environ, ENV: str(fd)}
        argv = [sys.executable, "-m", "superd", "run", "-c", table]
        try:
            os.chdir(home)
            os.execve(sys.executable, argv, env)
        except OSError as e:
            os.chdir(cwd)
            return f"cannot run {sys.executable}: {e.strerror}"
    finally:
        os.close(fd)
        for other in keep:
            try:
                os.set_inheritable(other, False)
            except OSError:
                pass
    return "exec returned"  # (it never does)


def take_over() -> dict[str, Any] | None:
    """In the new superd: what the earlier one handed over, if this is an upgrade."""
    value = os.environ.pop(ENV, None)
    if value is None or not value.isdigit():
        return None
    fd = int(value)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    os.close(fd)
    state: dict[str, Any] = json.loads(b"".join(chunks))
    if state.get("version") != VERSION:
        raise ValueError(f"an upgrade state of version {state.get('version')}, not {VERSION}")
    try:
        os.chdir(state.get("cwd") or "/")
    except OSError:
        os.chdir("/")
    return state


def block_signals() -> set[int | signal.Signals]:
    """Block every signal; return the mask to go back to."""
    return signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())


def unblock_signals() -> None:
    """Once the new superd's loop catches signals: let those that came meanwhile in."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def empty_table(path: str) -> Table:
    """What the new superd serves when the table cannot be read at all (it was checked just
    before the upgrade, so this is rare): nothing new, but what was handed over is still
    reaped, logged and finished, and a reload with a table that reads takes it from there."""
    return Table(path, Settings(), ())


def encode_addr(addr: object) -> object:
    """A peer address as JSON can carry it (a tuple, a path, an abstract name)."""
    if isinstance(addr, bytes):
        return {"bytes": addr.decode("latin-1")}
    return list(addr) if isinstance(addr, tuple) else addr


def decode_addr(value: object) -> object:
    if isinstance(value, dict):
        return value["bytes"].encode("latin-1")
    return tuple(value) if isinstance(value, list) else value
