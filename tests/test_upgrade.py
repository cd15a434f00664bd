"""`superd upgrade` (SIGUSR2): the superd installed now takes over in place, losing nothing.

Everything is seen from outside: the same pid before and after, clients in the middle of a
session that notice nothing, handlers that were running whose EXIT lines the new superd writes,
counters that go on, a handler's stderr still read, and signals sent during the exec obeyed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import superd_testlib as lib
from access_lib import refused, served
from superd_testlib import (
    PY,
    REPO,
    connect,
    free_port,
    python_script,
    recv_exact,
    recv_until_eof,
    tcp_exchange,
    udp_request,
    wait_until,
)

HANDLERS = """
def talk(sock, env):
    for line in sock.makefile("rb", buffering=0):
        sock.sendall(b"py:" + line)
    return 3
"""

UDP_WAIT = """
import os, socket, sys
s = socket.socket(fileno=0)
while True:
    data, addr = s.recvfrom(100)
    if data == b"quit":
        s.sendto(b"bye", addr)
        sys.exit(0)
    s.sendto(b"%d:" % os.getpid() + data, addr)
"""


def udp(port: int, data: bytes) -> bytes:
    got = udp_request("127.0.0.1", port, data, timeout=5)
    assert got is not None, f"no answer to {data!r}"
    return got[0]


def run_upgrade(d: lib.Superd, *extra: str) -> subprocess.CompletedProcess:
    """`superd upgrade -c TABLE`, as an admin runs it; it returns once the new one answers."""
    return subprocess.run([PY, "-m", "superd", "upgrade", "-c", str(d.table), *extra],
                          cwd=REPO, env=lib.daemon_env(), capture_output=True, text=True,
                          timeout=60)


def upgraded(d: lib.Superd) -> dict:
    """Upgrade, check what the admin sees, and return the status after."""
    pid = d.pid
    idx = d.notify_index()
    r = run_upgrade(d)
    assert r.returncode == 0, f"superd upgrade exited {r.returncode}: {r.stderr}"
    assert f"upgraded in place (pid {pid}," in r.stdout
    d.wait_notify("READY=1", d.wait_notify("RELOADING=1", idx) + 1)
    assert d.proc.poll() is None and d.pid == pid
    d.wait_log(rf"^upgraded: pid {pid}, ")
    return lib.status(d)


def test_upgrade_keeps_sessions_handlers_and_counts(new_daemon, tmp_path):
    d = new_daemon()
    (d.table.parent / "handlers.py").write_text(HANDLERS)
    udp_wait = python_script(tmp_path / "udp_wait", UDP_WAIT)
    ports = {n: free_port() for n in ("echo", "cat", "py", "udp")}
    d.start({
        "echo": {"listen": f"127.0.0.1:{ports['echo']}", "internal": "echo"},
        "cat": {"listen": f"127.0.0.1:{ports['cat']}",
                "exec": ["/bin/sh", "-c", 'read x; echo "$x"; read y; echo "late $y" >&2; cat']},
        "py": {"listen": f"127.0.0.1:{ports['py']}", "python": "handlers.py:talk"},
        "udp": {"listen": f"127.0.0.1:{ports['udp']}", "protocol": "udp", "wait": True,
                "exec": [str(udp_wait)]},
    })
    echo = connect("127.0.0.1", ports["echo"])
    cat = connect("127.0.0.1", ports["cat"])
    py = connect("127.0.0.1", ports["py"])
    try:
        # an echo session with bytes superd holds for it: its client does not read yet
        big = os.urandom(200_000)
        echo.sendall(big[:100_000])
        cat.sendall(b"one\n")
        assert recv_exact(cat, 4) == b"one\n"
        py.sendall(b"one\n")
        assert recv_exact(py, 7) == b"py:one\n"
        first = udp(ports["udp"], b"a")
        udp_pid = int(first.split(b":")[0])
        cat_pid = int(d.wait_start("cat")[-1]["pid"])
        before = lib.status(d)

        after = upgraded(d)

        assert after["upgrades"] == 1
        assert after["children"] == before["children"], json.dumps(before, indent=1)
        for name in ports:
            assert after["services"][name]["accepted"] == before["services"][name]["accepted"]
        echo.sendall(big[100_000:])
        echo.shutdown(socket.SHUT_WR)
        assert recv_until_eof(echo, 10) == big, "the echo session lost bytes over the upgrade"
        cat.sendall(b"two\n")
        d.wait_log(rf"^cat\[{cat_pid}\]: late two$")  # its stderr still read, still its pid
        cat.sendall(b"three\n")
        assert recv_exact(cat, 6) == b"three\n"
        cat.shutdown(socket.SHUT_WR)
        assert recv_until_eof(cat) == b""
        d.wait_exit("cat", cat_pid)  # written by the new superd: it reaps what it took over
        py.sendall(b"two\n")
        assert recv_exact(py, 7) == b"py:two\n"
        py.shutdown(socket.SHUT_WR)
        assert recv_until_eof(py) == b""
        d.wait_log(r"^EXIT: py status=3 ")
        # the same wait handler answers, and once it is gone superd starts the next one
        assert udp(ports["udp"], b"b") == b"%d:b" % udp_pid
        # once it sleeps it is back in recvfrom(): still blocking, as it was handed over
        wait_until(lambda: lib.proc_state(udp_pid) == "S", 5, "the handler waits again")
        assert udp(ports["udp"], b"quit") == b"bye"
        assert not [x for x in d.lines() if "BlockingIOError" in x], "\n".join(d.lines())
        d.wait_exit("udp", udp_pid)
        again = udp(ports["udp"], b"c")
        assert again.endswith(b":c") and int(again.split(b":")[0]) != udp_pid
        assert tcp_exchange("127.0.0.1", ports["echo"], b"new\n") == b"new\n"
        final = lib.status(d)
        assert final["services"]["cat"]["accepted"] == before["services"]["cat"]["accepted"]
        assert final["services"]["echo"]["accepted"] == before["services"]["echo"]["accepted"] + 1
        assert final["services"]["udp"]["accepted"] == before["services"]["udp"]["accepted"] + 1, \
            "\n".join(d.lines())
    finally:
        for s in (echo, cat, py):
            s.close()


def test_upgrade_refuses_no_connection_under_load(superd):
    port, cat_port = free_port(), free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"},
                "cat": {"listen": f"127.0.0.1:{cat_port}", "exec": ["/bin/cat"]}})
    stop = threading.Event()
    results: dict[str, list] = {"ok": [], "errors": []}

    def hammer(p: int) -> None:
        end = time.monotonic() + 30
        for i in range(100_000):
            if stop.is_set() or time.monotonic() > end:
                return
            msg = f"ping {p} {i}\n".encode()
            try:
                got = tcp_exchange("127.0.0.1", p, msg, timeout=10)
                (results["ok"] if got == msg else results["errors"]).append((p, i, got))
            except OSError as e:
                results["errors"].append((p, i, repr(e)))

    threads = [threading.Thread(target=hammer, args=(p,), daemon=True)
               for p in (port, port, cat_port)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results["ok"]) > 20, 10, "clients running")
        for _ in range(3):
            upgraded(d)
            seen = len(results["ok"])
            wait_until(lambda seen=seen: len(results["ok"]) > seen + 20, 10,
                       "clients served after it")
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert not results["errors"], f"{len(results['errors'])} failed: {results['errors'][:5]}"
    assert lib.status(d)["upgrades"] == 3


def test_signals_that_come_during_the_upgrade_are_obeyed(superd):
    port = free_port()
    d = superd({"cat": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}})
    cat = connect("127.0.0.1", port)
    cat.sendall(b"x\n")
    assert recv_exact(cat, 2) == b"x\n"
    try:
        d.proc.send_signal(signal.SIGUSR2)
        d.proc.send_signal(signal.SIGTERM)  # most likely lands while the exec is under way
        assert d.proc.wait(15) == 0
    finally:
        cat.close()
    lines = d.lines()
    assert any(re.match(r"^stopping: 1 handlers running", x) for x in lines), lines[-20:]
    assert "stopped" in lines


def test_sigusr2_upgrades_and_a_reload_after_it_works(superd):
    port, port2 = free_port(), free_port()
    services = {"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}}
    d = superd(services)
    idx = d.notify_index()
    d.proc.send_signal(signal.SIGUSR2)
    d.wait_notify("READY=1", d.wait_notify("RELOADING=1", idx) + 1)
    d.wait_log(r"^upgraded: ")
    services["echo2"] = {"listen": f"127.0.0.1:{port2}", "internal": "echo"}
    d.reload(services)
    assert tcp_exchange("127.0.0.1", port2, b"hi\n") == b"hi\n"
    assert tcp_exchange("127.0.0.1", port, b"hi\n") == b"hi\n"


def test_upgrade_with_a_table_that_cannot_be_read_is_refused(superd):
    port = free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    good = d.table.read_text()
    d.table.write_text(good + "services: [\n")
    r = run_upgrade(d)
    assert r.returncode == 1
    assert "upgrade refused: the table cannot be read" in r.stderr
    assert f"{d.table}:" in r.stderr  # and the problem, by file and line
    d.table.write_text(good)
    assert lib.status(d)["upgrades"] == 0
    assert tcp_exchange("127.0.0.1", port, b"hi\n") == b"hi\n"


def test_upgrade_of_a_daemon_keeps_its_pidfile(new_daemon, tmp_path):
    d = new_daemon()
    port = free_port()
    d.write_table({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    pidfile = tmp_path / "superd.pid"
    r = subprocess.run([PY, "-m", "superd", "run", "--daemon", "--pidfile", str(pidfile),
                        "-c", str(d.table)], cwd=REPO, env=lib.daemon_env(), timeout=30)
    assert r.returncode == 0
    wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, "pidfile")
    pid = int(pidfile.read_text())
    try:
        wait_until(lambda: lib.status(d), 10, "control socket")
        r = run_upgrade(d)
        assert r.returncode == 0, r.stderr
        assert int(pidfile.read_text()) == pid and lib.status(d)["pid"] == pid
        assert tcp_exchange("127.0.0.1", port, b"hi\n") == b"hi\n"
        stop = subprocess.run([PY, "-m", "superd", "stop", "-c", str(d.table)], cwd=REPO,
                              env=lib.daemon_env(), capture_output=True, timeout=30)
        assert stop.returncode == 0
        wait_until(lambda: not lib.pid_alive(pid), 15, "superd gone")
        assert not pidfile.exists(), "the upgraded daemon left its pidfile behind"
    finally:
        if lib.pid_alive(pid) and Path(f"/proc/{pid}/cmdline").read_bytes().find(b"superd") >= 0:
            os.kill(pid, signal.SIGKILL)


def test_a_redirect_in_flight_goes_on(superd):
    """A relay holds two sockets and, for a bulk transfer, a pipe per direction with bytes
    in it: all of it goes over, and the client gets every byte back through the echo."""
    back, front = free_port(), free_port()
    d = superd({"back": {"listen": f"127.0.0.1:{back}", "internal": "echo"},
                "front": {"listen": f"127.0.0.1:{front}", "redirect": f"127.0.0.1:{back}"}})
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)  # so the way back fills
    client.connect(("127.0.0.1", front))
    try:
        client.sendall(b"one\n")
        assert recv_exact(client, 4) == b"one\n"
        data = os.urandom(32 << 20)
        client.setblocking(False)
        sent = 0
        for _ in range(100_000):  # fill the way there as far as it goes without reading
            try:
                sent += client.send(data[sent:sent + 65536])
            except BlockingIOError:
                break
            if sent == len(data):
                break
        client.setblocking(True)
        upgraded(d)
        assert sent < len(data), "everything went through before the upgrade: nothing tested"
        got = bytearray()

        def reader() -> None:
            while len(got) < len(data):
                chunk = client.recv(1 << 16)
                if not chunk:
                    return
                got.extend(chunk)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        client.sendall(data[sent:])
        t.join(30)
        assert bytes(got) == data, f"got {len(got)} of {len(data)} bytes back, or not the same"
    finally:
        client.close()
    assert tcp_exchange("127.0.0.1", front, b"new\n") == b"new\n"


def test_sensor_bans_hold_across_the_upgrade(superd):
    """Whom a sensor caught stays refused: an upgrade is no way around a ban."""
    trap, real = free_port(), free_port()
    d = superd({"trap": {"listen": f"0.0.0.0:{trap}", "sensor": True, "deny_time": 10},
                "real": {"listen": f"0.0.0.0:{real}", "exec": ["/bin/echo", "hi"]}})
    refused(d, "trap", "127.0.0.5", trap, "sensor")
    refused(d, "real", "127.0.0.5", real, "address")
    upgraded(d)
    refused(d, "real", "127.0.0.5", real, "address")
    assert served("127.0.0.6", real) == b"hi\n"
