"""Start a handler: fork, arrange its fds, credentials and limits, then exec or call python.

Everything that can be computed once per service (argv, the laundered base environment) is in
`Prepared`, built at load, so the per-connection work is a dict copy, a fork and a few syscalls.
The parent never waits for the exec: the child reports a failure through a close-on-exec pipe
that is read when the child is reaped, so a slow exec never stalls the loop.
"""

from __future__ import annotations

import fcntl
import os
import resource
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

from superd import caps, cgroups
from superd.config import Service
from superd.fields import RLIMITS
from superd.forkexec import default_signals, fork_exec, read_error
from superd.spawnproto import Request

STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
EXEC_FAILED = 127
# Set by the connection, never by `env`: a duplicate name in execve's environment is ambiguous.
CONNECTION_VARS = frozenset({
    "PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT", "REMOTE_ADDR",
    "REMOTE_PORT", "REMOTE_HOST", "UNIXREMOTEEUID", "UNIXREMOTEEGID", "UNIXREMOTEPID",
    "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
    "VSOCKREMOTECID", "VSOCKREMOTEPORT", "VSOCKLOCALCID", "VSOCKLOCALPORT"})
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
    groups: list[int] | None  # supplementary groups to set (only root may)

    def full_env(self, env: dict[str, str]) -> list[bytes]:
        """The handler's environment as execve takes it: the service's part, then the
        connection's `env`, which wins a name both have (handler_env(), superd-handler(7)). A
        name appears once: with duplicates getenv() takes the first and a shell the last."""
        base = self.env_list
        if not env.keys().isdisjoint(self.base_env):
            base = tuple(b for k, b in zip(self.base_env, base, strict=True)
                         if k not in env)
        return [*base, *(f"{k}={v}".encode() for k, v in env.items())]

    def request(self, token: int, env: dict[str, str], stderr_fd: int,
                cgroup: str = "") -> Request:
        """What a spawner needs to start this service's handler with `env` added."""
        svc = self.service
        env_list = self.full_env(env)
        stderr = svc.stderr if svc.stderr != "log" or stderr_fd >= 0 else "null"
        return Request(token, stderr, self.argv, self.program, env_list, svc.cwd, svc.gid,
                       self.groups, svc.uid, -1 if svc.umask is None else svc.umask, cgroup)


def prepare(service: Service, environ: dict[str, str]) -> Prepared:
    env = {"PATH": STANDARD_PATH, "SUPERD_SERVICE": service.name}
    for name in service.passenv:
        if name in environ:
            env[name] = environ[name]
    env.update(service.env)
    for name in CONNECTION_VARS & env.keys():
        del env[name]
    fast = bool(service.argv) and not service.wait and not service.nice and not service.rlimits \
        and not (service.chroot or service.no_new_privileges or service.capabilities
                 or service.capability_bounding_set is not None)
    groups = list(service.groups) if service.groups is not None and os.geteuid() == 0 else None
    return Prepared(service, env, fast, tuple(os.fsencode(a) for a in service.argv),
                    (os.fsencode(service.program),) if service.program else (),
                    tuple(f"{k}={v}".encode() for k, v in env.items()), groups)


@dataclass
class Started:
    pid: int
    exec_pipe: int  # read end of the exec-status pipe while the outcome is unknown, else -1
    failure: bytes | None = None  # the child's report of why it could not start, when known
    # (superd/execfail.py puts it in words)


def spawn(prep: Prepared, sock: socket.socket, env: dict[str, str], wait: bool,
          err_w: int, cgroup: str = "") -> Started:
    """Fork a handler for `sock` (a connection, or the listener itself when `wait`).

    `err_w` is the write end of the service's stderr pipe (used with `stderr: log`). With a
    `cgroup`, the child moves itself there before anything else, so the fork is Python's
    (vfork's child cannot run a line of Python).
    """
    status_r, status_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    if prep.fast and not cgroup:
        try:
            pid = _fork_exec(prep, sock.fileno(), env, status_r, status_w, err_w)
        except BaseException:
            os.close(status_r)
            raise
        finally:
            os.close(status_w)
        return _settle(pid, status_r)
    env = {**prep.base_env, **env}
    # No Python signal handler may run in the child before it has reset them all.
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(status_r)
        os.close(status_w)
        raise
    if pid == 0:
        os.set_blocking(status_w, True)
        _child(prep, sock, env, wait, status_w, err_w, cgroup)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    os.close(status_w)
    return _settle(pid, status_r)


def open_devnull() -> None:
    """/dev/null for handlers' `stderr: null`: opened once at start, not on a connection's
    way (where it could meet EMFILE)."""
    global _devnull
    if _devnull < 0:
        _devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)


def _settle(pid: int, status_r: int) -> Started:
    """Learn the exec outcome now if it is in: after a vfork it always is, so the common
    case needs no poll of the status pipe at all."""
    try:
        data = os.read(status_r, 4096)
    except BlockingIOError:
        return Started(pid, status_r)  # a real fork: the loop watches the pipe
    if data:
        data += read_error(status_r)  # a failure being written: the child is on its way out
    os.close(status_r)
    return Started(pid, -1, data or None)


def _fork_exec(prep: Prepared, fd: int, env: dict[str, str], status_r: int, status_w: int,
               err_w: int) -> int:
    svc = prep.service
    stderr = _stderr_fd(svc.stderr, fd, err_w)
    env_list = prep.full_env(env)
    return fork_exec(prep.argv, prep.program, env=env_list, stdin=fd, stdout=fd, stderr=stderr,
                     errpipe=(status_r, status_w), new_session=True, cwd=svc.cwd, gid=svc.gid,
                     groups=prep.groups, uid=svc.uid,
                     umask=-1 if svc.umask is None else svc.umask)


def _stderr_fd(mode: str, conn: int, err_w: int) -> int:
    """fd 2 of a handler: the service's stderr pipe, the connection, or /dev/null (also when
    the pipe could not be made: never superd's own stderr)."""
    fd = {"log": err_w, "socket": conn, "null": _devnull}[mode]
    return fd if fd >= 0 else _devnull


def exec_outcome(pipe: int) -> bytes | None:
    """The child's report of why it could not start, or None if it did (the pipe closed on
    exec)."""
    try:
        data = read_error(pipe)  # readable: it closed, or the child is reporting a failure
    except OSError:
        data = b""
    os.close(pipe)
    return data or None


def _child(prep: Prepared, sock: socket.socket, env: dict[str, str], wait: bool,
           status_w: int, err_w: int, cgroup: str) -> None:
    """In the forked child: become the handler or exit 127 saying why not: the step that
    failed and the error (`OSError:<hex errno>:<step>`, as superd/execfail.py reads it)."""
    svc = prep.service
    step = [f"cgroup {cgroup}"]  # what is being done (a list: the steps below say as they go)
    try:
        if cgroup:
            cgroups.enter(cgroup)  # first: whatever it starts from now on stays in there
        step[0] = "setsid"
        os.setsid()  # its own session and process group, no controlling terminal
        signal.set_wakeup_fd(-1)
        default_signals()
        step[0] = "fds"
        fd = sock.fileno()
        stderr = _stderr_fd(svc.stderr, fd, err_w)
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
        _set_limits_and_identity(svc, step)
        if svc.function is not None:
            os.close(status_w)
            _run_python(svc, env, wait)
        step[0] = "execve"
        os.execve(svc.program, svc.argv, env)
    except BaseException as e:  # report anything, then leave without running parent code
        try:
            report = (f"OSError:{e.errno:x}:{step[0]}" if isinstance(e, OSError) and e.errno
                      else f"{step[0]}: {type(e).__name__}: {e}")
            os.write(status_w, report.encode())
        finally:
            os._exit(EXEC_FAILED)


def _set_limits_and_identity(svc: Service, step: list[str]) -> None:
    """In the child: limits, root, capabilities and identity, in the order they need (chroot
    and the bounding set need root's capabilities; ambient ones are raised after setuid).
    `step[0]` names each step before it is taken, for the report of one that fails."""
    for name, soft, hard in svc.rlimits:
        step[0] = f"rlimit {name}"
        resource.setrlimit(RLIMITS[name], (soft, hard))
    if svc.nice:
        step[0] = "nice"
        os.setpriority(os.PRIO_PROCESS, 0, svc.nice)
    if svc.umask is not None:
        os.umask(svc.umask)
    if svc.chroot:
        step[0] = f"chroot {svc.chroot}"
        os.chroot(svc.chroot)
    step[0] = f"chdir {svc.cwd}"
    os.chdir(svc.cwd)
    if svc.capability_bounding_set is not None:
        step[0] = "capability_bounding_set"
        caps.drop_bounding(svc.capability_bounding_set)
    if svc.capabilities and svc.uid is not None:
        step[0] = "capabilities (keep over setuid)"
        caps.keep_over_setuid()
    if os.geteuid() == 0:
        step[0] = "setgroups"
        if svc.groups is not None:
            os.setgroups(list(svc.groups))
        elif svc.gid is not None:
            os.setgroups([svc.gid])
    if svc.gid is not None:
        step[0] = "setgid"
        os.setgid(svc.gid)
    if svc.uid is not None:
        step[0] = "setuid"
        os.setuid(svc.uid)
    if svc.capabilities:
        step[0] = "capabilities"
        caps.raise_ambient(svc.capabilities)
    if svc.no_new_privileges:
        step[0] = "no_new_privileges"
        caps.no_new_privileges()


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
