"""A cgroup per handler: how `timeout` and a stop reach everything a handler started.

A process can leave its handler's process group and session (setsid, a double fork), but not
its cgroup: only root moves a process between cgroups. So where cgroup v2 is writable, each
handler starts in a cgroup of its own, C/superd-PID-TICKS/hN (C: superd's own cgroup; PID and
TICKS: superd's pid and start time, which an upgrade keeps), and what the cgroup holds is what
the handler started, wherever it went. `timeout` signals every process in it and SIGKILLs with
cgroup.kill; max_children counts them; a stop ends them all. Where cgroups cannot be used,
superd falls back on its subreaper view (superd/remains.py), and says why in `superd status`.
The directories are root's, 0755, whatever superd's umask: a handler cannot move itself out,
make a cgroup of its own in there, or write cgroup.kill.

A handler is put in its cgroup by whoever forks it, before it runs a line of its own: a
spawner moves itself in, forks, and moves back before superd hears of the handler; a
Python-forked child moves itself in first thing. What this costs per connection is kept
small: empty cgroups are pooled (a mkdir and an rmdir cost more than a list pop), and a
spawner keeps the cgroup.procs files of recently used cgroups open (an open costs as much as
the write it is for). bench/analysis.md says what is left.
"""

from __future__ import annotations

import errno
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass

POOL = 64  # empty cgroups always kept for reuse
POOL_MAX = 1024  # at most, after a burst; what no handler needed for a survey round goes
TRIM = 32  # cgroups removed at most per survey round (an rmdir costs about 60 us)
KEEP_OPEN = 128  # cgroups whose cgroup.procs a spawner keeps open (Mover)
HANDLER = re.compile(r"h[0-9]{1,9}")  # a handler's cgroup, in superd's
SUPERD = re.compile(r"superd-([0-9]{1,9})-([0-9]{1,20})")  # a superd's, in its own cgroup
SYSTEMD_INIT = "/run/systemd/system"
DELEGATE_XATTRS = ("trusted.delegate", "user.delegate")


@dataclass(frozen=True)
class Decision:
    """Whether superd uses cgroups: where (`own`, superd's cgroup directory), or why not."""

    own: str  # "" when not used
    reason: str  # a sentence for `superd status`


def mount_point(mountinfo: str = "/proc/self/mountinfo") -> str:
    """Where the cgroup v2 hierarchy is mounted, or ""."""
    try:
        with open(mountinfo) as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split(" ", 1)[0] == "cgroup2":
                    return left.split()[4]
    except OSError:
        pass
    return ""


def own_path(proc_cgroup: str = "/proc/self/cgroup") -> str | None:
    """superd's cgroup v2 path (the `0::` line), or None."""
    try:
        with open(proc_cgroup) as f:
            for line in f:
                if line.startswith("0::"):
                    return line[3:].strip()
    except OSError:
        pass
    return None


def _delegated(path: str) -> bool:
    for name in DELEGATE_XATTRS:
        try:
            if os.getxattr(path, name) == b"1":
                return True
        except OSError:
            pass
    return False


def decide(mode: str, mount: str | None = None, own: str | None = None,
           systemd: bool | None = None) -> Decision:  # (None: read it off this machine)
    """`settings.cgroups`: "no", "auto" (use them where superd may: cgroup v2 writable, and
    either no systemd manages the tree or it delegated superd's cgroup, Delegate=yes) or "yes"
    (wherever writable, delegated or not; a reason not to is an error)."""
    if mode == "no":
        return Decision("", "off (settings: cgroups: no)")
    mount = mount_point() if mount is None else mount
    own = (own_path() or "") if own is None else own  # ("/" is the root cgroup)
    systemd = os.path.isdir(SYSTEMD_INIT) if systemd is None else systemd
    if not mount:
        return Decision("", "off: no cgroup v2 hierarchy is mounted")
    if not own or own.endswith("(deleted)"):
        return Decision("", "off: superd is in no cgroup v2 group")
    path = os.path.join(mount, own.lstrip("/"))
    if not os.access(path, os.W_OK) or not os.access(os.path.join(path, "cgroup.procs"),
                                                       os.W_OK):
        return Decision("", f"off: {path} is not writable by uid {os.geteuid()}")
    if systemd and mode != "yes" and not _delegated(path):
        return Decision("", f"off: systemd manages {path} and has not delegated it to "
                        "superd (Delegate=yes in its unit)")
    return Decision(path, f"on, in {path}")


def current() -> str:
    """The directory of the calling process's cgroup ("" when there is none)."""
    mount, own = mount_point(), own_path()
    return os.path.join(mount, own.lstrip("/")) if mount and own is not None else ""


class Mover:
    """Moves the calling process into cgroups, keeping cgroup.procs of the last KEEP_OPEN
    open: a spawner moves twice per handler, opening the file costs as much as the write it
    is for, and cgroups are reused (the pool). superd itself keeps none: its fds are what its
    session and accept limits are sized from. A kept fd of a cgroup removed since fails
    (ENODEV), and the path is opened afresh: a cgroup made again under the same name is the
    new one, and a gone one says so (FileNotFoundError)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}  # least recently used first

    def move(self, path: str) -> None:
        """Into the cgroup directory `path` (OSError if it cannot)."""
        fd = self.fds.pop(path, None)
        if fd is not None:
            try:
                os.write(fd, b"0")
            except OSError as e:
                os.close(fd)
                if e.errno != errno.ENODEV:
                    raise
            else:
                self.fds[path] = fd
                return
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        except OSError:
            os.close(fd)
            raise
        self.fds[path] = fd
        while len(self.fds) > KEEP_OPEN:
            os.close(self.fds.pop(next(iter(self.fds))))

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def enter(path: str, mover: Mover | None = None) -> None:
    """Move the calling process into the handler cgroup `path` (OSError if it cannot). One
    root removed from superd's pool is made again, and superd's superd-PID-TICKS above it if
    that went too: superd hands out pooled cgroups unchecked. Without a `mover` (a child that
    moves once), no fd is left open."""
    once = mover or Mover()
    try:
        try:
            once.move(path)
        except FileNotFoundError:
            _mkdir(os.path.dirname(path), exist_ok=True)
            _mkdir(path, exist_ok=True)
            once.move(path)
    finally:
        if mover is None:
            once.close()


def base_of(own: str, pid: int, ticks: int) -> str:
    """superd's handler cgroups: superd-PID-TICKS under its own cgroup `own`."""
    return os.path.join(own, f"superd-{pid}-{ticks}")


def procs(path: str) -> list[int] | None:
    """The processes in the cgroup `path`; None when it is gone. OSError when it cannot be
    read now (EMFILE, say): then nothing is known of it."""
    try:
        fd = os.open(os.path.join(path, "cgroup.procs"), os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        data = b""
        while chunk := os.read(fd, 65536):
            data += chunk
        return [int(x) for x in data.split()]
    except OSError as e:
        if e.errno == errno.ENODEV:  # removed while open
            return None
        raise
    finally:
        os.close(fd)


def signal_all(path: str, sig: int) -> None:
    """Signal every process in `path`; SIGKILL is one write to cgroup.kill (which also reaches
    a process forked meanwhile), where the kernel has it (5.14). Other signals go through a
    pidfd of each process, and only to one still listed in `path` once the pidfd is open: a
    pid that exited and was reused meanwhile is never signalled."""
    try:
        if sig == signal.SIGKILL and _write(os.path.join(path, "cgroup.kill"), b"1"):
            return
        first = procs(path) or []
        pidfds = {}
        for pid in first:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except OSError:
                pass
        try:
            for pid in set(procs(path) or ()) & pidfds.keys():
                try:
                    signal.pidfd_send_signal(pidfds[pid], sig)
                except OSError:
                    pass
        finally:
            for fd in pidfds.values():
                os.close(fd)
    except (OSError, ValueError):
        pass


def _write(path: str, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, data)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class Cgroups:
    """superd's handler cgroups under `base`: handed out, taken back, removed.

    Empty ones are pooled: at least POOL, and after a burst as many as it needed (up to
    POOL_MAX) while bursts come; what stayed unused for a whole survey round is removed."""

    def __init__(self, base: str):
        self.base = base
        self.pool: list[str] = []  # the most recently freed last: taken first
        self.low = 0  # the pool's smallest size since the last trim
        self.serial = 0
        for name in _listdir(base):  # an upgrade: the earlier superd's ones
            if HANDLER.fullmatch(name):
                self.serial = max(self.serial, int(name[1:]))

    @classmethod
    def make(cls, own: str, pid: int, ticks: int,
             started: Callable[[int], int | None]) -> Cgroups:
        """superd's own, under its cgroup `own`: superd-PID-TICKS (TICKS: when superd
        started, which an upgrade keeps and a later process with the same pid does not).
        What a superd that is gone left is removed first, but for cgroups still holding
        processes (its handlers run on, as `stop: leave` or a crash left them)."""
        for name in _listdir(own):
            m = SUPERD.fullmatch(name)
            if m and started(int(m[1])) != int(m[2]):
                _remove_tree(os.path.join(own, name))
        base = base_of(own, pid, ticks)
        _mkdir(base, exist_ok=True)
        return cls(base)

    def take(self) -> str:
        """An empty cgroup for one handler (OSError if none can be made). A pooled one is
        not looked at: whoever enters it makes it again if root removed it (enter)."""
        if self.pool:
            path = self.pool.pop()
            self.low = min(self.low, len(self.pool))
            return path
        self.serial += 1
        path = os.path.join(self.base, f"h{self.serial}")
        _mkdir(path)
        return path

    def give_back(self, path: str) -> bool:
        """`path` is no longer a handler's: kept for the next, removed, or gone (True); or it
        still holds processes, or cannot be read now, and the caller goes on watching it
        (False)."""
        try:
            pids = procs(path)
        except (OSError, ValueError):
            return False
        if pids:
            return False
        if pids is not None and len(self.pool) < POOL_MAX:
            self.pool.append(path)
        elif pids is None and not os.path.isdir(self.base):
            self.pool.clear()  # root removed the whole tree: none of them is there to enter
        else:
            _rmdir(path)
        return True

    def excess(self) -> int:
        """Pooled cgroups beyond POOL: a trim is due while there are."""
        return max(0, len(self.pool) - POOL)

    def trim(self) -> None:
        """Once a survey round: remove up to TRIM of the pooled cgroups beyond POOL that no
        handler took since the last round (the oldest freed)."""
        n = min(max(0, min(self.low, len(self.pool)) - POOL), TRIM)
        for path in self.pool[:n]:
            _rmdir(path)
        del self.pool[:n]
        self.low = len(self.pool)

    def known(self) -> list[str]:
        """Every handler cgroup there is, in use or not."""
        return [os.path.join(self.base, n) for n in _listdir(self.base) if HANDLER.fullmatch(n)]

    def remove(self) -> None:
        """superd stops: remove every empty cgroup, and its own if that leaves it empty."""
        self.pool.clear()
        _remove_tree(self.base)


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _mkdir(path: str, exist_ok: bool = False) -> None:
    """Only root may create or write in superd's cgroups, whatever superd's umask."""
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        if not exist_ok:
            raise
    os.chmod(path, 0o755)


def _remove_tree(path: str) -> None:
    for name in _listdir(path):
        if HANDLER.fullmatch(name):
            _rmdir(os.path.join(path, name))
    _rmdir(path)


def _rmdir(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # still populated (EBUSY), or gone
