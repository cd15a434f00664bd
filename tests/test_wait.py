"""wait: true services: the handler gets the bound/listening socket (fd 0/1 and fd 3)."""

from __future__ import annotations

import json
import re
import socket

import pytest
from superd_testlib import connect, free_port, python_script, recv_until_eof, udp_request

UDP_HANDLER = r'''
import json, os, socket, stat, sys, time
s = socket.socket(fileno=0)
data, peer = s.recvfrom(65536)
info = {"pid": os.getpid(), "data": data.decode(), "peer": list(peer[:2])}
env = dict(kv.split("=", 1) for kv in
           open("/proc/self/environ", "rb").read().decode().split("\0") if kv)
for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
    info[k] = env.get(k)
try:
    st0, st3 = os.fstat(0), os.fstat(3)
    info["fd3_is_socket"] = stat.S_ISSOCK(st3.st_mode)
    info["fd3_same_as_fd0"] = (st0.st_dev, st0.st_ino) == (st3.st_dev, st3.st_ino)
    s3 = socket.socket(fileno=os.dup(3))
    info["fd3_sockname"] = list(s3.getsockname()[:2])
    info["fd3_type"] = int(s3.type)
    s3.close()
except OSError as e:
    info["fd3_error"] = repr(e)
fds = []
for n in os.listdir("/proc/self/fd"):
    try:
        os.fstat(int(n))
        fds.append(int(n))
    except OSError:
        pass
info["fds"] = sorted(fds)
s.sendto(json.dumps(info).encode(), peer)
time.sleep(float(sys.argv[1]))
'''


@pytest.fixture
def udp_wait(superd, tmp_path):
    def make(linger: float):
        script = python_script(tmp_path / "udp_handler.py", UDP_HANDLER)
        port = free_port()
        d = superd({"uw": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True,
                           "exec": [str(script), str(linger)]}})
        return d, port
    return make


def _ask(port: int, text: str, timeout: float = 5.0) -> dict:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        c.bind(("127.0.0.1", 0))
        c.settimeout(timeout)
        c.sendto(text.encode(), ("127.0.0.1", port))
        data, _ = c.recvfrom(65536)
        info = json.loads(data)
        info["client"] = list(c.getsockname()[:2])
        return info


def _event_order(d, service: str) -> list[tuple[str, int]]:
    out = []
    for line in d.lines():
        m = re.match(rf"^(START|EXIT): {re.escape(service)} (?:status=-?\d+ )?pid=(\d+)", line)
        if m:
            out.append((m[1], int(m[2])))
    return out


def _assert_serial(order: list[tuple[str, int]], n: int) -> None:
    """START a, EXIT a, START b, EXIT b, ...: never two handlers at once."""
    assert len(order) == 2 * n, f"expected {n} START/EXIT pairs, got {order}"
    for i in range(n):
        (k1, p1), (k2, p2) = order[2 * i], order[2 * i + 1]
        assert (k1, k2) == ("START", "EXIT") and p1 == p2, f"not serial: {order}"


def test_udp_wait_three_clients_in_turn(udp_wait):
    d, port = udp_wait(0.0)
    pids = []
    for i in range(3):
        info = _ask(port, f"request-{i}")
        assert info["data"] == f"request-{i}"
        assert info["peer"] == info["client"], "the handler must see the real sender"
        pids.append(info["pid"])
        # each handled after the previous handler exited
        d.wait_log(rf"^EXIT: uw status=0 pid={info['pid']} ")
    assert len(set(pids)) == 3, f"each datagram needs a fresh handler: {pids}"
    assert d.pid not in pids
    _assert_serial(_event_order(d, "uw"), 3)
    assert [p for k, p in _event_order(d, "uw") if k == "START"] == pids


def test_udp_wait_burst_is_handled_one_handler_at_a_time(udp_wait):
    """superd does not poll the socket while its handler runs: the next datagram waits."""
    d, port = udp_wait(0.3)
    clients = []
    try:
        for _ in range(3):
            c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            c.settimeout(5)
            clients.append(c)
        for i, c in enumerate(clients):
            c.sendto(f"burst-{i}".encode(), ("127.0.0.1", port))
        infos = [json.loads(c.recvfrom(65536)[0]) for c in clients]
    finally:
        for c in clients:
            c.close()
    assert sorted(i["data"] for i in infos) == ["burst-0", "burst-1", "burst-2"]
    assert len({i["pid"] for i in infos}) == 3
    d.wait_log(r"^EXIT: uw status=0 ", count=3, timeout=5)
    _assert_serial(_event_order(d, "uw"), 3)


def test_wait_handler_gets_socket_as_fd3_with_listen_env(udp_wait):
    d, port = udp_wait(0.0)
    info = _ask(port, "fds?")
    assert info.get("fd3_error") is None, info.get("fd3_error")
    assert info["fd3_is_socket"] and info["fd3_same_as_fd0"], info
    assert info["fd3_sockname"] == ["127.0.0.1", port]
    assert info["fd3_type"] == socket.SOCK_DGRAM
    assert info["fds"] == [0, 1, 2, 3], f"wait handler fds: {info['fds']}"
    assert info["LISTEN_FDS"] == "1"
    assert info["LISTEN_PID"] == str(info["pid"])
    assert info["LISTEN_FDNAMES"] == "uw"


TCP_WAIT_HANDLER = r'''
import os, socket
ls = socket.socket(fileno=0)
conn, peer = ls.accept()
conn.sendall(("accepted by %d listening=%d\n" % (
    os.getpid(), ls.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))).encode())
conn.close()
'''


def test_tcp_wait_handler_gets_the_listening_socket(superd, tmp_path):
    script = python_script(tmp_path / "tcp_wait.py", TCP_WAIT_HANDLER)
    port = free_port()
    d = superd({"tw": {"listen": f"127.0.0.1:{port}", "wait": True, "exec": [str(script)]}})
    pids = []
    for _ in range(2):
        with connect("127.0.0.1", port) as s:
            data = recv_until_eof(s, 5).decode()
        m = re.fullmatch(r"accepted by (\d+) listening=1\n", data)
        assert m, data
        pids.append(int(m[1]))
        d.wait_log(rf"^EXIT: tw status=0 pid={m[1]} ")
    assert pids[0] != pids[1]


# A wait handler written the plain way: blocking recvfrom / accept in a loop, as under inetd.
PLAIN_UDP = r'''
import os, socket, sys
s = socket.socket(fileno=0)
for _ in range(3):
    data, peer = s.recvfrom(100)
    s.sendto(b"%d %s" % (os.getpid(), data), peer)
'''

PLAIN_TCP = r'''
import os, socket
s = socket.socket(fileno=0)
for _ in range(3):
    conn, _ = s.accept()
    conn.sendall(b"%d\n" % os.getpid())
    conn.close()
'''


@pytest.mark.parametrize("kind", ["udp", "tcp"])
def test_a_wait_handler_gets_its_socket_blocking(superd, tmp_path, kind):
    """superd's own sockets are non-blocking, and O_NONBLOCK belongs to the socket the handler
    shares: handed over so, a plain recvfrom()/accept() loop fails with EAGAIN at once."""
    script = python_script(tmp_path / "plain.py", PLAIN_UDP if kind == "udp" else PLAIN_TCP)
    port = free_port()
    d = superd({"w": {"listen": f"127.0.0.1:{port}", "wait": True, "exec": [str(script)],
                      **({"protocol": "udp"} if kind == "udp" else {})}})
    answers = []
    for i in range(3):
        if kind == "udp":
            got = udp_request("127.0.0.1", port, b"x%d" % i, timeout=5)
            assert got is not None, f"no answer to datagram {i}: {d.lines()[-10:]}"
            answers.append(got[0].split()[0])
        else:
            with connect("127.0.0.1", port) as s:
                answers.append(recv_until_eof(s, 5).strip())
    assert len(set(answers)) == 1, f"one handler should have served all three: {answers}"
    d.wait_log(rf"^EXIT: w status=0 pid={int(answers[0])} ")
    assert not [x for x in d.lines() if "BlockingIOError" in x or "Resource temporarily" in x]
    # and superd takes the socket back, non-blocking: the next client starts the next handler
    if kind == "udp":
        got = udp_request("127.0.0.1", port, b"again", timeout=5)
        assert got is not None and got[0].split()[0] != answers[0]
    else:
        with connect("127.0.0.1", port) as s:
            assert recv_until_eof(s, 5).strip() != answers[0]
