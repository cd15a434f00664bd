"""Stopping: SIGTERM, shutdown_grace, handler timeouts, process groups, the control socket."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

from superd_testlib import (
    PY,
    REPO,
    connect,
    connection_refused,
    daemon_env,
    free_port,
    pid_alive,
    recv_exact,
    recv_until_eof,
    tcp_exchange,
    wait_until,
    write_script,
)


def test_sigterm_stops_handlers_and_exits_0(superd):
    port = free_port()
    d = superd({"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}})
    with connect("127.0.0.1", port) as s:
        s.sendall(b"x\n")
        assert recv_exact(s, 2) == b"x\n"
        pid = int(d.wait_log(r"^START: cat pid=(\d+) ")[0][1])
        idx = d.notify_index()
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        d.wait_notify("STOPPING=1", idx, 5)
        assert d.proc.wait(10) == 0
        assert time.monotonic() - t0 < 2.5, "cat dies on SIGTERM: no need to wait for the grace"
        # the client's session ends
        assert recv_until_eof(s, 5) == b""
    assert not pid_alive(pid)
    assert connection_refused("127.0.0.1", port)


def test_handler_ignoring_sigterm_is_killed_after_grace_with_its_children(superd, tmp_path):
    script = write_script(tmp_path / "stubborn.sh",
                          "#!/bin/sh\ntrap '' TERM\nsleep 30 &\necho $!\nwait\n")
    port = free_port()
    d = superd({"stubborn": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}},
               settings={"shutdown_grace": 1})
    with connect("127.0.0.1", port) as s:
        line = b""
        for _ in range(20):
            if line.endswith(b"\n"):
                break
            line += s.recv(100)
        child = int(line)
        pid = int(d.wait_log(r"^START: stubborn pid=(\d+) ")[0][1])
        assert pid_alive(pid) and pid_alive(child)
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        took = time.monotonic() - t0
    assert 0.8 <= took < 5, f"stop took {took:.1f}s with shutdown_grace 1"
    wait_until(lambda: not pid_alive(pid) and not pid_alive(child), 3,
               "handler and its child (same process group) gone")


def test_timeout_kills_the_handler_and_its_group(superd, tmp_path):
    script = write_script(tmp_path / "slow.sh", "#!/bin/sh\nsleep 30 &\necho $!\nwait\n")
    port = free_port()
    d = superd({"slow": {"listen": f"127.0.0.1:{port}", "exec": [str(script)], "timeout": 1}})
    t0 = time.monotonic()
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        out = recv_until_eof(s, 6)
    took = time.monotonic() - t0
    child = int(out)
    assert 0.8 <= took < 4.5, f"the handler ran {took:.1f}s with timeout 1"
    d.wait_log(r"^FAIL: slow timeout from=127\.0\.0\.1$")
    wait_until(lambda: not pid_alive(child), 3, "the handler's child killed too")
    assert d.proc.poll() is None


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", *args], cwd=REPO, env=daemon_env(),
                          capture_output=True, text=True, timeout=20)


def test_control_socket_status_reload_stop(superd):
    port = free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    for i in range(3):
        assert tcp_exchange("127.0.0.1", port, b"%d\n" % i, expect_len=2) == b"%d\n" % i
    assert d.ctl.exists()
    assert d.ctl.stat().st_mode & 0o777 == 0o600
    r = _cli("status", "-c", str(d.table), "--json")
    assert r.returncode == 0, r
    st = json.loads(r.stdout)
    assert st["services"]["echo"]["accepted"] == 3, st
    assert "children" in st
    idx = d.notify_index()
    r = _cli("reload", "-c", str(d.table))
    assert r.returncode == 0, r
    i = d.wait_notify("RELOADING=1", idx, 5)
    d.wait_notify("READY=1", i + 1, 5)
    r = _cli("stop", "-c", str(d.table))
    assert r.returncode == 0, r
    assert d.proc.wait(10) == 0
    # no daemon any more: status/stop say so with exit 1
    assert _cli("status", "-c", str(d.table)).returncode == 1
    assert _cli("stop", "-c", str(d.table)).returncode == 1
