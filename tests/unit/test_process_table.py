"""superd/processes.py: the process table, one record per handler, and what its owner hears.

A fake Owner (the service) records what the table tells it: the START line comes from
`handler_running`, the EXIT line from `handler_exited`, the FAIL exec line from
`handler_not_started`. Where the table sends signals, the handler is a real child (`sleep`,
in its own process group, as superd starts handlers), and the test sees how it died.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess

import pytest

from superd.processes import EXITED, RUNNING, SENT, Handler, ProcessTable


class Owner:
    def __init__(self, name: str = "svc"):
        self.name = name
        self.heard: list[tuple] = []

    def handler_running(self, handler: Handler) -> None:
        self.heard.append(("running", handler.pid))

    def handler_exited(self, handler: Handler, status: int) -> None:
        self.heard.append(("exited", handler.pid, status))

    def handler_not_started(self, handler: Handler, failure) -> None:
        self.heard.append(("not started", failure))


class Tree:
    """The /proc view the table is given: only the children a test names (the real one would
    show the test run's own children, its rsyslogd among them, to a stop())."""

    def __init__(self) -> None:
        self.kids: list[int] = []

    def children(self, pid: int | str = "self") -> list[int]:
        return list(self.kids) if pid == "self" else []

    def descendants(self, pid: int | str = "self") -> list[int]:
        return self.children(pid)

    def session_of(self, pid: int) -> int | None:
        return None


class Table:
    """A ProcessTable and the listeners it released."""

    def __init__(self, max_children: int = 10):
        self.released: list[object] = []
        self.timers: list[tuple[float, object]] = []
        self.tree = Tree()
        self.t = ProcessTable(max_children, self.released.append, self._later, set,
                              tree=self.tree)

    def _later(self, delay: float, callback):
        class T:
            def cancel(self) -> None:
                pass
        self.timers.append((delay, callback))
        return T()


@pytest.fixture
def children():
    """Start real `sleep` children, each leading its own process group; reap them all."""
    made: list[subprocess.Popen] = []

    def start() -> subprocess.Popen:
        made.append(subprocess.Popen(["sleep", "30"], process_group=0))
        return made[-1]

    yield start
    for p in made:
        if p.poll() is None:
            p.kill()
        p.wait(5)


def died_of(p: subprocess.Popen) -> int:
    """The signal that ended `p` (waits at most 5 s)."""
    return -p.wait(5)


def test_sent_then_running_then_exited(fake_time):
    tab, owner = Table(), Owner()
    h = Handler(owner, "192.0.2.1")
    tab.t.sent(h, token=7)
    assert h.state == SENT and len(tab.t) == 1 and tab.t.count(owner) == 1
    assert owner.heard == [], "no START line before there is a pid"
    tab.t.answered(7, 4242, None)
    assert h.state == RUNNING and h.pid == 4242 and owner.heard == [("running", 4242)]
    assert len(tab.t) == 1 and tab.t.count(owner) == 1
    tab.t.exited(4242, 256)
    assert h.state == EXITED
    assert owner.heard == [("running", 4242), ("exited", 4242, 256)]
    assert len(tab.t) == 0 and tab.t.count(owner) == 0
    assert owner not in tab.t.per_owner, "a gone service's count does not linger"


def test_not_started_is_told_once_with_why():
    tab, owner = Table(), Owner()
    h = Handler(owner, "192.0.2.1")
    tab.t.sent(h, token=1)
    tab.t.answered(1, 0, b"OSError:12:noexec")
    assert h.state == EXITED and owner.heard == [("not started", b"OSError:12:noexec")]
    assert len(tab.t) == 0 and tab.t.count(owner) == 0
    tab.t.answered(1, 0, b"again")  # a repeated answer is no news
    tab.t.exited(0, 0)
    assert owner.heard == [("not started", b"OSError:12:noexec")]


def test_an_exec_failure_after_fork_still_runs_then_exits_with_its_reason():
    tab, owner = Table(), Owner()
    h = Handler(owner, "")
    tab.t.sent(h, token=2)
    tab.t.answered(2, 555, b"OSError:2:exec")
    assert h.state == RUNNING and h.failure == b"OSError:2:exec"
    tab.t.exited(555, 127 << 8)
    assert owner.heard[-1] == ("exited", 555, 127 << 8)


def test_unknown_tokens_and_pids_change_nothing():
    """A spawner's own pid, or an orphan adopted as subreaper, is reaped but is no handler."""
    tab, owner = Table(), Owner()
    h = Handler(owner, "")
    tab.t.sent(h, token=3)
    tab.t.answered(99, 123, None)
    tab.t.exited(123, 0)
    assert h.state == SENT and owner.heard == [] and len(tab.t) == 1


def test_started_in_the_loop_runs_at_once():
    tab, owner = Table(), Owner()
    h = Handler(owner, "uid:0")
    tab.t.started(h, 777)
    assert h.state == RUNNING and owner.heard == [("running", 777)] and tab.t.count(owner) == 1
    assert [x.pid for x in tab.t.running()] == [777]


def test_a_wait_handler_holds_its_listener_until_it_exits():
    tab, owner = Table(), Owner()
    listener = object()
    h = Handler(owner, "", listener=listener)
    tab.t.started(h, 800)
    assert tab.t.holder(listener) is h
    assert tab.t.holder(object()) is None
    tab.t.exited(800, 0)
    assert tab.t.holder(listener) is None
    assert tab.released == [listener], "told once: the service may poll the listener again"
    assert owner.heard[-1] == ("exited", 800, 0)


def test_counts_are_per_owner_and_full_counts_them_all():
    tab = Table(max_children=3)
    a, b = Owner("a"), Owner("b")
    tab.t.sent(Handler(a, ""), token=1)
    tab.t.started(Handler(b, ""), 900)
    assert (tab.t.count(a), tab.t.count(b), tab.t.full()) == (1, 1, False)
    tab.t.sent(Handler(a, ""), token=2)
    assert tab.t.full(), "max_children counts handlers on their way as well as running ones"
    assert (tab.t.count(a), tab.t.count(b)) == (2, 1)
    tab.t.exited(900, 0)
    assert not tab.t.full() and tab.t.count(b) == 0 and tab.t.count(a) == 2
    tab.t.answered(1, 0, "could not fork")
    assert tab.t.count(a) == 1 and len(tab.t) == 1


def test_a_handlers_timers_are_cancelled_when_it_is_gone(fake_time):
    tab, owner = Table(), Owner()
    ran, failed = Handler(owner, ""), Handler(owner, "")
    tab.t.started(ran, 1000)
    tab.t.sent(failed, token=5)
    for h in (ran, failed):
        h.timers.append(fake_time.call_later(10, lambda: None))
    tab.t.exited(1000, 0)
    tab.t.answered(5, 0, None)
    assert fake_time.pending() == [], "a timeout must not fire for a handler that is gone"


# -- signals (real children) -----------------------------------------------------------------


def test_stop_terminates_running_handlers_and_each_that_starts_after(children):
    tab, owner = Table(), Owner()
    first, late, sent = children(), children(), children()
    tab.t.started(Handler(owner, ""), first.pid)
    h_sent = Handler(owner, "")
    tab.t.sent(h_sent, token=11)
    tab.t.stop()
    assert died_of(first) == signal.SIGTERM
    tab.t.started(Handler(owner, ""), late.pid)
    assert died_of(late) == signal.SIGTERM, "a handler forked after stop is stopped too"
    tab.t.answered(11, sent.pid, None)
    assert died_of(sent) == signal.SIGTERM, "so is one a spawner answers for after stop"


def test_kill_all_kills(children):
    tab, owner = Table(), Owner()
    p = children()
    tab.t.started(Handler(owner, ""), p.pid)
    tab.t.kill_all()
    assert died_of(p) == signal.SIGKILL


def test_the_signal_reaches_the_handlers_process_group():
    """What a handler started (a shell's children, say) is stopped with it."""
    tab, owner = Table(), Owner()
    p = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; wait"], stdout=subprocess.PIPE,
                         process_group=0)
    try:
        grandchild = int(p.stdout.readline())
        gone = os.pidfd_open(grandchild)  # readable once it has exited
        try:
            h = Handler(owner, "")
            tab.t.started(h, p.pid)
            tab.t.signal(h, signal.SIGKILL)
            assert died_of(p) == signal.SIGKILL
            readable, _, _ = select.select([gone], [], [], 5)
            assert readable, f"the handler's child {grandchild} survived its group's SIGKILL"
        finally:
            os.close(gone)
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(5)
        p.stdout.close()


def test_a_handler_the_table_let_go_is_never_signalled(children):
    """Once reaped its pid may be someone else's: the table must not signal it."""
    tab, owner = Table(), Owner()
    p = children()
    h = Handler(owner, "")
    tab.t.started(h, p.pid)
    tab.t.exited(p.pid, 0)  # (as if reaped; the real process lives on, like a reused pid)
    tab.t.signal(h, signal.SIGKILL)
    tab.t.stop()
    tab.t.kill_all()
    p.terminate()  # SIGTERM from us: it dies of SIGKILL instead if the table sent that first
    assert died_of(p) == signal.SIGTERM, "the table signalled a pid it no longer owns"


def test_a_handler_not_yet_running_is_not_signalled():
    """Its pid is 0 until the spawner answers: killpg(0) would signal superd's own group.
    (SIGWINCH, which everyone ignores by default, so a failure here harms no process.)"""
    tab, owner = Table(), Owner()
    h = Handler(owner, "")
    tab.t.sent(h, token=1)
    got: list[int] = []
    old = signal.signal(signal.SIGWINCH, lambda signum, frame: got.append(signum))
    try:
        tab.t.signal(h, signal.SIGWINCH)
        tab.t.stop()
        os.kill(os.getpid(), signal.SIGWINCH)  # a signal that does arrive, to compare with
    finally:
        signal.signal(signal.SIGWINCH, old)
    assert got == [signal.SIGWINCH], "the table signalled this process's own group"


# -- a spawner died --------------------------------------------------------------------------


def test_adopt_finds_handlers_by_their_connection_and_settles_the_rest():
    """A spawner died between forking a handler and saying so: the handler (now superd's
    child) is recognised by the socket on its stdin; a request with no such child is
    not started."""
    tab, owner = Table(), Owner()
    a, b = socket.socketpair()
    orphan = subprocess.Popen(["sleep", "30"], stdin=a, process_group=0)
    try:
        found, lost = Handler(owner, "", inode=os.fstat(a.fileno()).st_ino), Handler(owner, "")
        lost.inode = found.inode + 1_000_000
        tab.t.sent(found, token=21)
        tab.t.sent(lost, token=22)
        tab.tree.kids = [orphan.pid]
        assert tab.t.adopt([21, 22], spawner_pids=set()) == [found]
        assert found.state == RUNNING and found.pid == orphan.pid
        assert lost.state == EXITED
        assert ("not started", "its spawner process died before starting it") in owner.heard
        assert ("running", orphan.pid) in owner.heard
    finally:
        orphan.kill()
        orphan.wait(5)
        a.close()
        b.close()
