"""redirect: HOST:PORT relays inside the loop, no process per connection (issue 14, item 5).

The servers behind the relay are real: superd's own services on other ports (sort, which
answers only after the client's end-of-file; echo; discard; chargen), a listener that never
reads, and nothing at all (a refused connect).
"""

from __future__ import annotations

import os
import socket
import time

from limits_lib import svc_status
from superd_testlib import connect, free_port, recv_until_eof


def test_bytes_go_both_ways_and_a_half_close_is_passed_on(superd, tmp_path):
    """sort writes nothing before its input ends: the client's shutdown must reach it, and
    sort's own end must reach the client. The EXIT line counts the bytes (TRAFFIC)."""
    front, back = free_port(), free_port()
    d = superd({
        "front": {"listen": f"127.0.0.1:{front}", "redirect": f"127.0.0.1:{back}",
                  "log_on_success": ["host", "duration", "traffic"]},
        "back": {"listen": f"127.0.0.1:{back}", "exec": ["/usr/bin/sort"]},
    })
    data = b"".join(f"line {i:05d}\n".encode() for i in reversed(range(20000)))
    with connect("127.0.0.1", front) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        got = recv_until_eof(s, 10)
    assert got == b"".join(sorted(data.splitlines(keepends=True)))
    m = d.wait_log(r"^EXIT: front status=0 pid=0 duration=\d+\(sec\) in=(\d+)\(bytes\) "
                   r"out=(\d+)\(bytes\)$")[0]
    assert (int(m[1]), int(m[2])) == (len(data), len(data))
    assert svc_status(d, "front")["accepted"] == 1


def test_a_large_transfer_arrives_whole(superd):
    front, back = free_port(), free_port()
    d = superd({"front": {"listen": f"127.0.0.1:{front}", "redirect": f"127.0.0.1:{back}",
                          "log_on_success": ["traffic"]},
                "back": {"listen": f"127.0.0.1:{back}", "internal": "discard"}})
    block = os.urandom(1 << 20)
    with connect("127.0.0.1", front, timeout=20) as s:
        for _ in range(256):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, 20) == b""
    d.wait_log(rf"^EXIT: front .* in={256 << 20}\(bytes\) out=0\(bytes\)$", timeout=10)


def test_a_receiver_that_never_reads_holds_back_the_sender(superd):
    """Backpressure: superd buffers at most a pipe's worth per direction, so a client
    writing to a server that never reads is soon blocked, and superd's memory stays flat."""
    front = free_port()
    sink = socket.socket()
    sink.bind(("127.0.0.1", 0))
    sink.listen(4)
    d = superd({"front": {"listen": f"127.0.0.1:{front}",
                          "redirect": f"127.0.0.1:{sink.getsockname()[1]}"}})
    rss_before = _rss(d.pid)
    with connect("127.0.0.1", front) as s:
        s.setblocking(False)
        sent, block = 0, b"x" * 65536
        end = time.monotonic() + 5
        while time.monotonic() < end and sent < 256 << 20:
            try:
                sent += s.send(block)
            except BlockingIOError:
                time.sleep(0.05)
        assert 1 << 20 < sent < 32 << 20, f"{sent} bytes went in while nobody read them"
        assert _rss(d.pid) - rss_before < 8 << 10, "superd's memory grew (kB)"
        held, _ = sink.accept()
        held.close()
    sink.close()


def test_a_target_that_refuses_closes_the_client_and_says_why(superd):
    front, nothing = free_port(), free_port()
    d = superd({"front": {"listen": f"127.0.0.1:{front}", "redirect": f"127.0.0.1:{nothing}"}})
    with connect("127.0.0.1", front) as s:
        s.sendall(b"hello?\n")
        assert recv_until_eof(s, 5) == b""
    d.wait_log(rf"^front: redirect to 127\.0\.0\.1:{nothing} from=127\.0\.0\.1: "
               r"Connection refused$")


def test_ipv6_and_unix_targets_and_many_at_once(superd, tmp_path):
    p6, pu, back = free_port(), free_port(), free_port()
    path = str(tmp_path / "echo.sock")
    d = superd({"six": {"listen": f"127.0.0.1:{p6}", "redirect": f"[::1]:{back}"},
            "unix": {"listen": f"127.0.0.1:{pu}", "redirect": path},
            "echo6": {"listen": f"[::1]:{back}", "internal": "echo"},
            "echou": {"listen": path, "protocol": "unix", "internal": "echo"}})
    socks = [connect("127.0.0.1", p6 if i % 2 else pu) for i in range(100)]
    for i, s in enumerate(socks):
        s.sendall(f"hello {i}\n".encode())
    assert d.handlers() == [], "100 relayed connections, and not one process for them"
    for s in socks:
        s.shutdown(socket.SHUT_WR)
    for i, s in enumerate(socks):
        assert recv_until_eof(s, 10) == f"hello {i}\n".encode()
        s.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_relay_counts_its_two_sockets_toward_max_sessions(superd):
    """max_sessions caps the sockets sessions hold, so that idle clients leave fds for the
    rest; a relay holds two, so max_sessions: 4 holds two relays, not four."""
    front, back = free_port(), free_port()
    d = superd({
        "front": {"listen": f"127.0.0.1:{front}", "redirect": f"127.0.0.1:{back}"},
        "back": {"listen": f"127.0.0.1:{back}", "exec": ["/bin/cat"]},
    }, settings={"max_sessions": 4})
    held = []
    for i in range(2):
        s = connect("127.0.0.1", front)
        held.append(s)
        s.sendall(b"%d\n" % i)
        assert s.recv(10) == b"%d\n" % i
    with connect("127.0.0.1", front) as third:
        try:
            assert third.recv(10) == b""
        except ConnectionResetError:
            pass
    d.wait_log(r"^FAIL: front session_limit from=127\.0\.0\.1$")
    for s in held:
        s.close()
