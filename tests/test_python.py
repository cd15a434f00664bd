"""python: handlers run in a forked child of their service's python host, without exec.

The host is a fresh interpreter that superd starts for each python service and that holds
that service's record alone, so a handler does not hold superd's memory (every other service's
configuration, their `env` secrets included).
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import superd_testlib as lib
from superd_testlib import connect, free_port, recv_until_eof

HANDLERS = r'''
import json, os, sys

def info(sock, env):
    with open("/proc/self/cmdline", "rb") as f:
        cmdline = f.read()
    sock.sendall(json.dumps({
        "pid": os.getpid(),
        "cmdline": cmdline.decode("utf-8", "replace"),
        "exe": os.readlink("/proc/self/exe"),
        "executable": sys.executable,
        "env": dict(env),
        "sock_family": int(sock.family),
        "peer": list(sock.getpeername()[:2]),
    }).encode())
    return 0

def boom(sock, env):
    sock.sendall(b"about to fail\n")
    raise RuntimeError("boom-from-handler")

def seven(sock, env):
    sock.sendall(b"seven\n")
    return 7
'''


@pytest.fixture
def pyd(new_daemon):
    d = new_daemon()
    # FILE.py is relative to the table's folder: put the file next to the table
    (d.table.parent / "handlers.py").write_text(HANDLERS)
    ports = {n: free_port() for n in ("info", "boom", "seven")}
    services = {n: {"listen": f"127.0.0.1:{p}", "python": f"handlers.py:{n}"}
                for n, p in ports.items()}
    d.start(services)
    return d, ports


def _talk(port: int) -> bytes:
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s, 5)


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode("utf-8", "replace")


def test_python_handler_runs_forked_without_exec(pyd):
    d, ports = pyd
    daemon_cmdline = _cmdline(d.pid)
    with connect("127.0.0.1", ports["info"]) as s:
        my_port = s.getsockname()[1]
        s.shutdown(socket.SHUT_WR)
        info = json.loads(recv_until_eof(s, 5))
    start = d.wait_log(r"^START: info pid=(\d+) from=127\.0\.0\.1$")[0]
    assert int(start[1]) == info["pid"], "START pid must be the handler's pid"
    assert info["pid"] != d.pid, "the handler runs in a forked child, not in the daemon"
    # no exec: the child has its host's command line and superd's interpreter; the host is a
    # fresh interpreter, not a fork of superd
    assert "superd/pyhost.py" in info["cmdline"] and info["cmdline"] != daemon_cmdline
    assert info["exe"] == os.readlink(f"/proc/{d.pid}/exe")
    assert info["sock_family"] == socket.AF_INET
    assert info["peer"][1] == my_port
    env = info["env"]
    assert env.get("SUPERD_SERVICE") == "info"
    assert env.get("TCPREMOTEPORT") == str(my_port)
    assert env.get("PROTO") == "TCP"
    d.wait_log(rf"^EXIT: info status=0 pid={info['pid']} ")


def test_python_handler_return_value_is_exit_status(pyd):
    d, ports = pyd
    assert _talk(ports["seven"]) == b"seven\n"
    d.wait_log(r"^EXIT: seven status=7 pid=\d+ ")


def test_python_handler_exception_gives_status_1_and_daemon_keeps_serving(pyd):
    d, ports = pyd
    assert _talk(ports["boom"]) == b"about to fail\n"
    d.wait_log(r"^EXIT: boom status=1 pid=\d+ ")
    # the exception is logged
    d.wait_log(r"boom-from-handler|RuntimeError")
    # the daemon keeps serving, the same service included
    assert json.loads(_talk(ports["info"]))["env"]["SUPERD_SERVICE"] == "info"
    assert _talk(ports["boom"]) == b"about to fail\n"
    d.wait_log(r"^EXIT: boom status=1 pid=\d+ ", count=2)
    assert d.proc.poll() is None


SCAN = r'''
import re

def scan(sock, env):
    """Look through this very process's memory for a secret like the other service's. A
    pattern, not the secret itself: the handler must not put one there by looking."""
    secret = re.compile(rb"other-service-secret-[0-9a-f]{16}")
    found = False
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar" in line or "[vsyscall" in line:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                found = found or secret.search(mem.read(end - start)) is not None
            except OSError:
                pass
    sock.sendall(b"found" if found else b"clean")
'''


def test_python_handler_holds_no_other_services_secrets(new_daemon):
    """Issue 16, finding 14: forked from superd, a python handler (even `user: nobody`) held
    every other service's configuration in memory, their env secrets included."""
    d = new_daemon()
    (d.table.parent / "scan.py").write_text(SCAN)
    secret = "other-service-secret-" + os.urandom(8).hex()
    port = free_port()
    d.start({"scan": {"listen": f"127.0.0.1:{port}", "python": "scan.py:scan"},
             "cat": {"listen": f"127.0.0.1:{free_port()}", "exec": ["/bin/cat"],
                     "env": {"API_TOKEN": secret}}})
    assert _talk(port) == b"clean"


SLOW = r'''
import os, time

def slow(sock, env):
    sock.sendall(b"%d %s\n" % (os.getppid(), env.get("GENERATION", "").encode()))
    sock.recv(10)  # until the client says
    return 0
'''


def test_reload_replaces_the_python_host_and_the_old_one_leaves(new_daemon):
    """A changed python service gets a new host; the old host stays for the handlers it
    started (their EXIT is logged) and leaves when they are done; a change to its limits
    alone keeps the host."""
    d = new_daemon()
    (d.table.parent / "slow.py").write_text(SLOW)
    port = free_port()

    def table(generation: str, instances: int = 10) -> dict:
        return {"slow": {"listen": f"127.0.0.1:{port}", "python": "slow.py:slow",
                         "env": {"GENERATION": generation}, "instances": instances}}

    d.start(table("one"))
    held = connect("127.0.0.1", port)
    host1, gen = held.recv(100).split()
    assert gen == b"one"
    d.reload(table("one", instances=20))  # limits only: the same host
    with connect("127.0.0.1", port) as s:
        assert s.recv(100).split() == [host1, b"one"]
        s.sendall(b"bye")
    d.reload(table("two"))
    with connect("127.0.0.1", port) as s:
        host2, gen = s.recv(100).split()
        s.sendall(b"bye")
    assert gen == b"two" and host2 != host1
    assert lib.pid_alive(int(host1)), "the old host stays while its handler runs"
    held.sendall(b"bye")
    held.close()
    d.wait_exit("slow", count=3)
    lib.wait_until(lambda: not lib.pid_alive(int(host1)), 10, "the old host gone")
    helpers = [p for p in lib.descendants(d.pid) if lib.is_helper(p)]
    assert d.stop() == 0
    lib.wait_until(lambda: not [p for p in helpers if lib.pid_alive(p)], 10,
                   "every helper gone after superd stopped")
