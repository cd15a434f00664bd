"""Overload and faults (SPEC §4): out of file descriptors, UDP ping-pong, handlers that cannot
be started."""

from __future__ import annotations

import os
import resource
import socket
import time

import pytest
from limits_lib import closed_at_once, still_open, svc_status
from superd_testlib import (
    connect,
    cpu_seconds,
    free_low_udp_port,
    free_port,
    tcp_exchange,
    udp_request,
    wait_until,
    write_script,
)


def open_fds(pid: int) -> list[int]:
    return sorted(int(x) for x in os.listdir(f"/proc/{pid}/fd"))


def test_out_of_fds_pauses_without_spinning_and_recovers(superd):
    """With a hard NOFILE limit that leaves room for 4 connections, 12 clients: accept hits
    EMFILE, the daemon uses under 10% of a core for 3 s, then serves again once released."""
    port, other = free_port(), free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"},
                "echo2": {"listen": f"127.0.0.1:{other}", "internal": "echo"}})
    used = set(open_fds(d.pid))
    limit = next(n for n in range(3, 10_000) if n - len({f for f in used if f < n}) >= 4)
    # superd lifts its soft limit to the hard one at start: set both, as a low hard limit would
    resource.prlimit(d.pid, resource.RLIMIT_NOFILE, (limit, limit))
    clients: list[socket.socket] = []
    try:
        for _ in range(12):
            clients.append(connect("127.0.0.1", port, timeout=10))
        d.wait_start("echo", count=4)
        d.wait_log(r"(?i)too many open files|EMFILE|out of file desc", timeout=10)
        assert len(d.starts("echo")) <= 5, "only about 4 fds were free"
        t0, c0 = time.monotonic(), cpu_seconds(d.pid)
        time.sleep(3.0)  # the measurement window itself
        used_cpu = cpu_seconds(d.pid) - c0
        wall = time.monotonic() - t0
        assert d.proc.poll() is None, "superd died out of fds:\n" + d.stderr_text()[-2000:]
        assert used_cpu / wall < 0.10, (f"superd used {used_cpu:.2f}s CPU in {wall:.1f}s while "
                                        "out of fds: the loop spins")
        for s in clients[:4]:
            assert still_open(s, 0.1), "the admitted sessions go on"
        # release everyone (the ones still in the backlog too)
    finally:
        for s in clients:
            s.close()
    # it serves again, with the same low limit still in place: both listeners
    answer = tcp_exchange("127.0.0.1", port, b"back\n", expect_len=5, timeout=15)
    assert answer == b"back\n"
    assert tcp_exchange("127.0.0.1", other, b"too\n", expect_len=4, timeout=15) == b"too\n"
    assert d.proc.poll() is None
    st = svc_status(d, "echo")
    assert st["paused"] is None, st
    # every client that was held in the backlog was accepted in the end (12 + 1)
    wait_until(lambda: len(d.starts("echo")) >= 13, 15, "backlogged clients accepted")


def test_udp_internal_ignores_privileged_source_ports(superd):
    """No echo/chargen ping-pong: a datagram from a source port below 1024 gets no answer."""
    port, cport = free_port(), free_port()
    superd({"echo-u": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "internal": "echo"},
            "chargen-u": {"listen": f"127.0.0.1:{cport}", "protocol": "udp",
                          "internal": "chargen"}})
    low = free_low_udp_port()
    r = udp_request("127.0.0.1", port, b"ping-pong?", timeout=1.0, bind=("127.0.0.1", low))
    assert r is None, f"UDP echo answered source port {low}: {r}"
    r = udp_request("127.0.0.1", cport, b"x", timeout=1.0, bind=("127.0.0.1", low))
    assert r is None, f"UDP chargen answered source port {low}: {r}"
    assert udp_request("127.0.0.1", cport, b"x", timeout=3.0) is not None
    r = udp_request("127.0.0.1", port, b"fine", timeout=3.0)
    assert r is not None and r[0] == b"fine", r
    r = udp_request("127.0.0.1", port, b"", timeout=3.0)
    assert r is not None and r[0] == b"", "an empty datagram gets an empty reply"


@pytest.mark.parametrize("fault", ["deleted", "not-executable"])
def test_handler_that_cannot_start(superd, tmp_path, fault):
    """The program vanished (or lost its x bit) after load: FAIL <svc> exec, the client is
    closed, other services keep answering, the daemon carries on."""
    script = write_script(tmp_path / "handler.sh", "#!/bin/sh\necho hi\n")
    p, pe = free_port(), free_port()
    d = superd({"gone": {"listen": f"127.0.0.1:{p}", "exec": [str(script)]},
                "echo": {"listen": f"127.0.0.1:{pe}", "internal": "echo"}})
    if fault == "deleted":
        script.unlink()
    else:
        script.chmod(0o644)
    with connect("127.0.0.1", p) as s:
        assert closed_at_once(s, 5), "the client must be closed"
    d.wait_log(r"^FAIL: gone exec( from=127\.0\.0\.1)?$")
    assert tcp_exchange("127.0.0.1", pe, b"alive\n", expect_len=6) == b"alive\n"
    with connect("127.0.0.1", p) as s:
        assert closed_at_once(s, 5)
    d.wait_log(r"^FAIL: gone exec( from=127\.0\.0\.1)?$", count=2)
    assert not d.exits("gone"), "no EXIT line for a handler that never started"
    assert d.proc.poll() is None
    # put the program back: served again
    write_script(script, "#!/bin/sh\necho hi\n")
    assert tcp_exchange("127.0.0.1", p, b"") == b"hi\n"
    # (status only after the program is back: `superd status -c TABLE` validates the table)
    st = svc_status(d, "gone")
    assert st["refused"] == {"exec": 2} and st["accepted"] == 3, st
