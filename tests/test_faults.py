"""Faults: handlers and clients that misbehave, and superd itself killed.

For every fault: the daemon survives, the other services keep answering (three canaries, an
internal echo, an exec /bin/cat and a python echo, are asked after each fault), the log says
what happened,
and the daemon's fds and children come back to where they were before the fault.

Handlers: crash (exit code, SIGSEGV, python exception, os._exit), SIGKILLed from outside, hang
past `timeout` (also ignoring SIGTERM, also with grandchildren), close stdin early, write to a
client that is gone, fork grandchildren (that outlive them). Clients: reset mid-transfer,
connect and never send, send 10 MB into discard (and into echo without reading). The daemon:
out of file descriptors, an sd_notify reader that does not keep up, SIGKILL under socket
activation (the next instance serves every connection queued meanwhile), SIGKILL under systemd
with Restart= (needs the container of tests/test_systemd.py).
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import struct
import threading
import time

import pytest
import reliability_lib as rl
import superd_testlib as lib
import yaml
from superd_testlib import connect, free_port, recv_exact, recv_until_eof, tcp_exchange

FAULTY_PY = '''\
import os, signal, time


def raises(sock, env):
    sock.sendall(b"partial\\n")
    raise RuntimeError("crash-marker-" + env["SUPERD_SERVICE"])


def exits9(sock, env):
    sock.sendall(b"partial\\n")
    os._exit(9)


def segv(sock, env):
    sock.sendall(b"partial\\n")
    os.kill(os.getpid(), signal.SIGSEGV)


def ready_then_sleep(sock, env):
    sock.sendall(b"ready\\n")
    time.sleep(60)
    return 0


def hang_recv(sock, env):
    sock.recv(1)
    return 0


def write_forever(sock, env):
    sock.recv(16)
    for _ in range(100000):
        sock.sendall(b"x" * 65536)
    return 0


def echo_quiet(sock, env):
    """An echo that treats a peer going away as normal (exit 0)."""
    try:
        for _ in range(100000):
            data = sock.recv(65536)
            if not data:
                return 0
            sock.sendall(data)
    except OSError:
        return 0
    return 0
'''

IGNORE_TERM = ("import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
               "print('ready', flush=True); time.sleep(60)")


# --------------------------------------------------------------------------------------------
# a daemon with the faulty services and three canaries


class Faulty:
    """A running daemon with `services` plus canaries; knows its baseline."""

    def __init__(self, d: lib.Superd, ports: dict[str, int], services: dict):
        self.d = d
        self.ports = ports
        self.baseline: rl.Snapshot | None = None
        # superd keeps one stderr pipe (2 fds) per exec or python service once it has run
        self.pipes = 2 * sum(1 for name, svc in services.items()
                             if "internal" not in svc and not name.startswith("canary")
                             and svc.get("stderr", "log") == "log")

    def alive(self) -> None:
        """Fail (cleanly, without a second complaint at teardown) if superd died."""
        if self.d.proc.poll() is not None:
            self.d.expect_rc = self.d.proc.returncode
            raise AssertionError(f"superd died with status {self.d.proc.returncode}\n"
                                 f"--- stderr ---\n{self.d.stderr_text()[-3000:]}")

    def canaries(self) -> None:
        """The other services keep answering."""
        self.alive()
        for name in ("canary-echo", "canary-cat", "canary-py"):
            msg = f"canary {name} {time.monotonic()}\n".encode()
            got = tcp_exchange("127.0.0.1", self.ports[name], msg, timeout=10)
            assert got == msg, f"{name} answered {got!r}"

    def settle(self) -> rl.Snapshot:
        self.canaries()
        self.baseline = rl.settled_snapshot(self.d)
        return self.baseline

    def recovered(self, timeout: float = 15.0) -> None:
        """After a fault: alive, canaries answer, nothing running, fds back to the baseline."""
        self.canaries()
        rl.wait_quiet(self.d, timeout)
        rl.wait_fds_back(self.d, self.baseline, timeout, pipes=self.pipes)
        self.alive()

    def port(self, name: str) -> int:
        return self.ports[name]


def start_faulty(d: lib.Superd, services: dict, *, start=None, **kw) -> Faulty:
    ports = {}
    full = {}
    for name, svc in services.items():
        svc = dict(svc)
        if "listen" not in svc:
            ports[name] = free_port()
            svc["listen"] = f"127.0.0.1:{ports[name]}"
        full[name] = svc
    for name, svc in (("canary-echo", {"internal": "echo"}),
                      ("canary-cat", {"exec": ["/bin/cat"]}),
                      ("canary-py", {"python": "faulty.py:echo_quiet"})):
        ports[name] = free_port()
        full[name] = {"listen": f"127.0.0.1:{ports[name]}", **svc}
    (d.table.parent / "faulty.py").write_text(FAULTY_PY)
    if start is None:
        d.start(full, **kw)
    else:
        start(d, full, **kw)
    f = Faulty(d, ports, full)
    f.settle()
    return f


@pytest.fixture
def faulty(new_daemon):
    """faulty(services) -> Faulty, started and settled."""
    def make(services: dict, **kw) -> Faulty:
        return start_faulty(new_daemon(), services, **kw)
    return make


def py(func: str) -> dict:
    return {"python": f"faulty.py:{func}"}


def sh(script: str, **kw) -> dict:
    return {"exec": ["/bin/sh", "-c", script], **kw}


def start_pid(d: lib.Superd, service: str, count: int = 1, timeout: float = 5.0) -> int:
    return int(d.wait_start(service, count, timeout)[-1]["pid"])


def rst_close(s: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0) instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def read_all(s: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until EOF or a reset."""
    try:
        return recv_until_eof(s, timeout)
    except ConnectionResetError:
        return b""


# --------------------------------------------------------------------------------------------
# handlers that crash


CRASHES = {
    "exit-3": (sh("echo partial; exit 3"), r"status=3"),
    "sigsegv": (sh("echo partial; kill -SEGV $$", rlimits={"core": 0}), r"signal=11"),
    "python-exception": (py("raises"), r"status=1"),
    "python-os-exit": (py("exits9"), r"status=9"),
    "python-sigsegv": ({**py("segv"), "rlimits": {"core": 0}}, r"signal=11"),
}


@pytest.mark.parametrize("kind", list(CRASHES))
def test_handler_crashes(faulty, kind):
    svc, status = CRASHES[kind]
    f = faulty({"crash": svc})
    with connect("127.0.0.1", f.port("crash")) as s:
        s.shutdown(socket.SHUT_WR)
        assert read_all(s) == b"partial\n"
    pid = start_pid(f.d, "crash")
    f.d.wait_log(rf"^EXIT: crash {status} pid={pid} ")
    if kind == "python-exception":
        f.d.wait_log(rf"^crash(\[{pid}\])?: RuntimeError: crash-marker-crash")
        f.d.wait_log(rf"^crash(\[{pid}\])?: Traceback")
    f.recovered()


def test_crash_loop_backs_off_and_recovers(faulty, tmp_path):
    """Starts that fail in a row pause the service (BACKOFF), never switch it off: a client
    that connects during the back-off waits in the backlog and is served when it ends."""
    script = lib.write_script(tmp_path / "crash.sh", "#!/bin/sh\necho partial\nexit 3\n")
    f = faulty({"crash": {"exec": [str(script)]}})
    script.chmod(0o644)  # its program can no longer be executed
    for _ in range(5):
        assert tcp_exchange("127.0.0.1", f.port("crash"), b"") == b""
    f.d.wait_log(r"^BACKOFF: crash 1s")
    script.chmod(0o755)
    t0 = time.monotonic()
    f.canaries()  # the others do not back off
    assert tcp_exchange("127.0.0.1", f.port("crash"), b"", timeout=10) == b"partial\n"
    assert time.monotonic() - t0 < 8
    f.recovered()


# --------------------------------------------------------------------------------------------
# handlers killed from outside, or hanging past their timeout


@pytest.mark.parametrize("kind", ["exec", "python"])
def test_handler_sigkilled(faulty, kind):
    svc = sh("echo ready; exec sleep 60") if kind == "exec" else py("ready_then_sleep")
    f = faulty({"victim": svc})
    with connect("127.0.0.1", f.port("victim")) as s:
        assert recv_exact(s, 6) == b"ready\n"
        pid = start_pid(f.d, "victim")
        os.kill(pid, signal.SIGKILL)
        assert read_all(s) == b""
    f.d.wait_log(rf"^EXIT: victim signal=9 pid={pid} ")
    f.recovered()


HANGS = {
    # service, the EXIT line, seconds from start to EXIT (at least, at most)
    "sleep": (sh("echo ready; exec sleep 60", timeout=1), r"signal=15", 0.8, 6),
    "ignores-sigterm": ({"exec": ["/usr/bin/python3", "-c", IGNORE_TERM], "timeout": 1},
                        r"signal=9", 2.8, 9),
    "python-recv": ({**py("hang_recv"), "timeout": 1}, r"signal=15", 0.8, 6),
}


@pytest.mark.parametrize("kind", list(HANGS))
def test_handler_hangs_past_timeout(faulty, kind):
    svc, status, low, high = HANGS[kind]
    f = faulty({"hang": svc})
    with connect("127.0.0.1", f.port("hang")) as s:
        t0 = time.monotonic()
        if kind != "python-recv":
            assert recv_exact(s, 6, 10) == b"ready\n"
        pid = start_pid(f.d, "hang")
        f.canaries()  # a hanging handler stalls nothing else
        assert read_all(s, 15) == b""
        took = time.monotonic() - t0
    assert low <= took <= high, f"connection closed {took:.1f}s after start"
    f.d.wait_log(r"^FAIL: hang timeout from=127\.0\.0\.1$")
    f.d.wait_log(rf"^EXIT: hang {status} pid={pid} ")
    f.recovered()


def test_timeout_reaches_grandchildren(faulty):
    """`timeout` signals the handler's process group: its children go too."""
    f = faulty({"tree": sh("sleep 300 & echo $!; wait", timeout=1)})
    with connect("127.0.0.1", f.port("tree")) as s:
        line = b""
        for _ in range(100):
            line += s.recv(100)
            if line.endswith(b"\n"):
                break
        grandchild = int(line)
        pid = start_pid(f.d, "tree")
        assert lib.pid_alive(grandchild)
        read_all(s, 15)
    f.d.wait_log(rf"^EXIT: tree signal=15 pid={pid} ")
    try:
        lib.wait_until(lambda: not lib.pid_alive(grandchild), 5, "the grandchild killed too")
    finally:
        if lib.pid_alive(grandchild):
            os.kill(grandchild, signal.SIGKILL)
    f.recovered()


# --------------------------------------------------------------------------------------------
# handlers that stop reading or keep writing


def test_handler_closes_stdin_early(faulty):
    """`head -c 16` reads 16 bytes of a 4 MB upload and exits; the client sees its answer and
    then a reset or EOF; and a handler that closes fds 0 and 1 at once gives an EOF at once."""
    f = faulty({"head": {"exec": ["/usr/bin/head", "-c", "16"]},
                "closer": sh("exec 0<&- 1>&-; sleep 1")})
    payload = os.urandom(4 << 20)
    with connect("127.0.0.1", f.port("head")) as s:
        errors = []

        def upload():
            try:
                s.sendall(payload)
            except OSError as e:
                errors.append(e)

        t = threading.Thread(target=upload, daemon=True)
        t.start()
        assert recv_exact(s, 16, 10) == payload[:16]
        read_all(s)
        t.join(15)
        assert not t.is_alive(), "the upload never ended"
    f.d.wait_log(r"^EXIT: head status=0 pid=\d+ ")
    with connect("127.0.0.1", f.port("closer")) as s:
        t0 = time.monotonic()
        assert read_all(s, 10) == b""
        assert time.monotonic() - t0 < 0.9, "EOF only when the handler exited"
    f.d.wait_log(r"^EXIT: closer status=0 pid=\d+ ")
    f.recovered()


@pytest.mark.parametrize("kind", ["exec", "python"])
def test_handler_writes_to_a_closed_client(faulty, kind):
    """The client leaves; the handler keeps writing: it gets EPIPE/SIGPIPE, exits, is logged."""
    svc = sh("read line; exec yes") if kind == "exec" else py("write_forever")
    f = faulty({"writer": svc})
    with connect("127.0.0.1", f.port("writer")) as s:
        s.sendall(b"go\n")
        assert s.recv(10)  # it writes
        pid = start_pid(f.d, "writer")
        rst_close(s)
    m = f.d.wait_log(rf"^EXIT: writer (?P<how>\S+) pid={pid} ", timeout=10)[0]
    print("\nFIGURES writer exit:", m.string)
    assert m["how"] in ("signal=13", "status=1", "status=141"), m.string
    f.recovered()


def test_handler_floods_stderr(faulty):
    """2 MB on stderr without a newline: logged in bounded pieces, the daemon carries on."""
    f = faulty({"noisy": sh("head -c 2000000 /dev/zero | tr '\\0' x >&2; echo done")})
    assert tcp_exchange("127.0.0.1", f.port("noisy"), b"", timeout=20) == b"done\n"
    pid = start_pid(f.d, "noisy")
    f.d.wait_log(rf"^EXIT: noisy status=0 pid={pid} ", timeout=20)
    pieces = [x for x in f.d.lines() if x.startswith((f"noisy[{pid}]: ", "noisy: "))]
    assert pieces and max(len(x) for x in pieces) < 70000
    f.recovered()


# --------------------------------------------------------------------------------------------
# handlers that fork


def test_handler_forks_grandchildren(faulty):
    """A handler that leaves a child behind: the child keeps the connection (and stderr) until
    it is done, superd logs the handler's exit at once and the child's late stderr line."""
    f = faulty({"fork": sh("(sleep 1; echo late-from-grandchild >&2; echo late) & "
                           "echo parent-done"),
                "many": sh("for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do "
                           "sleep 2 </dev/null >/dev/null 2>&1 & done; echo spawned")})
    with connect("127.0.0.1", f.port("fork")) as s:
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert recv_until_eof(s, 10) == b"parent-done\nlate\n"
        assert time.monotonic() - t0 >= 0.8, "EOF before the grandchild was done"
    pid = start_pid(f.d, "fork")
    f.d.wait_log(rf"^EXIT: fork status=0 pid={pid} ")
    f.d.wait_log(rf"^fork(\[{pid}\])?: late-from-grandchild$")
    assert tcp_exchange("127.0.0.1", f.port("many"), b"") == b"spawned\n"
    f.d.wait_log(r"^EXIT: many status=0 pid=\d+ ")
    assert not f.d.zombie_children()
    f.recovered()


# --------------------------------------------------------------------------------------------
# superd's helper processes (the spawners that exec handlers)


def test_spawners_sigkilled(faulty):
    """SIGKILL every spawner while a handler it started runs: that handler keeps serving and
    is reaped and logged by superd; new exec connections are still served; the log says so."""
    f = faulty({"cat": {"exec": ["/bin/cat"]}})
    spawners = rl.helpers(f.d)
    if not spawners:
        pytest.skip("this superd has no helper processes")
    with connect("127.0.0.1", f.port("cat")) as held:
        held.sendall(b"before\n")
        assert recv_exact(held, 7) == b"before\n"
        pid = start_pid(f.d, "cat")
        for p in spawners:
            os.kill(p, signal.SIGKILL)
        f.d.wait_log(r"spawner process died", count=len(spawners))
        f.canaries()
        assert tcp_exchange("127.0.0.1", f.port("cat"), b"new\n") == b"new\n"
        held.sendall(b"after\n")
        assert recv_exact(held, 6) == b"after\n"
        held.shutdown(socket.SHUT_WR)
        assert recv_until_eof(held) == b""
    f.d.wait_log(rf"^EXIT: cat status=0 pid={pid} ")
    rl.wait_quiet(f.d)
    assert not f.d.zombie_children()
    print("\nFIGURES spawners killed:", len(spawners), "left:", rl.helpers(f.d))
    f.alive()


def test_spawners_sigkilled_in_a_burst(faulty):
    """SIGKILL the spawners while they start a burst of handlers: whatever each spawner had
    done but not yet said is settled by superd. Every connection is answered or closed,
    every handler started is logged START and EXIT, the others FAIL, and no slot is lost."""
    f = faulty({"slow": {"exec": ["/bin/sh", "-c", "read x; echo \"$x\"; sleep 0.5"]}})
    spawners = rl.helpers(f.d)
    if not spawners:
        pytest.skip("this superd has no helper processes")
    results: list[bytes | None] = [None] * 40

    def client(i: int) -> None:
        try:
            with connect("127.0.0.1", f.port("slow"), timeout=15) as s:
                s.sendall(b"%d\n" % i)
                s.shutdown(socket.SHUT_WR)
                results[i] = recv_until_eof(s, 15)
        except OSError:
            results[i] = b""  # refused or reset: closed, not hung

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(results))]
    for t in threads[:20]:
        t.start()
    f.d.wait_log(r"^START: slow ")  # the spawners are in the middle of the burst now
    for p in spawners:
        os.kill(p, signal.SIGKILL)
    for t in threads[20:]:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r is not None for r in results), "a client hung"
    status = rl.wait_quiet(f.d)
    f.alive()
    seen: dict[str, list[str]] = {}

    def logged() -> bool:  # the last lines may still be on their way to the log file
        lines = f.d.lines()
        for kind, pattern in (("start", r"^START: slow pid=[1-9]"), ("exit", r"^EXIT: slow "),
                              ("fail", r"^FAIL: slow exec")):
            seen[kind] = [x for x in lines if re.match(pattern, x)]
        return len(seen["start"]) + len(seen["fail"]) >= status["services"]["slow"]["accepted"] \
            and len(seen["exit"]) >= len(seen["start"])

    lib.wait_until(logged, 5, "START, EXIT and FAIL lines of every connection", interval=0.1)
    starts, exits, fails = seen["start"], seen["exit"], seen["fail"]
    answered = sum(1 for i, r in enumerate(results) if r == b"%d\n" % i)
    assert status["services"]["slow"]["active"] == 0
    assert len(starts) == len(exits), (starts, exits)
    assert len(starts) + len(fails) == status["services"]["slow"]["accepted"], (starts, fails)
    assert answered >= len(results) - len(fails), (answered, len(fails))
    adopted = [x for x in f.d.lines() if "before saying so" in x]
    print(f"\nFIGURES burst: {answered} answered, {len(starts)} started ({len(adopted)} found "
          f"after their spawner died), {len(fails)} failed")
    f.canaries()  # (not recovered(): a second spawner is replaced only 5 s after the first)
    f.alive()


def test_spawners_stopped(faulty):
    """SIGSTOP every spawner: internal services keep answering; exec connections wait and are
    served once the spawners run again (SIGCONT)."""
    f = faulty({"cat": {"exec": ["/bin/cat"]}})
    spawners = rl.helpers(f.d)
    if not spawners:
        pytest.skip("this superd has no helper processes")
    for p in spawners:
        os.kill(p, signal.SIGSTOP)
    try:
        with connect("127.0.0.1", f.port("cat")) as s:
            s.sendall(b"waiting\n")
            s.shutdown(socket.SHUT_WR)
            got = tcp_exchange("127.0.0.1", f.port("canary-echo"), b"echo\n", timeout=5)
            assert got == b"echo\n"
            for p in spawners:
                os.kill(p, signal.SIGCONT)
            assert recv_until_eof(s, 15) == b"waiting\n"
    finally:
        for p in spawners:
            os.kill(p, signal.SIGCONT)
    f.recovered()


# --------------------------------------------------------------------------------------------
# clients that misbehave


def test_clients_reset_mid_transfer(faulty):
    f = faulty({"echo": {"internal": "echo"}, "discard": {"internal": "discard"},
                "chargen": {"internal": "chargen"}, "pyecho": py("echo_quiet"),
                "cat": {"exec": ["/bin/cat"]}})
    blob = os.urandom(1 << 20)
    for i in range(20):
        with connect("127.0.0.1", f.port("chargen")) as s:
            recv_exact(s, 1000 + i * 100)
            rst_close(s)
        s = connect("127.0.0.1", f.port("echo"))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.settimeout(0.5)
        try:
            s.sendall(blob)  # the echo is not read: this stalls, then we reset
        except TimeoutError:
            pass
        rst_close(s)
        s = connect("127.0.0.1", f.port("discard"))
        s.sendall(blob[:100_000])
        rst_close(s)
        s = connect("127.0.0.1", f.port("pyecho"))
        s.sendall(blob[:50_000])
        s.recv(1000)
        rst_close(s)
    for _ in range(3):  # below the five quick failures that make a back-off
        s = connect("127.0.0.1", f.port("cat"))
        s.sendall(blob[:200_000])
        s.recv(1000)
        rst_close(s)
    f.d.wait_exit("pyecho", count=20, timeout=10)
    f.d.wait_exit("cat", count=3, timeout=10)
    assert not [x for x in f.d.lines() if x.startswith("EXIT: pyecho") and "status=0" not in x]
    f.recovered()


def test_clients_that_never_send(faulty):
    """100 silent clients on echo and 5 on a handler with a timeout: nothing else stalls; the
    handlers are timed out; the silent echo sessions cost nothing once they go."""
    f = faulty({"echo": {"internal": "echo"}, "cat": {"exec": ["/bin/cat"], "timeout": 1},
                "daytime": {"internal": "daytime"}})
    idle = [connect("127.0.0.1", f.port("echo")) for _ in range(100)]
    idle_cat = [connect("127.0.0.1", f.port("cat")) for _ in range(5)]
    try:
        f.canaries()
        got = tcp_exchange("127.0.0.1", f.port("daytime"), b"")
        assert rl.DAYTIME_RE.match(got), got
        for s in idle_cat:
            assert read_all(s, 10) == b""
        f.d.wait_log(r"^FAIL: cat timeout from=127\.0\.0\.1$", count=5)
        status = f.d.control()
        assert status["services"]["echo"]["active"] == 100, status["services"]["echo"]
        msg = b"still answering\n"
        assert tcp_exchange("127.0.0.1", f.port("echo"), msg) == msg
    finally:
        for s in idle + idle_cat:
            s.close()
    f.recovered()


def test_ten_megabytes_into_discard(faulty):
    """10 MB into discard (TCP), 10 MB of datagrams into discard (UDP), while the canaries keep
    answering quickly; and 10 MB into echo by a client that does not read: superd stops
    reading (its memory does not grow by the 10 MB), then the client reads it all back."""
    f = faulty({"discard": {"internal": "discard"},
                "discard-u": {"internal": "discard", "protocol": "udp"},
                "echo": {"internal": "echo"}})
    ten = os.urandom(10 << 20)
    done = threading.Event()
    result: list = []

    def upload():
        try:
            result.append(tcp_exchange("127.0.0.1", f.port("discard"), ten, timeout=60))
        except BaseException as e:  # noqa: BLE001 - reported below
            result.append(e)
        done.set()

    t = threading.Thread(target=upload, daemon=True)
    t.start()
    slowest = 0.0
    for _ in range(200):
        if done.is_set():
            break
        t0 = time.monotonic()
        f.canaries()
        slowest = max(slowest, time.monotonic() - t0)
    t.join(60)
    assert result == [b""], result
    assert slowest < 2.0, f"a canary took {slowest:.2f}s during the upload"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        for i in range(1000):
            u.sendto(ten[i * 10240:(i + 1) * 10240], ("127.0.0.1", f.port("discard-u")))
        u.settimeout(0.5)
        with pytest.raises(TimeoutError):
            u.recvfrom(65536)
    f.canaries()

    rss0 = rl.rss_kb(f.d.pid)
    with connect("127.0.0.1", f.port("echo"), timeout=30) as s:
        sent = []

        def push():
            try:
                s.sendall(ten)
                sent.append(True)
            except OSError as e:
                sent.append(e)

        p = threading.Thread(target=push, daemon=True)
        p.start()
        time.sleep(1.0)  # let superd fill its buffer and the socket buffers
        grew = rl.rss_kb(f.d.pid) - rss0
        f.canaries()
        assert grew < 4096, f"superd's RSS grew by {grew} kB holding an unread echo"
        got = recv_exact(s, len(ten), 60)
        p.join(30)
        assert sent == [True], sent
        assert got == ten
    f.recovered()


# --------------------------------------------------------------------------------------------
# the daemon's own resources


def out_of_fds_start(d: lib.Superd, services: dict, **kw: object) -> lib.Superd:
    """Under `prlimit --nofile=64`, with the session cap lifted (max_sessions), so that idle
    echo clients really take every fd superd has."""
    return d.start(services, settings={"max_sessions": 1000},
                   prefix=["/usr/bin/prlimit", "--nofile=64:64", "--"], timeout=15)


def test_out_of_fds_pauses_and_recovers(new_daemon):
    """With superd's fd limit reached, accept fails with EMFILE: the listener pauses with a
    back-off (logged), the loop does not spin, and connections queued meanwhile are served
    once fds are free again."""
    d = new_daemon()
    f = start_faulty(d, {"echo": {"internal": "echo"}}, start=out_of_fds_start)
    conns = []
    try:
        for _ in range(60):  # more than the 64 fds minus what superd holds at rest
            conns.append(connect("127.0.0.1", f.port("echo")))
        f.d.wait_log(r"^echo: accept: Too many open files; pausing", timeout=10)
        cpu0, t0 = lib.cpu_seconds(d.pid), time.monotonic()
        time.sleep(2)
        cpu = lib.cpu_seconds(d.pid) - cpu0
        wall = time.monotonic() - t0
        assert cpu < 0.25 * wall, f"superd used {cpu:.2f}s of CPU in {wall:.2f}s while out of fds"
        f.alive()
        for s in conns[:30]:
            s.close()
        # every connection still open (accepted before, or queued) now gets its echo
        for i, s in enumerate(conns[30:]):
            s.sendall(b"queued %d\n" % i)
            assert recv_exact(s, len(b"queued %d\n" % i), 15) == b"queued %d\n" % i
    finally:
        for s in conns:
            s.close()
    f.recovered()


def test_out_of_fds_control_socket_does_not_spin(new_daemon):
    """Out of fds, a `superd status` connection cannot be accepted either: the loop must not
    spin on the control socket."""
    d = new_daemon()
    f = start_faulty(d, {"echo": {"internal": "echo"}}, start=out_of_fds_start)
    conns = []
    ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for _ in range(60):  # more than the 64 fds minus what superd holds at rest
            conns.append(connect("127.0.0.1", f.port("echo")))
        f.d.wait_log(r"^echo: accept: Too many open files; pausing", timeout=10)
        ctl.settimeout(5)
        ctl.connect(str(d.ctl))  # queued on the control socket's backlog
        ctl.sendall(b"status\n")
        time.sleep(0.5)
        cpu0, t0 = lib.cpu_seconds(d.pid), time.monotonic()
        time.sleep(2)
        cpu = lib.cpu_seconds(d.pid) - cpu0
        wall = time.monotonic() - t0
        f.alive()
        assert cpu < 0.25 * wall, (f"superd used {cpu:.2f}s of CPU in {wall:.2f}s with a control "
                                  "connection pending while out of fds (busy loop)")
    finally:
        for s in conns:
            s.close()
        ctl.close()
    f.recovered()


def test_stalled_notify_reader_never_blocks_the_loop(faulty):
    """systemd reads NOTIFY_SOCKET, but may stall (PID 1 busy, stuck, being debugged): once the
    kernel queue (10 datagrams here) is full, a blocking sd_notify would hang superd, SIGTERM
    included. superd keeps serving, keeps what it could not send and sends it, in order and
    with the newest STATUS=, once systemd reads again; and it stops on SIGTERM at once."""
    f = faulty({"cat": {"exec": ["/bin/cat"]}})
    d = f.d
    d._drain_notify()
    for _ in range(8):  # each reload sends RELOADING=1, READY=1 and STATUS=: 24 > 10
        assert d.control("reload")["ok"] is True
    f.canaries()
    got = tcp_exchange("127.0.0.1", f.port("cat"), b"through a full notify queue\n", timeout=10)
    assert got == b"through a full notify queue\n"
    before = d.notify_index()  # systemd catches up: the rest follows within the retry interval
    last = d.wait_notify("READY=1", d.wait_notify("RELOADING=1", before) + 1)
    assert last >= before
    f.recovered()
    for _ in range(8):
        assert d.control("reload")["ok"] is True
    t0 = time.monotonic()
    assert d.stop(timeout=10) == 0
    assert time.monotonic() - t0 < 5, "SIGTERM waited for systemd to read its socket"


# --------------------------------------------------------------------------------------------
# superd itself killed


def listening_pair(port: int) -> tuple[socket.socket, socket.socket]:
    """What systemd would hold for superd.socket: a TCP listener and a UDP socket."""
    t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    t.bind(("127.0.0.1", port))
    t.listen(512)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", port))
    return t, u


class KillClients:
    """Threads doing cat round trips, each recording how it ended and when it connected."""

    def __init__(self, port: int, threads: int = 4, per_thread: int = 5000):
        self.port = port
        self.per_thread = per_thread
        self.stop = threading.Event()
        self.results: list[tuple[float, str, str]] = []  # (connect time, outcome, detail)
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]

    def run(self, i: int) -> None:
        for n in range(self.per_thread):
            if self.stop.is_set():
                return
            msg = f"client {i} #{n} {os.urandom(8).hex()}\n".encode() * 4
            t = time.monotonic()
            try:
                s = connect("127.0.0.1", self.port, timeout=30)
            except ConnectionRefusedError as e:
                outcome, detail = "refused", repr(e)
            except OSError as e:
                outcome, detail = "connect-error", repr(e)
            else:
                try:
                    s.sendall(msg)
                    s.shutdown(socket.SHUT_WR)
                    got = recv_until_eof(s, 30)
                    outcome = "ok" if got == msg else ("lost" if got == b"" else "wrong")
                    detail = f"{got[:60]!r}"
                except ConnectionResetError as e:
                    outcome, detail = "lost", repr(e)
                except (OSError, AssertionError) as e:
                    outcome, detail = "error", repr(e)
                finally:
                    s.close()
            with self.lock:
                self.results.append((t, outcome, detail))

    def count(self, outcome: str = "ok") -> int:
        with self.lock:
            return sum(1 for _, o, _ in self.results if o == outcome)

    def wait_more(self, n: int, timeout: float = 30) -> None:
        target = self.count() + n
        lib.wait_until(lambda: self.count() >= target, timeout, f"{n} more round trips")


def test_sigkill_under_socket_activation(new_daemon, request):
    """systemd holds the sockets; superd is SIGKILLed while clients keep connecting; a new
    superd gets the same sockets: no connection is refused, every one queued meanwhile is
    served, datagrams sent meanwhile are answered. Then the same across a clean stop."""
    long = rl.long_mode(request.config)
    kills = 6 if long else 2
    between = 150 if long else 30  # round trips between two kills
    port = free_port()
    tsock, usock = listening_pair(port)
    services = {"cat": {"exec": ["/bin/cat"]}, "echo-u": {"internal": "echo", "protocol": "udp"}}
    socks = [("cat", tsock), ("echo-u", usock)]
    clients = KillClients(port)
    daemons = [new_daemon().start(services, passed=socks, timeout=15)]
    assert tcp_exchange("127.0.0.1", port, b"first\n") == b"first\n"
    windows = []  # (from, to): no superd was running
    udp = []

    def datagrams(k: int) -> None:
        for i in range(5):
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            u.sendto(b"datagram %d %d" % (k, i), ("127.0.0.1", port))
            udp.append((u, b"datagram %d %d" % (k, i)))

    try:
        try:
            for t in clients.threads:
                t.start()
            for k in range(kills):
                clients.wait_more(between)
                old = daemons[-1]
                t_down = time.monotonic()
                old.proc.kill()
                old.proc.wait(10)
                old.expect_rc = -signal.SIGKILL
                datagrams(k)  # while no superd runs: they wait in the socket buffer ...
                time.sleep(0.5)  # ... and the clients' connections in the kernel's backlog
                new = new_daemon().start(services, passed=socks, timeout=15)
                windows.append((t_down, time.monotonic()))
                daemons.append(new)
                new.wait_log(r"^started: 2 services")
            clients.wait_more(between)
        finally:
            clients.stop.set()
            for t in clients.threads:
                t.join(60)
        # A clean stop (SIGTERM) must leave the sockets usable as well.
        assert daemons[-1].stop() == 0
        datagrams(kills)
        with connect("127.0.0.1", port) as s:  # queued: no superd runs
            s.sendall(b"after a clean stop\n")
            s.shutdown(socket.SHUT_WR)
            daemons.append(new_daemon().start(services, passed=socks, timeout=15))
            assert recv_until_eof(s, 10) == b"after a clean stop\n"
        for u, msg in udp:
            u.settimeout(10)
            got, _ = u.recvfrom(65536)
            assert got == msg
    finally:
        for u, _ in udp:
            u.close()
    results = list(clients.results)
    outcomes = {o for _, o, _ in results}
    bad = [r for r in results if r[1] != "ok"]
    queued = [r for r in results if any(a <= r[0] <= b for a, b in windows)]
    print("\nFIGURES", {"test": "sigkill-socket-activation", "kills": kills,
                        "connections": len(results), "ok": clients.count(),
                        "queued_while_down": len(queued), "datagrams_while_down": len(udp),
                        "not_ok": [r[1:] for r in bad]})
    assert "refused" not in outcomes and "connect-error" not in outcomes, bad
    assert queued and all(o == "ok" for _, o, _ in queued), (
        f"connections made while no superd ran were not all served: {queued}")
    # A connection the killed superd had accepted but not yet handed to its handler dies with
    # it (at most one per kill: superd hands each over before it accepts the next).
    assert len(bad) <= kills and all(o == "lost" for _, o, _ in bad), bad
    assert tcp_exchange("127.0.0.1", port, b"last\n") == b"last\n"
    assert daemons[-1].stop() == 0
    tsock.close()
    usock.close()


# The container fixture (systemd-nspawn booting a cached Debian root) belongs to
# tests/test_systemd.py; imported here it boots one container for this module as well.
try:
    from test_systemd import container  # noqa: F401 - a pytest fixture
except ImportError:  # pragma: no cover - the systemd tests are not there
    container = None


def _box_table(box, services: dict) -> None:
    doc = {"settings": {"shutdown_grace": 2}, "services": services}
    tmp = box.etc / "superd.yaml.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.chmod(0o644)
    os.replace(tmp, box.etc / "superd.yaml")


def _box_show(box, unit: str, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.mark.skipif(container is None, reason="tests/test_systemd.py (its container) is missing")
def test_sigkill_under_systemd_restart(container):  # noqa: F811
    """superd.service (Restart=on-failure) with superd.socket: SIGKILL the main process while
    clients keep connecting; systemd starts the next superd, which serves again; no connection
    is refused (systemd keeps the listening socket); the journal says what happened."""
    box = container
    kills = 3  # StartLimitBurst=5 per 10 s: more would make systemd give up, by design
    ps, ph = free_port(), free_port()
    _box_table(box, {"echo": {"internal": "echo"},
                     "hello": {"listen": f"127.0.0.1:{ph}", "exec": ["/bin/echo", "hello"]}})
    shipped = (lib.REPO / "systemd" / "superd.socket").read_text()
    unit = re.sub(r"^ListenStream=.*$", f"ListenStream=127.0.0.1:{ps}", shipped, flags=re.M)
    (box.units / "superd.socket").write_text(unit)
    box.run(["install", "-m", "0644", "/srv/superd-test/superd.socket",
             "/etc/systemd/system/superd.socket"])
    box.run(["systemctl", "daemon-reload"])
    results: list[tuple[float, str, str]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        for i in range(100000):
            if stop.is_set():
                return
            msg = f"client {k} #{i}\n".encode()
            t = time.monotonic()
            try:
                got = tcp_exchange("127.0.0.1", ps, msg, timeout=30)
                outcome = "ok" if got == msg else ("lost" if not got else "wrong")
                detail = repr(got[:40])
            except ConnectionRefusedError as e:
                outcome, detail = "refused", repr(e)
            except ConnectionResetError as e:
                outcome, detail = "lost", repr(e)
            except OSError as e:  # shutdown() on a connection the killed superd reset: lost
                outcome = "lost" if e.errno == errno.ENOTCONN else "error"
                detail = repr(e)
            except AssertionError as e:
                outcome, detail = "error", repr(e)
            results.append((t, outcome, detail))
            time.sleep(0.005)  # pacing, not waiting: ~150 connections/s per client

    def oks() -> int:
        return sum(1 for r in results if r[1] == "ok")

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(2)]
    pids = []
    try:
        box.run(["systemctl", "start", "superd.socket"])
        assert tcp_exchange("127.0.0.1", ps, b"first\n", timeout=20) == b"first\n"
        pids.append(int(_box_show(box, "superd.service", "MainPID")["MainPID"]))
        for t in threads:
            t.start()
        for k in range(kills):
            n = oks()
            lib.wait_until(lambda n=n: oks() >= n + 30, 20, "round trips before the kill")
            box.run(["kill", "-KILL", str(pids[-1])])

            def restarted(k=k):
                s = _box_show(box, "superd.service", "MainPID", "ActiveState", "SubState",
                              "NRestarts")
                return ((s["ActiveState"], s["SubState"]) == ("active", "running")
                        and int(s["MainPID"]) not in (0, *pids)
                        and int(s["NRestarts"]) >= k + 1 and int(s["MainPID"]))
            pids.append(lib.wait_until(restarted, 30, "superd restarted by systemd",
                                       interval=0.1))
            time.sleep(2.5)  # stay well inside StartLimitBurst=5 / StartLimitIntervalSec=10
        n = oks()
        lib.wait_until(lambda: oks() >= n + 30, 20, "round trips after the last restart")
        assert tcp_exchange("127.0.0.1", ph, b"") == b"hello\n"  # the bound services too
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # (not started when superd.socket never answered)
                t.join(60)
        journal = box.journal("-u", "superd.service", "-o", "cat")
        box.run(["systemctl", "stop", "superd.socket", "superd.service"], check=False)
        box.run(["systemctl", "reset-failed", "superd.service"], check=False)
        box.run(["rm", "-f", "/etc/systemd/system/superd.socket"], check=False)
        box.run(["systemctl", "daemon-reload"], check=False)
    bad = [r for r in results if r[1] != "ok"]
    print("\nFIGURES", {"test": "sigkill-systemd-restart", "kills": kills,
                        "connections": len(results), "ok": oks(), "not_ok": bad})
    assert not [r for r in bad if r[1] in ("refused", "wrong", "error")], bad
    # An echo session open in the killed superd dies with it: at most one per client per kill.
    assert len(bad) <= kills * len(threads), bad
    assert len(re.findall(r"status=9/KILL", journal)) >= kills, journal[-3000:]
    assert len(re.findall(r"^started: 2 services", journal, re.M)) >= kills + 1, journal[-3000:]
