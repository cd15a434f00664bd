"""Helpers for the reliability suite: tests/test_soak.py, test_faults.py, test_fuzz.py and
test_security.py ("prove it does not break").

What is here:

- what a daemon holds, read from /proc: its fds, its RSS, its children (`Snapshot`), and
  `wait_quiet()`, which asks its control socket until no handler and no session is left;
- the clients of the soak: one function per service kind that does a whole exchange and says
  whether the answer was the full correct one (`EXCHANGES`);
- running a command as another user (`as_user()`, `run_as()`), and the RFC 864 chargen pattern.

Starting superd with sockets the test holds (socket activation) or under a command such as
prlimit is Superd.start(passed=..., prefix=...) in superd_testlib.

Every wait is bounded by a deadline and every loop by a count.
"""

from __future__ import annotations

import hashlib
import os
import pwd
import random
import re
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import superd_testlib as lib

LONG = os.environ.get("SUPERD_LONG", "") not in ("", "0")
"""SUPERD_LONG=1 selects the long versions (and runs the tests marked `slow`)."""

NTP_OFFSET = 2208988800


# --------------------------------------------------------------------------------------------
# what the daemon holds


def proc_fds(pid: int) -> dict[int, str]:
    """fd number -> readlink target ('socket:[123]', 'pipe:[4]', '/dev/null', ...)."""
    out: dict[int, str] = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except OSError:
            pass  # closed while we looked
    return out


def fd_kinds(fds: dict[int, str]) -> Counter[str]:
    """'socket', 'pipe', 'anon_inode:[eventpoll]', or the path: what each fd is, counted."""
    kinds: Counter[str] = Counter()
    for target in fds.values():
        m = re.match(r"^(socket|pipe):\[\d+\]$", target)
        kinds[m[1] if m else target] += 1
    return kinds


def socket_inodes(pid: int) -> set[str]:
    return {t for t in proc_fds(pid).values() if t.startswith("socket:")}


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            out[key] = value.strip()
    return out


def rss_kb(pid: int) -> int:
    return int(proc_status(pid)["VmRSS"].split()[0])


@dataclass
class Snapshot:
    fds: dict[int, str]
    rss_kb: int
    children: list[int]

    @property
    def nfds(self) -> int:
        return len(self.fds)

    def describe(self) -> str:
        return f"{self.nfds} fds, RSS {self.rss_kb} kB, {len(self.children)} children"


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


is_helper = lib.is_helper
descendants = lib.descendants


def helpers(d: lib.Superd) -> list[int]:
    """superd's spawner processes (not the python hosts)."""
    return [p for p in d.children() if lib.is_spawner(p)]


def handler_procs(d: lib.Superd) -> list[int]:
    """Processes below superd that are not its helpers: handlers and what they started."""
    return [p for p in descendants(d.pid) if not is_helper(p)]


def snapshot(d: lib.Superd) -> Snapshot:
    """fds, RSS and every process below superd (its helper processes included)."""
    return Snapshot(proc_fds(d.pid), rss_kb(d.pid), descendants(d.pid))


def fd_diff(before: Snapshot, after: Snapshot) -> str:
    a, b = fd_kinds(before.fds), fd_kinds(after.fds)
    grew = b - a
    shrank = a - b
    return f"fds {before.nfds} -> {after.nfds}; new: {dict(grew)}; gone: {dict(shrank)}"


# --------------------------------------------------------------------------------------------
# the daemon's live counters (Superd.control(): its control socket)


def busy(status: dict) -> list[str]:
    """What still runs according to `status`: handlers and internal sessions."""
    out = [f"{n}: {s['active']} active" for n, s in status["services"].items() if s["active"]]
    if status["children"]:
        out.append(f"{status['children']} children")
    return out


def wait_quiet(d: lib.Superd, timeout: float = 20.0) -> dict:
    """Wait until the daemon runs no handler, no internal session and has no child process."""
    last: dict = {}

    def quiet():
        last["status"] = d.control()
        return not busy(last["status"]) and not handler_procs(d)

    try:
        lib.wait_until(quiet, timeout, "no handler or session left", interval=0.05)
    except AssertionError:
        raise AssertionError(f"still busy after {timeout}s: {busy(last.get('status', {}))}, "
                             f"processes below superd {handler_procs(d)}") from None
    return last["status"]


def settled_snapshot(d: lib.Superd, timeout: float = 20.0) -> Snapshot:
    """A snapshot taken once the daemon is quiet and its fd count stopped moving."""
    wait_quiet(d, timeout)
    prev = snapshot(d)
    for _ in range(20):
        time.sleep(0.05)
        cur = snapshot(d)
        if cur.nfds == prev.nfds and cur.children == prev.children:
            return cur
        prev = cur
    return prev


def assert_alive(d: lib.Superd) -> None:
    assert d.proc.poll() is None, (
        f"superd died with status {d.proc.returncode}\n--- stderr ---\n{d.stderr_text()[-3000:]}")


def wait_fds_back(d: lib.Superd, baseline: Snapshot, timeout: float = 10.0,
                  pipes: int = 0) -> Snapshot:
    """Wait until the daemon's fds are back at `baseline`, and the processes below it are the
    same as then (its helpers; no handler).

    `pipes`: how many more pipe fds may be there. superd keeps one stderr pipe (two fds) per
    exec or python service from its first handler on, for as long as the service exists.
    """
    last: dict = {}

    def back():
        last["snap"] = snap = snapshot(d)
        grew = fd_kinds(snap.fds) - fd_kinds(baseline.fds)
        shrank = fd_kinds(baseline.fds) - fd_kinds(snap.fds)
        return (not shrank and set(grew) <= {"pipe"} and grew["pipe"] <= pipes
                and snap.children == baseline.children)

    try:
        lib.wait_until(back, timeout, "fds back to the baseline", interval=0.05)
    except AssertionError:
        raise AssertionError("fd leak: " + fd_diff(baseline, last["snap"])
                             + f"; children {last['snap'].children}") from None
    return last["snap"]


# --------------------------------------------------------------------------------------------
# protocol knowledge (independent of superd's own code)


def chargen_pattern() -> bytes:
    """One full RFC 864 cycle: 95 lines of 72 printable characters, each shifted by one."""
    printable = bytes(range(32, 127))
    ring = printable * 2
    return b"".join(ring[i:i + 72] + b"\r\n" for i in range(95))


CHARGEN = chargen_pattern()
CHARGEN3 = CHARGEN * 3
DAYTIME_RE = re.compile(rb"^[A-Z][a-z]+day, [A-Z][a-z]+ \d\d, \d{4} \d\d:\d\d:\d\d-\S*\r\n$")


def chargen_ok(data: bytes) -> bool:
    """Is `data` the chargen stream from its very start?"""
    reps = len(data) // len(CHARGEN) + 1
    return (CHARGEN * reps)[:len(data)] == data


def chargen_slice_ok(data: bytes) -> bool:
    """Is `data` a window of the chargen stream (a UDP answer, 0 to 512 bytes)?"""
    return len(data) <= 512 and (not data or data in CHARGEN3)


def time_ok(data: bytes, slack: float = 10.0) -> bool:
    if len(data) != 4:
        return False
    value = struct.unpack("!I", data)[0]
    now = (int(time.time()) + NTP_OFFSET) & 0xFFFFFFFF
    return abs(value - now) <= slack


# --------------------------------------------------------------------------------------------
# soak clients: each does one whole exchange and returns None (correct) or what was wrong


PY_HANDLER = '''\
"""Soak handler: read to EOF, answer sha256 hex, length and the service name."""
import hashlib


def handle(sock, env):
    h = hashlib.sha256()
    n = 0
    for _ in range(100000):
        data = sock.recv(65536)
        if not data:
            break
        h.update(data)
        n += len(data)
    sock.sendall(f"{h.hexdigest()} {n} {env['SUPERD_SERVICE']}\\n".encode())
    return 0
'''


def _tcp_payload(rng: random.Random, most: int = 16384) -> bytes:
    return rng.randbytes(rng.choice((1, rng.randint(1, 512), rng.randint(1, most))))


def x_echo(port: int, rng: random.Random) -> str | None:
    data = _tcp_payload(rng)
    got = lib.tcp_exchange("127.0.0.1", port, data, timeout=15)
    return None if got == data else f"echo: sent {len(data)} bytes, got {len(got)}"


def x_discard(port: int, rng: random.Random) -> str | None:
    data = _tcp_payload(rng)
    got = lib.tcp_exchange("127.0.0.1", port, data, timeout=15)
    return None if got == b"" else f"discard answered {got[:60]!r}"


def x_chargen(port: int, rng: random.Random) -> str | None:
    n = rng.randint(1, 20000)
    with lib.connect("127.0.0.1", port, 15) as s:
        got = lib.recv_exact(s, n, 15)
    return None if chargen_ok(got) else f"chargen: wrong {n} bytes {got[:60]!r}"


def x_daytime(port: int, rng: random.Random) -> str | None:
    got = lib.tcp_exchange("127.0.0.1", port, b"", timeout=15)
    return None if DAYTIME_RE.match(got) else f"daytime: {got!r}"


def x_time(port: int, rng: random.Random) -> str | None:
    got = lib.tcp_exchange("127.0.0.1", port, b"", timeout=15)
    return None if time_ok(got) else f"time: {got!r}"


def x_cat(port: int, rng: random.Random) -> str | None:
    data = _tcp_payload(rng, 65536)
    got = lib.tcp_exchange("127.0.0.1", port, data, timeout=15)
    return None if got == data else f"cat: sent {len(data)} bytes, got {len(got)}"


def x_sha(port: int, rng: random.Random) -> str | None:
    data = _tcp_payload(rng)
    got = lib.tcp_exchange("127.0.0.1", port, data, timeout=15)
    want = hashlib.sha256(data).hexdigest().encode() + b"  -\n"
    return None if got == want else f"sha256sum: {got[:100]!r}"


def x_python(port: int, rng: random.Random, name: str = "py") -> str | None:
    data = _tcp_payload(rng)
    got = lib.tcp_exchange("127.0.0.1", port, data, timeout=15)
    want = f"{hashlib.sha256(data).hexdigest()} {len(data)} {name}\n".encode()
    return None if got == want else f"python: {got[:120]!r}"


def _udp(port: int, data: bytes, timeout: float = 10.0) -> bytes | None:
    r = lib.udp_request("127.0.0.1", port, data, timeout=timeout)
    if r is None:
        return None
    reply, sender = r
    if sender[1] != port:
        raise AssertionError(f"UDP answer from {sender}, not from port {port}")
    return reply


def x_echo_u(port: int, rng: random.Random) -> str | None:
    data = rng.randbytes(rng.choice((0, rng.randint(1, 1400))))
    got = _udp(port, data)
    return None if got == data else f"udp echo: sent {len(data)} bytes, got {got!r:.80}"


def x_time_u(port: int, rng: random.Random) -> str | None:
    got = _udp(port, b"x")
    return None if got is not None and time_ok(got) else f"udp time: {got!r}"


def x_chargen_u(port: int, rng: random.Random) -> str | None:
    got = _udp(port, rng.randbytes(rng.randint(0, 64)))
    return None if got is not None and chargen_slice_ok(got) else f"udp chargen: {got!r:.80}"


def x_upper_u(port: int, rng: random.Random) -> str | None:
    data = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789 ")
                 for _ in range(rng.randint(1, 200)))
    got = _udp(port, data)
    return None if got == data.upper() else f"udp_upper: sent {data!r:.40}, got {got!r:.40}"


EXCHANGES = {
    "echo": x_echo, "discard": x_discard, "chargen": x_chargen, "daytime": x_daytime,
    "time": x_time, "cat": x_cat, "sha": x_sha, "py": x_python,
    "echo-u": x_echo_u, "time-u": x_time_u, "chargen-u": x_chargen_u, "upper-u": x_upper_u,
}
TCP_KINDS = {"echo", "discard", "chargen", "daytime", "time", "cat", "sha", "py"}


# --------------------------------------------------------------------------------------------
# other users


def nobody() -> pwd.struct_passwd:
    return pwd.getpwnam("nobody")


def as_user(pw: pwd.struct_passwd):
    """preexec_fn for subprocess: drop to `pw` (groups, gid, uid), as `runuser` would."""
    def drop() -> None:
        os.setgroups(os.getgrouplist(pw.pw_name, pw.pw_gid))
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    return drop


def world_dir(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may enter (tmp_path is 0700)."""
    import tempfile
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------------------------
# short and long versions


def long_mode(config) -> bool:
    """SUPERD_LONG=1, or `-m slow` on the command line, selects the long versions."""
    expr = config.getoption("markexpr", "") or ""
    return LONG or ("slow" in expr and "not slow" not in expr)


def require_long(request) -> None:
    import pytest
    if not long_mode(request.config):
        pytest.skip("long version: run with SUPERD_LONG=1 (or -m slow)")


class NotifyReader:
    """Read the daemon's sd_notify messages as they come, as systemd does.

    The fixture reads NOTIFY_SOCKET only while a test waits for a message; the kernel queues
    at most net.unix.max_dgram_qlen (10 here) datagrams, after which sd_notify blocks the
    daemon. Long runs keep it drained with this thread.
    """

    def __init__(self, d: lib.Superd, interval: float = 0.1):
        self.d = d
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        for _ in range(10_000_000):
            if self.stop.wait(self.interval):
                return
            self.d._drain_notify()

    def __enter__(self) -> NotifyReader:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)


def start_time(pid: int) -> int | None:
    """The start time of `pid` (clock ticks since boot), None when it is gone or a zombie:
    a pid and its start time name one process even after pids wrap around."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[19])


def run_as(pw: pwd.struct_passwd, func, *args, timeout: float = 20.0):
    """Run func(*args) in a forked child that has dropped to user `pw`; return its result.

    Forked rather than exec'd: the venv's interpreter may live where `pw` cannot reach (here
    under /root). Exceptions in the child come back as a string and are raised here.
    """
    import pickle
    import select
    import traceback
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 0
        try:
            os.close(r)
            as_user(pw)()
            result = ("ok", func(*args))
        except BaseException:
            result = ("error", traceback.format_exc())
            code = 1
        try:
            os.write(w, pickle.dumps(result))
        finally:
            os._exit(code)
    os.close(w)
    data = b""
    end = time.monotonic() + timeout
    try:
        for _ in range(100000):
            left = end - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                raise AssertionError(f"{func.__name__} as {pw.pw_name}: no answer in {timeout}s")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise AssertionError(f"{func.__name__} as {pw.pw_name} failed:\n{value}")
    return value
