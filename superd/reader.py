"""Work that may wait or run others' code, done off the loop: in a forked child, with a
deadline. Reading the table is such work, and so is checking that a handler imports.

Loading a table waits and runs code. It asks NSS for users and groups (LDAP, sssd), looks up
the host names of `listen` and `redirect` (up to 5 s each without an answer), reads
`env_file`s and banners, and imports python handlers, which runs their module's top level:
any code, an endless loop or os._exit() among what a half-edited file can hold. Done in the
loop, any of it would stall every service; done in superd itself, a handler's import could
end it. So each read, the table's at start and on reload as a retry of one service, runs in a
child forked for it: the child does the work and sends the result back pickled through a
pipe, the loop reads that pipe without blocking, and a child that has not answered within
READ_TIMEOUT is killed and the read fails with that reason.

Each python handler's import is checked in a child of its own, within IMPORT_TIMEOUT
(fields.python_handler): one whose module loops or ends its process fails that service
alone, not the whole reading. superd never holds a handler's function: a python service's
host process imports it itself (superd/pyhost.py).

The result travels as (kind, value): ("ok", what the work returned), ("refused", problems)
when it raised an error with `problems` (yamlsrc.TableError), ("missing", text) for a
values.Missing (something not on the machine yet: worth trying again), ("error", text) for
anything else; ("timeout", text) when it was killed at its deadline, ("died", text) when its
process ended without a result (os._exit in a module's top level).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
from collections.abc import Callable
from typing import Any

from superd import caps
from superd.forkexec import default_signals
from superd.loop import READ, Loop, Timer
from superd.values import Missing

READ_TIMEOUT = 120.0  # seconds: 20 host names without an answer, and room to spare
IMPORT_TIMEOUT = 10.0  # seconds a python handler's module may take to import
MAX_RESULT = 256 << 20  # bytes of pickled result; beyond, the child is killed
Result = tuple[str, Any]
Done = Callable[[Result], None]


def _child(work: Callable[[], Any], w: int, parent: int) -> None:
    """In the forked child: do the work, write the result, leave without running any of the
    parent's exit code."""
    try:
        signal.set_wakeup_fd(-1)  # the parent's loop must not hear this child's signals
        default_signals()
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # Killed with its parent: a reading killed at its deadline takes the import check it
        # was waiting for along (it would spin on as superd's orphan otherwise).
        caps.prctl(caps.PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)  # the parent is gone already
        # None of superd's sockets stays open here: a connection superd closes meanwhile
        # must end for its client now, not when this child does; a port a reload gives up
        # must be free.
        os.closerange(3, w)
        os.closerange(w + 1, os.sysconf("SC_OPEN_MAX"))
        try:
            result: Result = ("ok", work())
        except BaseException as e:
            problems = getattr(e, "problems", None)  # a yamlsrc.TableError
            result = (("refused", list(problems)) if isinstance(problems, (list, tuple))
                      else ("missing" if isinstance(e, Missing) else "error", _text(e)))
        try:
            data = pickle.dumps(result)
        except Exception as e:  # noqa: BLE001 - whatever it is, the parent must hear of it
            data = pickle.dumps(("error", f"the result cannot be sent: {e}"))
        view = memoryview(data)
        while view:
            view = view[os.write(w, view):]
    finally:
        os._exit(0)


def _text(e: BaseException) -> str:
    """An exception as a problem's text: a ValueError (a Missing too) is its message."""
    if isinstance(e, ValueError) and str(e):
        return str(e)
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


class Job:
    """One child at work, and what the loop does with its answer."""

    def __init__(self, loop: Loop, pid: int, fd: int, done: Done, what: str, timeout: float):
        self.loop, self.pid, self.fd, self.done, self.what = loop, pid, fd, done, what
        self.data = bytearray()
        self.timer: Timer | None = loop.call_later(timeout, self.expired)
        self.timeout = timeout
        loop.add(fd, READ, self.readable)

    def readable(self, mask: int) -> None:
        try:
            chunk = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError as e:
            self.finish(("error", f"reading {self.what}: {e.strerror}"))
            return
        if chunk:
            self.data += chunk
            if len(self.data) > MAX_RESULT:
                self.kill()
                self.finish(("error", f"reading {self.what}: more than {MAX_RESULT} bytes"))
            return
        try:
            result: Result = pickle.loads(self.data)
        except Exception:  # noqa: BLE001 - a child that died half-way sent half a result
            result = ("died", f"reading {self.what}: the reading process ended without an "
                              "answer")
        self.finish(result)

    def expired(self) -> None:
        self.timer = None
        self.kill()
        self.finish(("timeout", f"reading {self.what} took more than {self.timeout:g} s (a "
                                "host name without an answer? a handler module that does not "
                                "return from its import?); the reading process was killed"))

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)  # reaped with superd's other children
        except ProcessLookupError:
            pass

    def finish(self, result: Result) -> None:
        if self.fd < 0:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.loop.remove(self.fd)
        os.close(self.fd)
        self.fd = -1
        self.done(result)


class Reader:
    """Runs reads in children; knows their pids (they are superd's helpers, not escapees)."""

    def __init__(self, loop: Loop, timeout: float = READ_TIMEOUT):
        self.loop, self.timeout = loop, timeout
        self.jobs: dict[int, Job] = {}

    def run(self, work: Callable[[], Any], done: Done, what: str) -> None:
        """Do `work` in a child; `done` gets its Result in a later loop turn (or now, with an
        ("error", ...) result, when no child can be made)."""
        try:
            r, w = os.pipe2(os.O_CLOEXEC)
        except OSError as e:
            done(("error", f"reading {what}: {e.strerror}"))
            return
        parent = os.getpid()
        try:
            pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            done(("error", f"reading {what}: cannot fork: {e.strerror}"))
            return
        if pid == 0:
            os.close(r)
            _child(work, w, parent)
        os.close(w)
        os.set_blocking(r, False)

        def finished(result: Result) -> None:
            self.jobs.pop(pid, None)
            done(result)

        self.jobs[pid] = Job(self.loop, pid, r, finished, what, self.timeout)

    def pids(self) -> set[int]:
        return set(self.jobs)

    def stop(self) -> None:
        """superd stops: what is still being read is dropped."""
        for job in list(self.jobs.values()):
            job.kill()
            job.finish(("error", "superd is stopping"))


def read_now(work: Callable[[], Any], what: str, timeout: float = READ_TIMEOUT) -> Result:
    """The same, before there is a loop (at start): wait for the child here."""
    r, w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child(work, w, parent)
    os.close(w)
    data = bytearray()
    end = time.monotonic() + timeout
    try:
        while len(data) <= MAX_RESULT:
            left = end - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                return ("timeout", f"reading {what} took more than {timeout:g} s; the "
                                   "reading process was killed")
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        _reap(pid)
    try:
        result: Result = pickle.loads(data)
    except Exception:  # noqa: BLE001
        return ("died", f"reading {what}: the reading process ended without an answer")
    return result


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
