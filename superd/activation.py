"""Socket activation that says when it stops working.

A service that systemd hands a socket to (a .socket unit with FileDescriptorName=NAME) and that
also has `listen` is served from superd's own sockets when systemd passes none: after the
.socket unit failed (its port was taken at boot), or was stopped or disabled. The service still
answers, but the socket is superd's, so a restart refuses connections again, and nothing else
would say so. So superd remembers, under systemd, which services systemd passed sockets to
(one name a line in `systemd-sockets`, in the private folder of the control socket, kept on
/run until a reboot); at the next start a remembered service that gets none is logged and
shown in `superd status` for as long as that superd runs. A service with no `listen` that gets
no socket serves nothing, and is said at every start, remembered or not.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from superd.config import Service
from superd.safefile import read_regular

FILE = "systemd-sockets"
LIMIT = 1 << 16


def memory(control_socket: str | None) -> str | None:
    """Where the names are remembered: beside the control socket, in its private folder
    (root's 0700 one, made by superd/control.py), or nowhere without a control socket."""
    if not control_socket:
        return None
    return os.path.join(os.path.dirname(control_socket), FILE)


def unserved(services: Iterable[Service], passed: Iterable[str], path: str | None
             ) -> dict[str, str]:
    """What to say of each enabled service that systemd passed no socket this time, by name."""
    passed = set(passed)
    before = set(_read(path)) if path else set()
    said: dict[str, str] = {}
    for svc in services:
        if svc.name in passed:
            continue
        if not svc.listen:
            said[svc.name] = (f"no `listen` and systemd passed no socket named {svc.name!r} "
                              f"({svc.where}): it serves nothing; is its .socket unit "
                              f"(FileDescriptorName={svc.name}) running?")
        elif svc.name in before:
            said[svc.name] = (f"systemd passed its socket at the last start and none now: "
                              f"serving its own `listen` instead, which a restart does not "
                              f"keep; is its .socket unit (FileDescriptorName={svc.name}) "
                              f"failed or stopped?")
    return said


def remember(path: str | None, passed: Iterable[str]) -> None:
    """Write this start's names for the next one (best effort: a folder that is not there,
    or a full /run, costs only the next start's warning). Written beside and renamed into
    place, so a reader never sees half a file and a link planted at the name is replaced."""
    if path is None or not os.path.isdir(os.path.dirname(path)):
        return
    tmp = f"{path}.{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{name}\n" for name in sorted(passed)))
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _read(path: str) -> list[str]:
    try:
        text = read_regular(path, LIMIT).decode(errors="replace")
    except OSError:
        return []
    return [line.strip() for line in text.splitlines() if line.strip()]
