"""Helpers for the limits / access / overload tests (test_limits, test_access, test_overload).

Read-only users of superd_testlib: clients bound to a chosen source address, a bounded reader
for many sockets at once, one service's part of `superd status --json` (superd_testlib.status),
the timestamps handlers write. Every loop is bounded in count and time.
"""

from __future__ import annotations

import re
import selectors
import socket
import time
from datetime import datetime

from superd_testlib import Superd, family_of, recv_until_eof, status


def connect_from(src: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to host:port from the local address `src` (e.g. 127.0.0.2)."""
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.bind((src, 0))
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def closed_at_once(s: socket.socket, timeout: float = 3.0) -> bool:
    """True when the peer closes `s` (EOF or reset) within `timeout` having sent nothing."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    assert data == b"", f"a refused connection got data: {data!r}"
    return True


def still_open(s: socket.socket, wait: float = 0.3) -> bool:
    """True when nothing (not even EOF) arrives on `s` within `wait` seconds."""
    s.settimeout(wait)
    try:
        data = s.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    except ConnectionResetError:
        return False
    return bool(data)


def read_all(socks: list[socket.socket], timeout: float) -> list[bytes]:
    """Read every socket to EOF, all at once; what each one got (fails on the deadline)."""
    bufs = [bytearray() for _ in socks]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, i)
    open_count = len(socks)
    end = time.monotonic() + timeout
    try:
        for _ in range(1_000_000):
            if not open_count:
                break
            left = end - time.monotonic()
            if left <= 0:
                done = sum(1 for b in bufs if b)
                raise AssertionError(f"deadline: {open_count} of {len(socks)} sockets still open "
                                     f"after {timeout}s ({done} got data)")
            for key, _ in sel.select(min(left, 1.0)):
                i = key.data
                try:
                    chunk = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    bufs[i] += chunk
                else:
                    sel.unregister(socks[i])
                    open_count -= 1
    finally:
        sel.close()
    return [bytes(b) for b in bufs]


def svc_status(d: Superd, name: str) -> dict:
    return status(d)["services"][name]


def read_stamps(path) -> list[tuple[str, float, str]]:
    """Lines `KIND EPOCH.NANOS PID` written by the test handlers; [(kind, t, pid)]."""
    out = []
    try:
        text = open(path).read()
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out.append((parts[0], float(parts[1]), parts[2]))
    return out


def max_overlap(events: list[tuple[float, int]]) -> int:
    """Most intervals open at once, from (time, +1 for a start / -1 for an end); ends first."""
    level = top = 0
    for _, delta in sorted(events, key=lambda e: (e[0], e[1])):
        level += delta
        top = max(top, level)
    return top


def log_overlap(lines: list[str], service: str) -> int:
    """Most handlers of `service` running at once, from the order of START and EXIT lines."""
    start = re.compile(rf"^START: {re.escape(service)} pid=\d+")
    end = re.compile(rf"^EXIT: {re.escape(service)} ")
    level = top = 0
    for line in lines:
        if start.match(line):
            level += 1
            top = max(top, level)
        elif end.match(line):
            level -= 1
    return top


def syslog_times(d: Superd, pattern: str) -> list[float]:
    """Reception times (epoch seconds, from rsyslog) of this daemon's lines matching pattern."""
    rx = re.compile(pattern)
    out = []
    for ll in d.syslog_lines():
        if rx.search(ll.msg):
            ts = ll.raw.split(" ", 1)[0]
            out.append(datetime.fromisoformat(ts).timestamp())
    return out


def recv_all_from(src: str, host: str, port: int, data: bytes = b"",
                  timeout: float = 5.0) -> bytes:
    """Connect from `src`, send `data`, half-close, read to EOF."""
    with connect_from(src, host, port, timeout) as s:
        if data:
            s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s, timeout)
