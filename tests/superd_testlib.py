"""Helpers for the superd black-box tests.

Everything here drives superd from the outside, the way a user would: a YAML table on disk,
``python -m superd run -c TABLE`` as a subprocess, an sd_notify socket to learn when it is
ready, a private rsyslogd to read what it logs, and plain sockets / socat / nc as clients.

Every wait in this module is bounded by a deadline (and every loop by a count).
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# The checkout whose superd is tested (cwd of `python -m superd`); override to test another one.
REPO = Path(os.environ.get("SUPERD_TEST_SOURCE") or Path(__file__).resolve().parent.parent)
PY = sys.executable
NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900-01-01 to 1970-01-01 (RFC 868)

# Values put into the daemon's own environment that must never reach a handler.
LEAK_MARKER_NAME = "SUPERD_TEST_LEAK_MARKER"
LEAK_MARKER_VALUE = "leak-" + uuid.uuid4().hex
MARKER_PATH_DIR = "/opt/superd-test-marker-bin"
MARKER_HOME = "/tmp/superd-test-marker-home"

# Session-wide bookkeeping, checked at the end of the session (see check_session()).
ALL_DAEMONS: list[Superd] = []
ISSUES: list[str] = []
USED_PORTS: set[int] = set()
FINAL_CHECK = {"done": False}  # set by tests/test_zz_session.py
_PORT_LOCK = threading.Lock()
_rng = random.Random(os.getpid() ^ time.time_ns())


# --------------------------------------------------------------------------------------------
# waiting


def wait_until(pred, timeout: float, what: str, interval: float = 0.02):
    """Poll pred() until it returns something truthy; fail after `timeout` seconds."""
    end = time.monotonic() + timeout
    max_rounds = int(timeout / interval) + 50
    for _ in range(max_rounds):
        value = pred()
        if value:
            return value
        if time.monotonic() >= end:
            break
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --------------------------------------------------------------------------------------------
# ports


def _can_bind(family: int, kind: int, addr: str, port: int, v6only: bool | None = None) -> bool:
    s = socket.socket(family, kind)
    try:
        if v6only is not None:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        s.bind((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def port_is_free(port: int) -> bool:
    """True when `port` can be bound on 127.0.0.1, ::1 and the wildcards, TCP and UDP."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        if not _can_bind(socket.AF_INET, kind, "127.0.0.1", port):
            return False
        if not _can_bind(socket.AF_INET6, kind, "::1", port):
            return False
        if not _can_bind(socket.AF_INET, kind, "0.0.0.0", port):
            return False
        if not _can_bind(socket.AF_INET6, kind, "::", port, v6only=False):
            return False
    return True


# Test ports: below the kernel's ephemeral range, so client sockets don't collide with them.
# SUPERD_TEST_PORTS=LOW-HIGH keeps two suites that run at once on one machine apart.
PORT_RANGE = tuple(int(x) for x in os.environ.get("SUPERD_TEST_PORTS", "20000-32000").split("-"))


def free_port() -> int:
    """A TCP+UDP port free on 127.0.0.1 and ::1, never handed out before in this session."""
    with _PORT_LOCK:
        for _ in range(500):
            port = _rng.randint(*PORT_RANGE)
            if port in USED_PORTS:
                continue
            if port_is_free(port):
                USED_PORTS.add(port)
                return port
    raise RuntimeError("no free port found in 500 tries")


def free_low_udp_port() -> int:
    """A privileged (<1024) UDP port free on 127.0.0.1, for the anti ping-pong test."""
    for _ in range(300):
        port = _rng.randint(600, 1023)
        if _can_bind(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", port):
            return port
    raise RuntimeError("no free low UDP port")


def _proc_net_ports(path: str, want_state: str) -> set[int]:
    return {port for port, _ in _proc_net_sockets(path, want_state)}


def _proc_net_sockets(path: str, want_state: str) -> list[tuple[int, int]]:
    """(port, inode) of the sockets in `path` (/proc/net/tcp etc.) in state `want_state`."""
    out = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()[1:]
    except FileNotFoundError:
        return out
    for line in lines:
        parts = line.split()
        if len(parts) >= 10 and parts[3] == want_state:
            out.append((int(parts[1].rsplit(":", 1)[1], 16), int(parts[9])))
    return out


def _socket_holders(inodes: set[int]) -> dict[int, set[int]]:
    """{inode: pids holding it}, from /proc/*/fd (bounded by the number of processes)."""
    holders: dict[int, set[int]] = {i: set() for i in inodes}
    wanted = {f"socket:[{i}]": i for i in inodes}
    for entry in os.listdir("/proc")[:100000]:
        if not entry.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds[:100000]:
            try:
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if target in wanted:
                holders[wanted[target]].add(int(entry))
    return holders


def _ancestors(pid: int) -> set[int]:
    seen: set[int] = set()
    for _ in range(200):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if ppid <= 1 or ppid in seen:
            break
        seen.add(ppid)
        pid = ppid
    return seen


def leftover_ports(ports: set[int], known_pids: set[int]) -> dict[str, dict[int, set[int]]]:
    """Ports of `ports` still listening (tcp) or bound (udp) by a process of this session.

    A process counts as this session's when it is in `known_pids` (daemons, handlers) or
    descends from this pytest process; sockets of other, concurrent test runs that happen to
    reuse a port later are not ours to judge.
    """
    found: dict[str, dict[int, set[int]]] = {}
    me = os.getpid()
    for kind, files, state in (("tcp", ("/proc/net/tcp", "/proc/net/tcp6"), "0A"),
                               ("udp", ("/proc/net/udp", "/proc/net/udp6"), "07")):
        socks = [(p, i) for f in files for p, i in _proc_net_sockets(f, state) if p in ports]
        if not socks:
            continue
        holders = _socket_holders({i for _, i in socks})
        for port, inode in socks:
            ours = {pid for pid in holders.get(inode, set())
                    if pid in known_pids or pid == me or me in _ancestors(pid)}
            if ours:
                found.setdefault(kind, {}).setdefault(port, set()).update(ours)
    return found


def listening_tcp_ports() -> set[int]:
    return _proc_net_ports("/proc/net/tcp", "0A") | _proc_net_ports("/proc/net/tcp6", "0A")


def bound_udp_ports() -> set[int]:
    return _proc_net_ports("/proc/net/udp", "07") | _proc_net_ports("/proc/net/udp6", "07")


# --------------------------------------------------------------------------------------------
# clients


def family_of(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def connect(host: str, port: int, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(family_of(host), socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except BaseException:
        s.close()
        raise
    return s


def connect_unix(path: str | Path, timeout: float = 5.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except BaseException:
        s.close()
        raise
    return s


def recv_exact(s: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """Read exactly n bytes (fails on EOF or deadline)."""
    end = time.monotonic() + timeout
    buf = bytearray()
    for _ in range(n + 10):
        if len(buf) >= n:
            break
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"deadline: got {len(buf)} of {n} bytes: {bytes(buf[:200])!r}")
        s.settimeout(left)
        chunk = s.recv(min(65536, n - len(buf)))
        if not chunk:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes: {bytes(buf[:200])!r}")
        buf += chunk
    return bytes(buf)


def recv_until_eof(s: socket.socket, timeout: float = 5.0, limit: int = 16 << 20) -> bytes:
    """Read until the peer closes (fails on deadline or when more than `limit` arrives)."""
    end = time.monotonic() + timeout
    buf = bytearray()
    for _ in range(100000):
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"deadline: no EOF after {len(buf)} bytes: {bytes(buf[:200])!r}")
        s.settimeout(left)
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            raise AssertionError(f"more than {limit} bytes without EOF")
    return bytes(buf)


def tcp_exchange(host: str, port: int, data: bytes, *, expect_len: int | None = None,
                 half_close: bool = True, timeout: float = 5.0) -> bytes:
    """Connect, send data (and half-close unless told not to), read expect_len bytes or to EOF."""
    with connect(host, port, timeout) as s:
        if data:
            s.sendall(data)
        if expect_len is not None:
            return recv_exact(s, expect_len, timeout)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s, timeout)


def udp_request(host: str, port: int, data: bytes, timeout: float = 3.0,
                bind: tuple | None = None) -> tuple[bytes, tuple] | None:
    """Send one datagram, return (reply, sender) or None when nothing came within `timeout`."""
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as s:
        if bind is not None:
            s.bind(bind)
        s.settimeout(timeout)
        s.sendto(data, (host, port))
        try:
            return s.recvfrom(65536)
        except TimeoutError:
            return None


def connection_refused(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        s = connect(host, port, timeout)
    except ConnectionRefusedError:
        return True
    s.close()
    return False


def write_script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def python_script(path: Path, body: str) -> Path:
    """An executable python script using the test interpreter (no venv activation needed)."""
    return write_script(path, f"#!{PY}\n{body}")


# --------------------------------------------------------------------------------------------
# the control socket


def control(path: str | Path, command: str = "status", timeout: float = 5.0) -> str:
    """Send one command on a control socket and return the answer's text (JSON): what
    superd/control.py's client does, spelled out so a test can also ask as another user.
    PermissionError when the socket's mode keeps the caller from connecting."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(command.encode() + b"\n")
        return recv_until_eof(s, timeout, limit=1 << 20).decode()


def status(d: Superd) -> dict:
    """`superd status --json -c TABLE`, the command an admin runs: it finds the control socket
    through the table on disk (so it follows a moved socket), unlike Superd.control()."""
    r = subprocess.run([PY, "-m", "superd", "status", "--json", "-c", str(d.table)], cwd=REPO,
                       env=daemon_env(), capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, f"superd status exited {r.returncode}: {r.stderr}"
    return json.loads(r.stdout)


# --------------------------------------------------------------------------------------------
# processes


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the comm field: state is fields[0], utime is stat field 14 -> fields[11]
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def high_fd(sock: socket.socket, at_least: int = 50) -> int:
    """A duplicate of sock's fd, numbered `at_least` or above (moving it to 3.. clobbers none)."""
    return fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, at_least)


def listen_fds_command(fds: list[int], argv: list[str]) -> list[str]:
    """`argv` with `fds` moved to 3.. and LISTEN_PID set to the pid that becomes `argv`, as
    systemd passes sockets. bash, not sh: dash takes single-digit fds only; `exec` keeps the
    pid, so LISTEN_PID=$$ names the program it becomes."""
    moves = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(fds))
    return ["bash", "-c", f'exec {moves}; LISTEN_PID=$$ exec "$0" "$@"', *argv]


# --------------------------------------------------------------------------------------------
# rsyslogd


LOG_RE = re.compile(r"^(?P<ts>\S+) sender=(?P<sender>\d*) (?P<tag>[^\s:]*):? ?(?P<msg>.*)$")
TAG_RE = re.compile(r"^(?P<name>[^\[]*)(?:\[(?P<pid>\d+)\])?$")


@dataclass
class LogLine:
    raw: str
    sender: int | None  # pid from SCM_CREDENTIALS (who really wrote to the socket)
    ident: str
    tag_pid: int | None  # pid written in the tag, ident[PID]
    msg: str


def parse_log_line(raw: str) -> LogLine | None:
    m = LOG_RE.match(raw)
    if not m:
        return None
    t = TAG_RE.match(m["tag"]) or None
    ident = t["name"] if t else m["tag"]
    tag_pid = int(t["pid"]) if t and t["pid"] else None
    sender = int(m["sender"]) if m["sender"] else None
    return LogLine(raw, sender, ident, tag_pid, m["msg"])


class Rsyslog:
    """A private rsyslogd: imuxsock on DIR/log.sock, every message into DIR/out.log (with the
    sender's pid, for the tests) and DIR/syslog (as Debian's /var/log/syslog has it, for log
    watchers such as fail2ban)."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.sock = directory / "log.sock"
        self.out = directory / "out.log"
        self.syslog_file = directory / "syslog"
        self.conf = directory / "rsyslog.conf"
        self.pidfile = directory / "rsyslogd.pid"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""\
global(workDirectory="{self.dir}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{self.sock}" CreatePath="on" RateLimit.Interval="0"
      Annotate="on" ParseTrusted="on")
template(name="superdtest" type="list") {{
  property(name="timegenerated" dateFormat="rfc3339")
  constant(value=" sender=")
  property(name="$!pid")
  constant(value=" ")
  property(name="syslogtag")
  property(name="msg" spIfNo1stSp="on")
  property(name="msg" dropLastLf="on")
  constant(value="\\n")
}}
*.* action(type="omfile" file="{self.out}" template="superdtest" flushOnTXEnd="on")
*.* action(type="omfile" file="{self.syslog_file}" template="RSYSLOG_TraditionalFileFormat"
           flushOnTXEnd="on")
""")
        check = subprocess.run([exe, "-N1", "-f", str(self.conf)], capture_output=True,
                               text=True, timeout=20)
        assert check.returncode == 0, f"rsyslogd config check failed: {check.stderr}"
        self._stderr = open(self.dir / "rsyslogd.stderr", "wb")
        self.proc = subprocess.Popen([exe, "-n", "-f", str(self.conf), "-i", str(self.pidfile)],
                                     stdin=subprocess.DEVNULL, stdout=self._stderr,
                                     stderr=self._stderr, start_new_session=True)
        wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 10,
                   "rsyslogd socket")
        assert self.proc.poll() is None, "rsyslogd exited: " + (
            self.dir / "rsyslogd.stderr").read_text()
        # Make sure it writes: a probe line must arrive in out.log.
        probe = "superd-test-probe-" + uuid.uuid4().hex
        subprocess.run(["logger", "-u", str(self.sock), "-t", "probe", probe], timeout=10,
                       check=True)
        wait_until(lambda: self.out.exists() and probe in self.out.read_text(), 10,
                   "rsyslogd probe line")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_stderr", None):
            self._stderr.close()

    def size(self) -> int:
        try:
            return self.out.stat().st_size
        except FileNotFoundError:
            return 0

    def lines(self, offset: int = 0) -> list[LogLine]:
        try:
            with open(self.out, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for raw in data.decode("utf-8", "replace").splitlines():
            ll = parse_log_line(raw)
            if ll is not None:
                out.append(ll)
        return out


# --------------------------------------------------------------------------------------------
# the daemon


EVENT_RE = re.compile(r"((?:START|EXIT|FAIL|BACKOFF): .*)$")
START_RE = re.compile(r"^START: (?P<svc>\S+) pid=(?P<pid>\d+) from=(?P<ip>\S*)")
EXIT_RE = re.compile(r"^EXIT: (?P<svc>\S+) status=(?P<status>-?\d+) pid=(?P<pid>\d+) "
                     r"duration=(?P<dur>[\d.]+)\(sec\)")
FAIL_RE = re.compile(r"^FAIL: (?P<svc>\S+) (?P<reason>\S+)(?: from=(?P<ip>\S*))?")


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A small, known environment for the daemon, with markers that must not reach handlers."""
    env = {
        "PATH": MARKER_PATH_DIR + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": MARKER_HOME,
        LEAK_MARKER_NAME: LEAK_MARKER_VALUE,
    }
    if extra:
        env.update(extra)
    return env


def proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data.rsplit(")", 1)[1].split()[0]


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children, ...), sorted."""
    out, todo = [], [pid]
    for _ in range(100000):
        if not todo:
            break
        p = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return sorted(out)


def _cmdline_has(pid: int, *parts: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return False
    return any(part in cmdline for part in parts)


def is_spawner(pid: int) -> bool:
    """Is `pid` one of superd's spawner processes (superd/spawner.py), not a handler?"""
    return _cmdline_has(pid, b"superd/spawner.py")


def is_helper(pid: int) -> bool:
    """One of superd's helper processes: a spawner, or a python service's host."""
    return _cmdline_has(pid, b"superd/spawner.py", b"superd/pyhost.py")


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    st = proc_state(pid)
    return st is not None and st != "Z"


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def ticks_now() -> int:
    with open("/proc/uptime") as f:
        return int(float(f.read().split()[0]) * os.sysconf("SC_CLK_TCK")) + 1


def started_by(pid: int, sid: int, since: int, until: int) -> bool:
    """`pid` is alive and still a handler the daemon of session `sid` started: in that
    session (the tests start superd in a session of its own) or leading one of its own (as
    superd starts every handler), and started while the daemon ran, so not another process
    that reused the pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return (fields[0] != "Z" and int(fields[3]) in (sid, pid)
            and since <= int(fields[19]) <= until)


@dataclass
class Superd:
    """One superd daemon under test."""

    workdir: Path
    syslog: Rsyslog | None
    test_id: str = "?"
    proc: subprocess.Popen | None = None
    notifications: list[tuple[float, list[str]]] = field(default_factory=list)
    # fds that came with a notification (FDSTORE=1, only sent under INVOCATION_ID), by its
    # index, when keep_notify_fds is set (the test then closes them); else closed at once
    notify_fds: dict[int, list[int]] = field(default_factory=dict)
    keep_notify_fds: bool = False
    log_offset: int = 0
    stopped_rc: int | None = None
    expect_rc: int = 0  # the exit status superd must end with (0 after SIGTERM)
    started_ticks: int = 0  # when the daemon process started (clock ticks since boot)
    # argv run in front of `python -m superd` (a program that execs the rest, keeping the pid:
    # dns_lib.private_etc runs superd in a mount namespace of its own)
    prefix: list[str] = field(default_factory=list)
    # the interpreter and the source folder superd runs from (`python -m superd`, in there):
    # another user's superd needs both where that user may read them (test_nonroot.py)
    python: str = PY
    source: Path = REPO

    def __post_init__(self):
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.table = self.workdir / "superd.yaml"
        self.ctl = self.workdir / "ctl.sock"
        self.notify_path = self.workdir / "notify.sock"
        self.stdout_path = self.workdir / "superd.stdout"
        self.stderr_path = self.workdir / "superd.stderr"
        assert len(str(self.notify_path)) < 100, f"path too long for AF_UNIX: {self.notify_path}"
        self.notify_sock: socket.socket | None = None
        ALL_DAEMONS.append(self)

    # ---- table

    def default_settings(self) -> dict:
        s: dict = {"control_socket": str(self.ctl), "shutdown_grace": 2}
        if self.syslog is not None:
            s["syslog"] = {"address": str(self.syslog.sock)}
        return s

    def table_text(self, services: dict, settings: dict | None = None,
                   defaults: dict | None = None) -> str:
        st = self.default_settings()
        st.update(settings or {})
        doc: dict = {"settings": st}
        if defaults:
            doc["defaults"] = defaults
        doc["services"] = services
        return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)

    def write_table(self, services: dict | None = None, *, text: str | None = None,
                    settings: dict | None = None, defaults: dict | None = None) -> Path:
        if text is None:
            assert services is not None
            text = self.table_text(services, settings, defaults)
        tmp = self.table.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.chmod(0o644)
        os.replace(tmp, self.table)
        return self.table

    # ---- process

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, services: dict | None = None, *, text: str | None = None,
              settings: dict | None = None, defaults: dict | None = None,
              env: dict[str, str] | None = None, passed: list[tuple[str, socket.socket]] = (),
              prefix: list[str] = (), wait_ready: bool = True, timeout: float = 10.0) -> Superd:
        """Write the table (if given) and run `python -m superd run -c TABLE`.

        `passed`: (name, socket) pairs handed over as systemd's socket activation does (on fds
        3.., LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID), the test keeping its own copies.
        `prefix`: a command superd runs under, e.g. [prlimit, --nofile=64:64, --] (by default
        the daemon's own `prefix`).
        """
        if services is not None or text is not None:
            self.write_table(services, text=text, settings=settings, defaults=defaults)
        prefix = list(prefix) or self.prefix
        argv = [*prefix, self.python, "-m", "superd", "run", "-c", str(self.table)]
        if prefix:
            argv[0] = shutil.which(argv[0]) or argv[0]
        copies = [high_fd(sock) for _, sock in passed]
        try:
            if passed:
                env = {**(env or {}), "LISTEN_FDS": str(len(passed)),
                       "LISTEN_FDNAMES": ":".join(name for name, _ in passed)}
                argv = listen_fds_command(copies, argv)
            self.launch(argv, pass_fds=tuple(copies), env=env)
        finally:
            for fd in copies:
                os.close(fd)
        if wait_ready:
            self.wait_notify("READY=1", 0, timeout)
        return self

    def launch(self, argv: list[str], pass_fds: tuple[int, ...] = (),
               env: dict[str, str] | None = None) -> Superd:
        """Run `argv`, which is or becomes superd (keeping its pid), the way every start does:
        a fresh NOTIFY_SOCKET, the test environment, stdout/stderr into the daemon's files.
        Teardown (finish()) then stops it and checks for zombies and leftover handlers."""
        if self.notify_sock is not None:
            self.notify_sock.close()
        if self.notify_path.exists():
            self.notify_path.unlink()
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.bind(str(self.notify_path))
        self.notify_sock.setblocking(False)
        self.notifications.clear()
        full_env = daemon_env(env)
        full_env["NOTIFY_SOCKET"] = str(self.notify_path)
        self.log_offset = self.syslog.size() if self.syslog else 0
        self.close_output()
        self._out = open(self.stdout_path, "wb")
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=self.source, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=self._out, stderr=self._err, pass_fds=pass_fds,
                                     start_new_session=True)
        self.started_ticks = start_ticks(self.proc.pid) or 0
        return self

    def control(self, command: str = "status", timeout: float = 5.0) -> dict:
        """One command on the daemon's control socket (settings.control_socket as started)."""
        return json.loads(control(self.ctl, command, timeout))

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _drain_notify(self) -> None:
        if self.notify_sock is None:
            return
        for _ in range(10000):
            try:
                data, anc, _, _ = self.notify_sock.recvmsg(65536, socket.CMSG_SPACE(4 * 64))
            except (BlockingIOError, InterruptedError):
                return
            fds = [fd for level, kind, payload in anc
                   if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS
                   for fd in array.array("i", payload[:len(payload) - len(payload) % 4])]
            if fds and self.keep_notify_fds:
                self.notify_fds[len(self.notifications)] = fds
            else:
                for fd in fds:
                    os.close(fd)
            self.notifications.append((time.monotonic(), data.decode(errors="replace").split("\n")))

    def notify_index(self) -> int:
        self._drain_notify()
        return len(self.notifications)

    def wait_notify(self, item: str, start: int = 0, timeout: float = 10.0) -> int:
        """Wait for a notification holding `item` (e.g. READY=1) at index >= start; return index."""
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.01) + 100):
            self._drain_notify()
            for i in range(start, len(self.notifications)):
                if item in self.notifications[i][1]:
                    return i
            if self.proc is not None and self.proc.poll() is not None:
                self._drain_notify()
                raise AssertionError(
                    f"superd exited with {self.proc.returncode} before {item}\n"
                    f"--- stderr ---\n{self.stderr_text()}\n--- stdout ---\n{self.stdout_text()}")
            if time.monotonic() >= end:
                break
            time.sleep(0.01)
        raise AssertionError(
            f"no {item} from superd within {timeout}s; got {self.notifications[start:]}\n"
            f"--- stderr ---\n{self.stderr_text()[-4000:]}")

    def reload(self, services: dict | None = None, *, text: str | None = None,
               settings: dict | None = None, wait: bool = True, timeout: float = 10.0) -> None:
        """Optionally rewrite the table, send SIGHUP, wait for RELOADING=1 then READY=1."""
        if services is not None or text is not None:
            self.write_table(services, text=text, settings=settings)
        idx = self.notify_index()
        self.proc.send_signal(signal.SIGHUP)
        if wait:
            r = self.wait_notify("RELOADING=1", idx, timeout)
            self.wait_notify("READY=1", r + 1, timeout)

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"superd did not exit within {timeout}s of SIGTERM") from None
        self._drain_notify()
        self.stopped_rc = rc
        return rc

    # ---- children

    def children(self) -> list[int]:
        pids: list[int] = []
        try:
            tasks = os.listdir(f"/proc/{self.pid}/task")
        except FileNotFoundError:
            return pids
        for t in tasks:
            try:
                with open(f"/proc/{self.pid}/task/{t}/children") as f:
                    pids += [int(x) for x in f.read().split()]
            except (FileNotFoundError, ProcessLookupError):
                pass
        return pids

    def handlers(self) -> list[int]:
        """Handler processes: superd's children and its helpers' children, not the helpers."""
        out: list[int] = []
        for pid in self.children():
            if is_helper(pid):
                out += _children_of(pid)
            else:
                out.append(pid)
        return out

    def zombie_children(self) -> list[int]:
        return [p for p in self.children() if proc_state(p) == "Z"]

    # ---- logs

    def syslog_lines(self) -> list[LogLine]:
        """rsyslog lines written by this daemon (ident[PID] or the sending pid is the daemon)."""
        if self.syslog is None or self.proc is None:
            return []
        return [ll for ll in self.syslog.lines(self.log_offset)
                if ll.tag_pid == self.pid or ll.sender == self.pid]

    def all_syslog_lines(self) -> list[LogLine]:
        """Every rsyslog line since this daemon started (whoever sent it)."""
        if self.syslog is None:
            return []
        return self.syslog.lines(self.log_offset)

    def lines(self) -> list[str]:
        """This daemon's log messages: from syslog, or from its stderr when syslog has none."""
        msgs = [ll.msg for ll in self.syslog_lines()]
        if msgs:
            return msgs
        out = []
        for raw in self.stderr_text().splitlines():
            m = EVENT_RE.search(raw)
            out.append(m.group(1) if m else raw)
        return out

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[re.Match]:
        rx = re.compile(pattern)

        def found():
            ms = [m for m in (rx.search(line) for line in self.lines()) if m]
            return ms if len(ms) >= count else None

        try:
            return wait_until(found, timeout, f"log /{pattern}/ x{count}", interval=0.05)
        except AssertionError:
            raise AssertionError(
                f"no {count} log line(s) matching /{pattern}/ within {timeout}s; daemon lines:\n"
                + "\n".join(self.lines()[-60:])) from None

    def starts(self, service: str) -> list[re.Match]:
        return [m for m in (START_RE.match(x) for x in self.lines()) if m and m["svc"] == service]

    def exits(self, service: str) -> list[re.Match]:
        return [m for m in (EXIT_RE.match(x) for x in self.lines()) if m and m["svc"] == service]

    def wait_start(self, service: str, count: int = 1, timeout: float = 5.0) -> list[re.Match]:
        return self.wait_log(rf"^START: {re.escape(service)} pid=(?P<pid>\d+) from=(?P<ip>\S*)",
                             timeout, count)

    def wait_exit(self, service: str, pid: int | None = None, timeout: float = 5.0,
                  count: int = 1) -> list[re.Match]:
        pidpart = str(pid) if pid is not None else r"\d+"
        pat = rf"^EXIT: {re.escape(service)} status=(?P<status>-?\d+) pid={pidpart} "
        return self.wait_log(pat, timeout, count)

    # ---- teardown

    def handler_pids(self) -> set[int]:
        """Pids of the handlers this daemon logged START lines for."""
        if self.proc is None:
            return set()
        return {int(m["pid"]) for m in (START_RE.match(x) for x in self.lines())
                if m and int(m["pid"]) > 0}

    def finish(self) -> None:
        """Check for zombies, stop, check exit status and leftover handlers; record problems."""
        if self.proc is None:
            return
        handler_pids = self.handler_pids()
        if self.proc.poll() is None:
            try:
                wait_until(lambda: not self.zombie_children(), 3.0, "zombies reaped")
            except AssertionError:
                ISSUES.append(f"{self.test_id}: zombie children left under superd "
                              f"pid {self.pid}: {self.zombie_children()}")
            try:
                self.stop()
            except AssertionError as e:
                ISSUES.append(f"{self.test_id}: {e}")
        rc = self.proc.returncode
        if rc != self.expect_rc:
            ISSUES.append(f"{self.test_id}: superd exited {rc} (expected {self.expect_rc}); "
                          f"stderr tail: {self.stderr_text()[-800:]!r}")
        # Handlers must not outlive the daemon by more than its grace period. A pid counts only
        # while it is in superd's session: the pids of START lines wrap over a long test run.
        survivors = []
        sid = self.pid
        since = self.started_ticks
        until = ticks_now()
        for pid in handler_pids:
            try:
                wait_until(lambda p=pid: not started_by(p, sid, since, until), 5.0,
                           f"handler {pid} gone")
            except AssertionError:
                survivors.append(pid)
        if survivors:
            ISSUES.append(f"{self.test_id}: handler processes survived superd: {survivors}")
            for pid in survivors:  # clean up what this test caused
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        self.close_files()

    def close_files(self) -> None:
        """Close the notify socket and the daemon's captured stdout/stderr files."""
        if self.notify_sock is not None:
            self.notify_sock.close()
            self.notify_sock = None
        self.close_output()

    def close_output(self) -> None:
        for f in (getattr(self, "_out", None), getattr(self, "_err", None)):
            if f:
                f.close()


def check_session() -> list[str]:
    """Problems left at the end of the session: live daemons, recorded issues, open ports."""
    problems = list(ISSUES)
    for d in ALL_DAEMONS:
        if d.proc is not None and d.proc.poll() is None:
            problems.append(f"{d.test_id}: superd pid {d.pid} still running")
    known: set[int] = set()
    for d in ALL_DAEMONS:
        if d.proc is not None:
            known.add(d.pid)
            known |= d.handler_pids()
    for kind, ports in leftover_ports(set(USED_PORTS), known).items():
        problems.append(f"test ports still {'listening' if kind == 'tcp' else 'bound'} "
                        f"({kind}): " + ", ".join(f"{p} (pids {sorted(pids)})"
                                                  for p, pids in sorted(ports.items())))
    return problems


def is_errno(exc: BaseException, *codes: int) -> bool:
    return isinstance(exc, OSError) and exc.errno in codes


__all__ = [name for name in dir() if not name.startswith("_")] + ["errno"]
