"""Why a handler could not be started, in words an admin can act on.

`exec /usr/sbin/foo: execve: No such file or directory`, `exec /bin/x: chdir /srv/gone: No
such file or directory`, `exec /bin/x: setuid: Operation not permitted (superd runs as uid
1000 without cap_setuid)`: the program, the step that failed and the system's reason. The
same sentence goes to the log and to `superd status`, whichever way the handler was started.

A child that cannot become the handler says so on its error pipe. CPython's C fork_exec (the
spawners' way, and superd's own for plain exec services) writes `OSError:<hex errno>:` when
execve itself failed, and `OSError:<hex errno>:noexec` when a step before it did: chdir,
setgroups, setgid or setuid, without saying which. That step is told from the errno (chdir
fails with path errors, the identity calls with EPERM, EAGAIN or EINVAL) and from what superd
may do (superd/caps.py). superd's own forked child (superd/spawn.py) knows its step and writes
`OSError:<hex errno>:<step>`, or `<step>: <Type>: <reason>` for an error that is no OSError.
A sentence (a str) comes from a spawner or python host that could not even fork.
"""

from __future__ import annotations

import errno
import os

from superd import caps
from superd.records import Service

PATH_ERRORS = {errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.ELOOP, errno.ENAMETOOLONG}
IDENTITY_ERRORS = {errno.EPERM, errno.EAGAIN, errno.EINVAL}


def subject(svc: Service) -> str:
    """What was to be started: `exec PATH` or `python MODULE:FUNCTION`."""
    return f"python {svc.python}" if svc.python else f"exec {svc.program}"


def describe(data: bytes | str | None, svc: Service) -> str | None:
    """The failure report `data` as a sentence; None when there was no failure."""
    if not data:
        return None
    what = subject(svc)
    if isinstance(data, str):
        return f"{what}: {data}"
    text = data.decode("utf-8", "replace")
    if not text.startswith("OSError:"):
        return f"{what}: {text}"
    _, code, where = (text.split(":", 2) + ["", ""])[:3]
    try:
        number = int(code, 16)
        reason = os.strerror(number)
    except ValueError:
        number, reason = 0, "unknown error"
    step = _step(where, number, svc)
    return f"{what}: {step}: {reason}{_hint(step, number, svc)}"


def _step(where: str, number: int, svc: Service) -> str:
    if where == "":
        return "execve"
    if where != "noexec":
        return where  # superd's own child named it
    if number in PATH_ERRORS:
        return f"chdir {svc.cwd}"
    if number in IDENTITY_ERRORS:
        return identity_step(number, svc)
    return "before execve"


def identity_step(number: int, svc: Service) -> str:
    """Which of setgroups, setgid and setuid (in the order they run) failed with `number`."""
    if number == errno.EAGAIN and svc.uid is not None:
        return "setuid"  # RLIMIT_NPROC of the user switched to
    if not caps.have("cap_setgid"):
        if svc.groups is not None and os.geteuid() == 0:
            return "setgroups"
        if svc.gid is not None and svc.gid not in os.getresgid():
            return "setgid"
    if not caps.have("cap_setuid") and svc.uid is not None and svc.uid not in os.getresuid():
        return "setuid"
    steps = [name for name, value in (("setgroups", svc.groups), ("setgid", svc.gid),
                                      ("setuid", svc.uid)) if value is not None]
    return "/".join(steps) or "before execve"


def _hint(step: str, number: int, svc: Service) -> str:
    """A few words more where the system's reason misleads."""
    if number == errno.EPERM and step in ("setgroups", "setgid", "setuid"):
        cap = "cap_setuid" if step == "setuid" else "cap_setgid"
        if not caps.have(cap):
            return f" (superd runs as uid {os.geteuid()} without {cap})"
    if (step == "execve" and number == errno.ENOENT and not svc.chroot and svc.program
            and os.path.exists(svc.program)):
        return " (the file is there: its #! interpreter or its loader is missing)"
    return ""
