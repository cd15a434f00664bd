"""superd.stderr.StderrLines in-process: real socket pairs and real writer processes, a fake
loop and clock, so what waits for a START line (and for how long) can be driven exactly."""

from __future__ import annotations

import array
import os
import select
import socket
import time

import pytest

from superd import stderr
from superd.log import CUT, MAX_MESSAGE


class FakeTimer:
    def __init__(self, callback):
        self.callback, self.cancelled = callback, False

    def cancel(self):
        self.cancelled = True


class FakeLoop:
    def __init__(self):
        self.watched, self.timers = {}, []

    def add(self, obj, events, callback):
        self.watched[obj] = callback

    def remove(self, obj):
        self.watched.pop(obj, None)

    def call_later(self, delay, callback):
        self.timers.append(FakeTimer(callback))
        return self.timers[-1]

    def fire(self):
        due, self.timers = self.timers, []
        for t in due:
            if not t.cancelled:
                t.callback()


class FakeLog:
    def __init__(self):
        self.lines = []

    def info(self, message, **fields):
        self.lines.append(message)


class Clock:
    now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def lines():
    loop, log, clock = FakeLoop(), FakeLog(), Clock()
    out = stderr.StderrLines(loop, log, "svc", clock=clock)
    out.fake = (loop, log, clock)
    yield out
    if out.sock is not None:
        out.sock.close()
    try:
        os.close(out.write_fd)
    except OSError:
        pass


def write_as_child(fd: int, *chunks: bytes, pgid: int | None = None, linger: float = 0) -> int:
    """Fork a process that writes `chunks` to `fd` (one write each) and exits; its pid. It
    stays a zombie (still there to be asked) until reaped."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if pgid is not None:
                os.setpgid(0, pgid)
            for chunk in chunks:
                os.write(fd, chunk)
            os.close(w)
            time.sleep(linger)
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)  # EOF: everything is written
    os.close(r)
    return pid


def drain(out: stderr.StderrLines) -> None:
    for _ in range(100):
        if out.sock is None or not select.select([out.sock], [], [], 0)[0]:
            return
        out.ready(0)


def reap(*pids: int) -> None:
    for pid in pids:
        os.waitpid(pid, 0)


def test_a_line_waits_for_its_start_and_no_longer_than_hold(lines):
    loop, log, clock = lines.fake
    early = write_as_child(lines.write_fd, b"early\n")
    late = write_as_child(lines.write_fd, b"never started\n")
    drain(lines)
    assert log.lines == []
    lines.started_handler(early)
    assert log.lines == [f"svc[{early}]: early"]
    clock.now += stderr.HOLD
    loop.fire()
    assert log.lines[1:] == [f"svc[{late}]: never started"]
    reap(early, late)


def test_half_lines_of_two_writers_never_mix(lines):
    a = write_as_child(lines.write_fd, b"a1 ", b"a2 ")
    b = write_as_child(lines.write_fd, b"b1 ", b"b2\n")
    lines.started_handler(a)
    lines.started_handler(b)
    drain(lines)
    log = lines.fake[1]
    assert log.lines == [f"svc[{b}]: b1 b2"]
    lines.ended_handler(a)  # a's last line has no newline: out before its EXIT
    assert log.lines[-1] == f"svc[{a}]: a1 a2 "
    reap(a, b)


def test_a_childs_line_carries_its_handlers_pid(lines):
    handler = write_as_child(lines.write_fd, pgid=0, linger=5)  # a group of its own
    lines.started_handler(handler)
    child = write_as_child(lines.write_fd, b"from the child\n", pgid=handler)
    drain(lines)
    assert lines.fake[1].lines == [f"svc[{handler}]: from the child"]
    os.kill(handler, 9)
    reap(handler, child)


def test_a_long_line_is_cut_and_the_next_is_whole(lines):
    pid = write_as_child(lines.write_fd, b"x" * 30000, b"y" * 30000, b"z\nnext\n")
    lines.started_handler(pid)
    drain(lines)
    log = lines.fake[1].lines
    assert len(log) == 2 and log[1] == f"svc[{pid}]: next"
    assert log[0].startswith(f"svc[{pid}]: xxx") and len(log[0].encode()) > MAX_MESSAGE
    reap(pid)
    assert CUT  # the log (superd.log.clean) cuts it to MAX_MESSAGE and marks it


def test_what_waits_is_bounded(lines):
    pids = [write_as_child(lines.write_fd, b"l\n" * 200) for _ in range(8)]
    drain(lines)
    assert lines.held_lines <= stderr.MAX_HELD
    assert len(lines.fake[1].lines) >= 8 * 200 - stderr.MAX_HELD  # released, never dropped
    reap(*pids)


def test_fds_a_handler_sends_are_closed(lines):
    before = len(os.listdir("/proc/self/fd"))
    pid = os.fork()
    if pid == 0:
        s = socket.socket(fileno=os.dup(lines.write_fd))
        s.sendmsg([b"with fds\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", [0, 1, 2]))])
        os._exit(0)
    reap(pid)
    lines.started_handler(pid)
    drain(lines)
    assert lines.fake[1].lines == [f"svc[{pid}]: with fds"]
    assert len(os.listdir("/proc/self/fd")) == before


def test_eof_logs_what_is_left_and_closes(lines):
    loop, log, _ = lines.fake
    pid = write_as_child(lines.write_fd, b"unfinished")
    reap(pid)  # gone, and its copy of the socket with it
    os.close(lines.write_fd)
    drain(lines)
    assert log.lines == [f"svc[{pid}]: unfinished"] and lines.sock is None
    assert not loop.watched


def test_a_childs_line_after_its_handler_exited_still_carries_the_handlers_pid(lines):
    handler = write_as_child(lines.write_fd, pgid=0, linger=5)
    lines.started_handler(handler)
    child = write_as_child(lines.write_fd, pgid=handler, linger=5)  # joins, writes nothing yet
    os.kill(handler, 9)
    reap(handler)
    lines.ended_handler(handler)
    late = write_as_child(lines.write_fd, b"late\n", pgid=handler)  # the group lives on
    drain(lines)
    assert lines.fake[1].lines == [f"svc[{handler}]: late"]
    os.kill(child, 9)
    reap(child, late)
