"""`superd run --daemon`: detach with python-daemon, guarded by a pidfile.

python-daemon's own lock only fails inside the detached copy, after the launcher has already
exited 0. So the pidfile is checked here first: a live owner makes the launcher exit 1 with a
message; a stale one (its process is gone, e.g. after SIGKILL) is broken and taken over.
Only a pidfile is ever taken over: a regular file holding one process id and nothing else.
Anything else at the path (a file of other text, an empty file, a directory, a symlink, a
FIFO) is refused with a message and left as it is.
"""

from __future__ import annotations

import os
import stat
import sys

MAX_PIDFILE = 64  # "4194304\n" is 8 bytes; a file longer than this is not a pidfile
PID_LIMIT = 2**22  # the kernel's highest pid_max


class NotAPidfile(Exception):
    """What is at the pidfile's path is not a pidfile superd may read or replace."""


def detach(pidfile_path: str | None) -> int | None:
    """Detach; None in the daemon, or an exit code for the launcher when it must not."""
    from daemon import DaemonContext
    from daemon.pidfile import TimeoutPIDLockFile

    pidfile = None
    if pidfile_path:
        path = os.path.abspath(pidfile_path)
        try:
            pid = read_pidfile(path)
        except NotAPidfile as e:
            print(f"superd: --pidfile {pidfile_path}: {e}; nothing was changed",
                  file=sys.stderr)
            return 1
        pidfile = TimeoutPIDLockFile(path, acquire_timeout=2)
        if pid is not None:
            if _alive(pid):
                print(f"superd: already running as pid {pid} (pidfile {pidfile_path})",
                      file=sys.stderr)
                return 1
            pidfile.break_lock()  # a pidfile whose process is gone
    context = DaemonContext(pidfile=pidfile, working_directory="/", umask=0o022, signal_map={})
    context.open()
    return None


def read_pidfile(path: str) -> int | None:
    """The pid in the pidfile at `path`, None when there is none; NotAPidfile otherwise."""
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise NotAPidfile(f"no such directory {folder}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise NotAPidfile(f"cannot look at it: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotAPidfile(f"{path} is {_kind(st.st_mode)}, not a pidfile")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_PIDFILE + 1)
    except OSError as e:
        raise NotAPidfile(f"cannot read {path}: {e.strerror}") from None
    text = data.decode("ascii", "replace").strip()
    if len(data) > MAX_PIDFILE or not text.isdigit() or not 0 < int(text) <= PID_LIMIT:
        what = "is empty" if not data else "holds something other than a process id"
        raise NotAPidfile(f"{path} {what}: not a pidfile")
    return int(text)


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symlink"),
             (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"))
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def _alive(pid: int) -> bool:
    """Is `pid` a running process? A zombie (dead, not yet reaped) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


def remove_pidfile(path: str) -> None:
    """At exit after `superd upgrade` (python-daemon's own removal did not survive the exec):
    remove the pidfile if it still names this process."""
    try:
        with open(path) as f:
            ours = f.read().strip() == str(os.getpid())
        if ours:
            os.unlink(path)
    except OSError:
        pass
