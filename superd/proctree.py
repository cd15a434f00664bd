"""What Linux says about superd's descendants (/proc): children, their children, sessions.

superd is a child subreaper, so whatever a handler leaves behind when it exits (a daemon it
double-forked, a background job) becomes superd's own child instead of init's. These helpers
find them; each reads a few small /proc files and never blocks.
"""

from __future__ import annotations

import os

MAX_PROCESSES = 100_000  # a bound on every walk


def children(pid: int | str = "self") -> list[int]:
    """The children of `pid` (all its threads'), from /proc/PID/task/TID/children."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            pass
    return out


def descendants(pid: int | str = "self") -> list[int]:
    """Every process below `pid`, children first."""
    out: list[int] = []
    todo: list[int | str] = [pid]
    while todo and len(out) < MAX_PROCESSES:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


def session_of(pid: int) -> int | None:
    """The session id of `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (OSError, ValueError, IndexError):
        return None



def start_ticks(pid: int | str) -> int | None:
    """When `pid` started, in clock ticks after boot (/proc/PID/stat field 22), or None when
    it is gone: with the pid, it names one process over its whole life, exec included."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None
