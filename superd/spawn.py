"""Start a handler: fork, arrange its fds, credentials and limits, then exec or call python.

Everything that can be computed once per service (argv, the laundered base environment) is in
`Prepared`, built at load, so the per-connection work is a dict copy, a fork and a few syscalls.
The parent never waits for the exec: the child reports a failure through a close-on-exec pipe
that is read when the child is reaped, so a slow exec never stalls the loop.
"""

from __future__ import annotations

import _posixsubprocess
import fcntl
import os
import resource
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

from superd.config import Service
from superd.fields import RLIMITS

STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
RESET_SIGNALS = HANDLED_SIGNALS + (signal.SIGPIPE, signal.SIGXFSZ)  # Python ignores those two
EXEC_FAILED = 127
# Set by the connection, never by `env`: a duplicate name in execve's environment is ambiguous.
CONNECTION_VARS = frozenset({
    "PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT", "REMOTE_ADDR",
    "REMOTE_PORT", "REMOTE_HOST", "UNIXREMOTEEUID", "UNIXREMOTEEGID", "UNIXREMOTEPID",
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"})
_devnull = -1


@dataclass(frozen=True)
class Prepared:
    """Per-service spawning data computed once at load.

    `fast` services (exec, nowait, no nice, no rlimits) are started by CPython's C fork_exec,
    which uses vfork where it can and never runs Python code in the child: no copy of the
    interpreter's pages is touched. The rest fork in Python (`_child`).
    """

    service: Service
    base_env: dict[str, str]
    fast: bool
    argv: tuple[bytes, ...]
    program: tuple[bytes, ...]
    env_list: tuple[bytes, ...]


def prepare(service: Service, environ: dict[str, str]) -> Prepared:
    env = {"PATH": STANDARD_PATH, "SUPERD_SERVICE": service.name}
    for name in service.passenv:
        if name in environ:
            env[name] = environ[name]
    env.update(service.env)
    for name in CONNECTION_VARS & env.keys():
        del env[name]
    fast = bool(service.argv) and not service.wait and not service.nice and not service.rlimits
    return Prepared(service, env, fast, tuple(os.fsencode(a) for a in service.argv),
                    (os.fsencode(service.program),) if service.program else (),
                    tuple(f"{k}={v}".encode() for k, v in env.items()))


@dataclass
class Started:
    pid: int
    status: int  # read end of the exec-status pipe while the outcome is unknown, else -1
    failure: str | None = None  # why it could not start, when already known


def spawn(prep: Prepared, sock: socket.socket, env: dict[str, str], wait: bool,
          err_w: int) -> Started:
    """Fork a handler for `sock` (a connection, or the listener itself when `wait`).

    `err_w` is the write end of the service's stderr pipe (used with `stderr: log`).
    """
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    if prep.fast:
        try:
            pid = _fork_exec(prep, sock.fileno(), env, status_r, status_w, err_w)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        return _settle(pid, status_r)
    env = {**prep.base_env, **env}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(status_r)
        os.close(status_w)
        raise
    if pid == 0:
        os.set_blocking(status_w, True)
        _child(prep, sock, env, wait, status_w, err_w)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    try:
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    except OSError:
        pass
    os.close(status_w)
    return _settle(pid, status_r)


def _settle(pid: int, status_r: int) -> Started:
    """Learn the exec outcome now if it is in: after a vfork it always is, so the common
    case needs no poll of the status pipe at all."""
    try:
        data = os.read(status_r, 4096)
    except BlockingIOError:
        return Started(pid, status_r)  # a real fork: the loop watches the pipe
    os.close(status_r)
    return Started(pid, -1, _failure(data))


def remote_request(prep: Prepared, env: dict[str, str]) -> tuple[str, tuple]:
    """The same fork_exec arguments as `_fork_exec`, as a spawner request (superd.spawner)."""
    svc = prep.service
    env_list = [*prep.env_list, *(f"{k}={v}".encode() for k, v in env.items())]
    groups = list(svc.groups) if svc.groups is not None and os.geteuid() == 0 else None
    return svc.stderr, (prep.argv, prep.program, env_list, svc.cwd, svc.gid, groups, svc.uid,
                        -1 if svc.umask is None else svc.umask)


def _fork_exec(prep: Prepared, fd: int, env: dict[str, str], status_r: int, status_w: int,
               err_w: int) -> int:
    svc = prep.service
    stderr = {"log": err_w, "socket": fd, "null": _devnull}[svc.stderr]
    env_list = [*prep.env_list, *(f"{k}={v}".encode() for k, v in env.items())]
    groups = list(svc.groups) if svc.groups is not None and os.geteuid() == 0 else None
    return _posixsubprocess.fork_exec(
        prep.argv, prep.program, True, (status_w,), svc.cwd, env_list,
        fd, -1, -1, fd, -1, stderr, status_r, status_w,
        True, False, 0,  # restore_signals, no setsid, setpgid(0, 0): its own process group
        svc.gid, groups, svc.uid, -1 if svc.umask is None else svc.umask, None, True)


def exec_failure(status_fd: int) -> str | None:
    """Why the child could not start, or None if it did (the pipe closed on exec)."""
    try:
        data = os.read(status_fd, 4096)
    except OSError:
        data = b""
    os.close(status_fd)
    return _failure(data)


def failure_text(data: bytes | str | None) -> str | None:
    """A spawner's failure report (raw status bytes or a sentence) as a log sentence."""
    return _failure(data) if isinstance(data, bytes) else data


def _failure(data: bytes) -> str | None:
    """Our own child writes `Type: reason`; CPython's fork_exec writes `OSError:<hex errno>:...`."""
    if data.startswith(b"OSError:"):
        _, code, where = (data.decode("ascii", "replace").split(":", 2) + ["", ""])[:3]
        try:
            reason = os.strerror(int(code, 16))
        except ValueError:
            reason = "unknown error"
        where = where.replace("noexec", "").strip(":")
        return f"OSError: {reason}" + (f" (in {where})" if where else "")
    return data.decode("utf-8", "replace") or None


def _child(prep: Prepared, sock: socket.socket, env: dict[str, str], wait: bool,
           status_w: int, err_w: int) -> None:
    """In the forked child: become the handler or exit 127 saying why not."""
    svc = prep.service
    try:
        os.setpgid(0, 0)
        signal.set_wakeup_fd(-1)
        for sig in RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        fd = sock.fileno()
        stderr = {"log": err_w, "socket": fd, "null": _devnull}[svc.stderr]
        wanted = [fd, fd, stderr] + ([fd] if wait else [])
        # Move the sources out of the way first, so that dup2 onto 0..3 cannot clobber one.
        high = [fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, 16) for src in wanted + [status_w]]
        for target, src in enumerate(high[:-1]):
            os.dup2(src, target, inheritable=True)
        status_w = len(wanted)  # close-on-exec: it closes by itself when exec succeeds
        os.dup2(high[-1], status_w, inheritable=False)
        os.closerange(status_w + 1, max(os.sysconf("SC_OPEN_MAX"), max(high)) + 1)
        if wait:
            env["LISTEN_FDS"] = "1"
            env["LISTEN_PID"] = str(os.getpid())
            env["LISTEN_FDNAMES"] = svc.name
        _set_limits_and_identity(svc)
        if svc.function is not None:
            os.close(status_w)
            _run_python(svc, env, wait)
        os.execve(svc.program, svc.argv, env)
    except BaseException as e:  # report anything, then leave without running parent code
        try:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            os.write(status_w, f"{type(e).__name__}: {reason}".encode())
        finally:
            os._exit(EXEC_FAILED)


def _set_limits_and_identity(svc: Service) -> None:
    for name, value in svc.rlimits:
        resource.setrlimit(RLIMITS[name], (value, value))
    if svc.nice:
        os.setpriority(os.PRIO_PROCESS, 0, svc.nice)
    if svc.umask is not None:
        os.umask(svc.umask)
    os.chdir(svc.cwd)
    if svc.gid is not None:
        if os.geteuid() == 0:
            os.setgroups(list(svc.groups or (svc.gid,)))
        os.setgid(svc.gid)
    if svc.uid is not None:
        os.setuid(svc.uid)


def _run_python(svc: Service, env: dict[str, str], wait: bool) -> None:
    """Call the python handler in this forked child and exit with its status."""
    os.environ.clear()
    os.environ.update(env)
    status = 1
    try:
        sock = socket.socket(fileno=3 if wait else 0)
        result = svc.function(sock, env)  # type: ignore[misc]
        status = result if isinstance(result, int) and not isinstance(result, bool) else 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(status & 0xFF)
