"""Internal services (RFC 862, 863, 864, 867, 868) over TCP and UDP."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import time

import pytest
from superd_testlib import (
    NTP_EPOCH_OFFSET,
    connect,
    free_low_udp_port,
    free_port,
    recv_exact,
    recv_until_eof,
    tcp_exchange,
    udp_request,
    wait_until,
)

NAMES = ["echo", "discard", "chargen", "daytime", "time"]
RING = bytes(range(0x20, 0x7F))  # the 95 printable ASCII characters, RFC 864
assert len(RING) == 95


@pytest.fixture(scope="module")
def internals(module_daemon):
    ports = {n: free_port() for n in NAMES}
    services = {}
    for n in NAMES:
        services[n] = {"listen": f"127.0.0.1:{ports[n]}", "internal": n}
        services[n + "-u"] = {"listen": f"127.0.0.1:{ports[n]}", "protocol": "udp", "internal": n}
    d = module_daemon(services)
    return d, ports


# ---------------------------------------------------------------------------------- echo


def test_echo_tcp_returns_the_bytes(internals):
    d, ports = internals
    data = os.urandom(200_000)
    with connect("127.0.0.1", ports["echo"]) as s:
        # interleave sends and reads so neither side's buffers can deadlock
        got = bytearray()
        for i in range(0, len(data), 20_000):
            chunk = data[i:i + 20_000]
            s.sendall(chunk)
            got += recv_exact(s, len(chunk))
        assert bytes(got) == data
        # the connection stays open for more
        s.sendall(b"again\n")
        assert recv_exact(s, 6) == b"again\n"
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, 5) == b"", "echo must close after the client's EOF"


def test_echo_udp_returns_the_datagram(internals):
    d, ports = internals
    for payload in (b"hello superd", os.urandom(1400)):
        r = udp_request("127.0.0.1", ports["echo"], payload)
        assert r is not None, "no UDP echo reply"
        assert r[0] == payload
        assert r[1][1] == ports["echo"], "reply must come from the service port"


def test_echo_udp_empty_datagram_gets_empty_reply(internals):
    d, ports = internals
    r = udp_request("127.0.0.1", ports["echo"], b"")
    assert r is not None, "no reply to an empty datagram"
    assert r[0] == b""


def test_udp_internal_ignores_privileged_source_port(internals):
    """No echo/chargen ping-pong: a source port below 1024 gets no answer (SPEC 4)."""
    d, ports = internals
    low = free_low_udp_port()
    r = udp_request("127.0.0.1", ports["echo"], b"ping-pong?", timeout=0.7,
                    bind=("127.0.0.1", low))
    assert r is None, f"UDP echo answered source port {low}"
    r = udp_request("127.0.0.1", ports["chargen"], b"x", timeout=0.7, bind=("127.0.0.1", low))
    assert r is None, f"UDP chargen answered source port {low}"
    # and the service still answers an ordinary port
    assert udp_request("127.0.0.1", ports["echo"], b"ok") is not None


# ---------------------------------------------------------------------------------- discard


def test_discard_tcp_swallows_data_and_stays_open(internals):
    d, ports = internals
    total = 0
    block = b"x" * 65536
    with connect("127.0.0.1", ports["discard"]) as s:
        s.settimeout(5)
        end = time.monotonic() + 3
        # 32 MiB is far more than loopback socket buffers hold: it only goes through if the
        # server keeps reading.
        for _ in range(512):
            if total >= 32 << 20 or time.monotonic() > end:
                break
            s.sendall(block)
            total += len(block)
        assert total >= 32 << 20, f"discard stopped reading after {total} bytes"
        # nothing comes back, and the connection is still open (not EOF, not reset)
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)
        s.settimeout(5)
        s.sendall(b"still there\n")
        time.sleep(0.1)
        s.setblocking(False)
        with pytest.raises(BlockingIOError):
            s.recv(1)


def test_discard_udp_no_reply(internals):
    d, ports = internals
    assert udp_request("127.0.0.1", ports["discard"], b"into the void", timeout=0.5) is None
    assert udp_request("127.0.0.1", ports["echo"], b"alive") is not None


# ---------------------------------------------------------------------------------- chargen


def _check_chargen_lines(data: bytes, nlines: int) -> None:
    lines = [data[i * 74:(i + 1) * 74] for i in range(nlines)]
    starts = []
    for n, line in enumerate(lines):
        assert len(line) == 74, f"line {n} has {len(line)} bytes"
        assert line.endswith(b"\r\n"), f"line {n} does not end with CRLF: {line!r}"
        body = line[:72]
        assert all(0x20 <= c <= 0x7E for c in body), f"line {n} not printable: {body!r}"
        first = RING.index(body[0])
        expected = bytes(RING[(first + k) % 95] for k in range(72))
        assert body == expected, f"line {n} is not 72 consecutive ring chars: {body!r}"
        starts.append(first)
    for n in range(1, nlines):
        assert starts[n] == (starts[n - 1] + 1) % 95, (
            f"line {n} starts at {RING[starts[n]]:c}, previous at {RING[starts[n - 1]]:c}: "
            "each line must rotate by one character")


def test_chargen_tcp_pattern(internals):
    d, ports = internals
    nlines = 200  # more than a full turn of the 95-character ring
    with connect("127.0.0.1", ports["chargen"]) as s:
        data = recv_exact(s, 74 * nlines)
    _check_chargen_lines(data, nlines)


def test_chargen_udp_size_and_content(internals):
    d, ports = internals
    for _ in range(3):
        r = udp_request("127.0.0.1", ports["chargen"], b"give me chars")
        assert r is not None, "no UDP chargen reply"
        data = r[0]
        assert 0 <= len(data) <= 512, f"UDP chargen sent {len(data)} bytes"
        assert all(0x20 <= c <= 0x7E or c in (13, 10) for c in data), data[:100]


# ---------------------------------------------------------------------------------- daytime


def _plausible_daytime(text: str, t0: float, t1: float) -> None:
    assert text.endswith("\n"), f"daytime line must end with a newline: {text!r}"
    line = text.rstrip("\r\n")
    assert "\n" not in line, f"daytime must be one line: {text!r}"
    assert line.isprintable() and line.strip(), f"not a human-readable line: {text!r}"
    years = {str(time.gmtime(t)[0]) for t in (t0, t1)} | {str(time.localtime(t)[0])
                                                          for t in (t0, t1)}
    assert any(y in line for y in years), f"no current year in {line!r}"
    hhmm = set()
    for t in range(int(t0) - 60, int(t1) + 61, 30):
        hhmm.add(time.strftime("%H:%M", time.gmtime(t)))
        hhmm.add(time.strftime("%H:%M", time.localtime(t)))
    assert any(x in line for x in hhmm), f"no current HH:MM in {line!r}"


def test_daytime_tcp(internals):
    d, ports = internals
    t0 = time.time()
    with connect("127.0.0.1", ports["daytime"]) as s:
        data = recv_until_eof(s, 5, limit=1000)  # the server closes after the line
    t1 = time.time()
    _plausible_daytime(data.decode("ascii"), t0, t1)


def test_daytime_udp(internals):
    d, ports = internals
    t0 = time.time()
    r = udp_request("127.0.0.1", ports["daytime"], b"")
    t1 = time.time()
    assert r is not None, "no UDP daytime reply"
    _plausible_daytime(r[0].decode("ascii"), t0, t1)


# ---------------------------------------------------------------------------------- time


def test_time_tcp(internals):
    d, ports = internals
    with connect("127.0.0.1", ports["time"]) as s:
        data = recv_until_eof(s, 5, limit=100)
    now = time.time() + NTP_EPOCH_OFFSET
    assert len(data) == 4, f"time must send exactly 4 bytes, got {data!r}"
    (value,) = struct.unpack("!I", data)
    assert abs(value - now) <= 2, f"time says {value}, expected about {now:.0f}"


def test_time_udp(internals):
    d, ports = internals
    r = udp_request("127.0.0.1", ports["time"], b"")
    now = time.time() + NTP_EPOCH_OFFSET
    assert r is not None, "no UDP time reply"
    assert len(r[0]) == 4
    (value,) = struct.unpack("!I", r[0])
    assert abs(value - now) <= 2, f"time says {value}, expected about {now:.0f}"


# ---------------------------------------------------------------------------------- concurrency


def _inq(s: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def test_slow_chargen_reader_does_not_stall_echo(internals):
    d, ports = internals
    slow = []
    try:
        for _ in range(3):
            s = connect("127.0.0.1", ports["chargen"])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            slow.append(s)
        # wait until the clients' receive queues stop growing: the daemon's sends now block
        last = {}

        def stalled():
            cur = [_inq(s) for s in slow]
            ok = all(c > 0 for c in cur) and last.get("v") == cur
            last["v"] = cur
            return ok

        wait_until(stalled, 5, "chargen clients' receive queues full", interval=0.2)
        # meanwhile echo (TCP and UDP) answers promptly, over and over
        for i in range(20):
            msg = f"echo-{i}\n".encode()
            t = time.monotonic()
            assert tcp_exchange("127.0.0.1", ports["echo"], msg, expect_len=len(msg),
                                timeout=2) == msg
            assert time.monotonic() - t < 1.5, "echo was slow while chargen clients stalled"
        r = udp_request("127.0.0.1", ports["echo"], b"udp too", timeout=2)
        assert r is not None and r[0] == b"udp too"
        # the stalled chargen sessions are still alive and resume when read
        data = recv_exact(slow[0], 74 * 5, timeout=5)
        assert len(data) == 74 * 5
    finally:
        for s in slow:
            s.close()


def test_internal_start_lines_have_pid_0_and_no_exit(internals):
    d, ports = internals
    with socket.create_connection(("127.0.0.1", ports["daytime"]), timeout=5) as s:
        recv_until_eof(s, 5, limit=1000)
    d.wait_log(r"^START: daytime pid=0 from=127\.0\.0\.1$")
    time.sleep(0.2)  # an EXIT line, if any, would be written right after the session
    assert not d.exits("daytime"), "internal services must not log EXIT lines"
    assert not [m for m in d.starts("daytime") if m["pid"] != "0"]


def test_internal_on_dual_stack_listener_logs_plain_ipv4(superd):
    port = free_port()
    d = superd({"echo": {"listen": str(port), "internal": "echo"},
                "echo-u": {"listen": str(port), "protocol": "udp", "internal": "echo"}})
    for host in ("127.0.0.1", "::1"):
        assert tcp_exchange(host, port, b"hi\n", expect_len=3) == b"hi\n"
        r = udp_request(host, port, b"dgram")
        assert r is not None and r[0] == b"dgram", f"UDP echo over {host}"
    d.wait_log(r"^START: echo pid=0 from=127\.0\.0\.1$")
    d.wait_log(r"^START: echo pid=0 from=::1$")
    assert not [x for x in d.lines() if "::ffff:" in x], "IPv4 peers must be logged as IPv4"
