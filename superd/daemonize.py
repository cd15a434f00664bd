"""`superd run --daemon`: detach with python-daemon, guarded by a pidfile.

python-daemon's own lock only fails inside the detached copy, after the launcher has already
exited 0. So the pidfile is checked here first: a live owner makes the launcher exit 1 with a
message; a stale one (its process is gone, e.g. after SIGKILL) is broken and taken over.
"""

from __future__ import annotations

import os
import sys


def detach(pidfile_path: str | None) -> int | None:
    """Detach; None in the daemon, or an exit code for the launcher when it must not."""
    from daemon import DaemonContext
    from daemon.pidfile import TimeoutPIDLockFile

    pidfile = None
    if pidfile_path:
        pidfile = TimeoutPIDLockFile(os.path.abspath(pidfile_path), acquire_timeout=2)
        pid = pidfile.read_pid()
        if pid:
            if not _alive(pid):
                pidfile.break_lock()
            else:
                print(f"superd: already running as pid {pid} (pidfile {pidfile_path})",
                      file=sys.stderr)
                return 1
        elif pidfile.is_locked():
            pidfile.break_lock()
    context = DaemonContext(pidfile=pidfile, working_directory="/", umask=0o022, signal_map={})
    context.open()
    return None


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
