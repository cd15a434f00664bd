"""The one call into CPython's C fork-and-exec, with named arguments.

`_posixsubprocess.fork_exec` is what `subprocess` uses: it forks (vfork where it can), sets up
fds, credentials and the umask in C, and execs, never running Python code in the child. Its
arguments are positional and their number changes between Python versions, so superd spells
them here only. Stdlib only: the spawner processes (superd/spawner.py) import this file too.
"""

from __future__ import annotations

import _posixsubprocess
import os
import signal
import sys
from collections.abc import Sequence

# Stopping on these is the default, but a caught one would make a background tty write retry
# for ever (the kernel re-sends the signal on each try): they are reset, not caught.
_JOB_CONTROL = {signal.SIGTTIN, signal.SIGTTOU, signal.SIGTSTP}
_PYTHON_IGNORES = {signal.SIGPIPE, signal.SIGXFSZ}  # fork_exec resets these in the child


def fork_exec(argv: Sequence[bytes], program: Sequence[bytes], *, env: Sequence[bytes] | None,
              stdin: int, stdout: int, stderr: int, errpipe: tuple[int, int],
              keep: tuple[int, ...] = (), cwd: str = "/", new_session: bool = False,
              gid: int | None = None, groups: list[int] | None = None, uid: int | None = None,
              umask: int = -1) -> int:
    """Start `program` with `argv`; return its pid.

    fds 0, 1 and 2 become `stdin`, `stdout` and `stderr`; every other fd is closed except
    `keep` (and the write end of `errpipe`, which is close-on-exec: it closes by itself when
    the exec succeeds, and otherwise carries `OSError:<hex errno>:<where>` to its read end).
    The child leads a process group of its own, so that a signal to the group reaches what
    it starts; with `new_session` it also leads a new session with no controlling terminal
    (setsid). Signals that Python ignores (SIGPIPE, SIGXFSZ) are reset to their default.
    """
    pass_fds = tuple(sorted({*keep, errpipe[1]}))
    pgid = -1 if new_session else 0
    if sys.version_info >= (3, 14):  # allow_vfork is gone: vfork is used where it is safe
        return _posixsubprocess.fork_exec(
            list(argv), list(program), True, pass_fds, cwd, env, stdin, -1, -1, stdout, -1,
            stderr, errpipe[0], errpipe[1], True, new_session, pgid, gid, groups, uid, umask,
            None)
    return _posixsubprocess.fork_exec(
        list(argv), list(program), True, pass_fds, cwd, env, stdin, -1, -1, stdout, -1,
        stderr, errpipe[0], errpipe[1], True, new_session, pgid, gid, groups, uid, umask,
        None, True)  # type: ignore[arg-type]  # None: no preexec_fn (the stub wants one)


def read_error(pipe: int) -> bytes:
    """All the child wrote to its error pipe (read until it closes: on exec, or at its exit).

    With `user:` or `group:` set, fork_exec really forks instead of using vfork, so the child
    may still be writing its report, in pieces, when we first look. Call this only when the
    pipe is known to hold something or to be closed, or when waiting for the child is fine.
    """
    os.set_blocking(pipe, True)
    chunks = []
    while chunk := os.read(pipe, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _caught(signum: int, frame: object) -> None:
    """A signal that was ignored when we started: now caught, so an exec resets it."""


def clean_signal_inheritance(keep_mask: bool = False) -> None:
    """Make sure what this process starts gets every signal at its default and none blocked.

    exec resets caught signals to their default but keeps ignored ones ignored, and keeps the
    signal mask. So a signal our own parent ignored (nohup's SIGHUP, a shell's SIGQUIT) would
    reach every handler ignored. Call this once at start: it empties the mask and turns each
    ignored signal into a caught one (or, for job control, the default). `keep_mask`: leave
    the mask alone (superd upgrade empties it once its loop catches signals).
    """
    if not keep_mask:
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in signal.valid_signals():
        if sig in _PYTHON_IGNORES or sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL if sig in _JOB_CONTROL else _caught)
        except (OSError, ValueError):
            pass


def default_signals() -> None:
    """In a forked child that will run Python code or exec: every signal at its default."""
    for sig in signal.valid_signals():
        if sig not in (signal.SIGKILL, signal.SIGSTOP):
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


def exec_error(data: bytes) -> str | None:
    """What the child wrote to the error pipe, as a sentence; None when it wrote nothing.

    CPython's child writes `OSError:<hex errno>:<where>` ("noexec" when exec itself failed);
    superd's own forked children write `Type: reason`.
    """
    if not data:
        return None
    if data.startswith(b"OSError:"):
        _, code, where = (data.decode("ascii", "replace").split(":", 2) + ["", ""])[:3]
        try:
            reason = os.strerror(int(code, 16))
        except ValueError:
            reason = "unknown error"
        where = where.replace("noexec", "").strip(":")
        return f"OSError: {reason}" + (f" (in {where})" if where else "")
    return data.decode("utf-8", "replace")
