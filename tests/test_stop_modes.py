"""settings.stop: what stopping superd does with running handlers (terminate, drain, leave).

Each mode with the real daemon and a handler that is in the middle of a session when SIGTERM
comes: it is killed (terminate), finishes and is waited for (drain, bounded by drain_timeout),
or survives superd (leave).
"""

from __future__ import annotations

import os
import signal
import socket
import time

import superd_testlib as lib
from superd_testlib import (
    connect,
    connection_refused,
    free_port,
    pid_alive,
    recv_exact,
    recv_until_eof,
    wait_until,
)

# reads a line, answers it after the client's second line: a session that is "in flight"
TWO_STEP = 'read x; echo "got $x"; read y; echo "and $y"'


def _start(superd, mode: str, **settings) -> tuple[lib.Superd, int]:
    port = free_port()
    d = superd({"two": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/sh", "-c", TWO_STEP]}},
               settings={"stop": mode, **settings})
    return d, port


def _session(d: lib.Superd, port: int) -> tuple[socket.socket, int]:
    s = connect("127.0.0.1", port)
    s.sendall(b"one\n")
    assert recv_exact(s, 8) == b"got one\n"
    return s, int(d.wait_start("two")[-1]["pid"])


def test_stop_terminate_kills_a_running_handler(superd):
    d, port = _start(superd, "terminate")
    s, pid = _session(d, port)
    with s:
        d.proc.send_signal(signal.SIGTERM)
        assert recv_until_eof(s, 5) == b"", "the handler was killed: no answer"
        assert d.proc.wait(10) == 0
    assert not pid_alive(pid)
    assert connection_refused("127.0.0.1", port)


def test_stop_drain_waits_for_a_running_handler_to_finish(superd):
    d, port = _start(superd, "drain")
    s, pid = _session(d, port)
    with s:
        d.proc.send_signal(signal.SIGTERM)
        d.wait_log(r"^stopping: 1 handlers running; drain them$")
        # no new connection is taken meanwhile; the one in flight goes on
        wait_until(lambda: connection_refused("127.0.0.1", port), 5, "the listener closed")
        assert d.proc.poll() is None, "superd waits for the handler"
        time.sleep(0.3)  # (a pause in the session: superd must still wait)
        s.sendall(b"two\n")
        assert recv_until_eof(s, 5) == b"and two\n"
        assert d.proc.wait(10) == 0, "superd exits once the handler is gone"
    d.wait_exit("two", pid)
    assert not pid_alive(pid)


def test_stop_drain_terminates_what_outlasts_drain_timeout(superd):
    d, port = _start(superd, "drain", drain_timeout=1)
    s, pid = _session(d, port)
    with s:
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert recv_until_eof(s, 10) == b""
        took = time.monotonic() - t0
        assert d.proc.wait(10) == 0
    assert 0.9 < took < 5, f"ended after {took:.1f}s with drain_timeout 1 s"
    d.wait_log(r"^stopping: drain_timeout reached")
    assert not pid_alive(pid)


def test_stop_leave_leaves_a_running_handler_running(superd):
    d, port = _start(superd, "leave")
    s, pid = _session(d, port)
    try:
        with s:
            d.proc.send_signal(signal.SIGTERM)
            assert d.proc.wait(10) == 0, "superd exits at once"
            assert connection_refused("127.0.0.1", port)
            assert pid_alive(pid), "the handler outlives superd"
            s.sendall(b"two\n")
            assert recv_until_eof(s, 5) == b"and two\n"
        wait_until(lambda: not pid_alive(pid), 5, "the handler done")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
