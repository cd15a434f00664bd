"""A root daemon facing the internet (issue 16): what a handler inherits, what a client or a
spoofed datagram can make superd do.

Each test reproduces one finding from the outside: the daemon as a subprocess, real sockets,
real handlers that look at their own /proc entry and report what they see.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import reliability_lib as rl
import superd_testlib as lib
from superd_testlib import free_port, tcp_exchange, write_script

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")

# A handler that says what it inherited: its session, its terminal, its signals.
REPORT = """\
#!/bin/sh
# What the handler itself got ($$ is this very process: the script is the handler). A shell,
# not python: python ignores SIGPIPE and SIGXFSZ itself at start-up. Its signals are read
# first, by builtins alone: while the shell forks a command it blocks every signal itself.
while read -r key value; do
  case "$key" in SigIgn:) echo "ignored $value";; SigBlk:) echo "blocked $value";; esac
done < /proc/$$/status
set -- $(cat /proc/$$/stat)
[ "$6" = "$$" ] && echo "sid True" || echo "sid False"
if (: <>/dev/tty) 2>/dev/null; then echo "tty opened"; else echo "tty refused"; fi
"""


def report(text: bytes) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in text.decode().splitlines() if " " in line)


# Started in the foreground on a terminal, as the README's first command is: a wrapper gives
# superd a pseudo-terminal as its controlling terminal, ignores and blocks a few signals as a
# careless parent would, and execs superd.
CTTY_WRAPPER = """\
import fcntl, os, pty, signal, sys, termios
master, slave = os.openpty()
os.set_inheritable(master, True)  # keep the terminal alive while superd runs
fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
os.dup2(slave, 0)
for sig in (signal.SIGQUIT, signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTOU, signal.SIGHUP,
            signal.SIGALRM):
    signal.signal(sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGWINCH])
os.execv(sys.argv[1], sys.argv[1:])
"""


@needs_root
def test_handlers_have_no_terminal_and_default_signals(new_daemon):
    """Finding 2 and 13: every handler starts in its own session without superd's terminal
    (a `user: nobody` handler could push keystrokes into root's shell with TIOCSTI), with
    every signal at its default and none blocked, whatever superd's parent left it."""
    script = write_script(rl.world_dir("superd-report-") / "report", REPORT)
    d = new_daemon()
    (d.workdir / "report_py.py").write_text(
        "import os, subprocess\n"
        "def handle(sock, env):\n"  # the report of this very process: exec into the script
        f"    os.dup2(sock.fileno(), 1)\n"
        f"    os.execv({str(script)!r}, [{str(script)!r}])\n")
    ports = {name: free_port() for name in ("spawner", "forked", "python")}
    services = {
        "spawner": {"listen": f"127.0.0.1:{ports['spawner']}", "exec": [str(script)],
                    "user": "nobody"},
        "forked": {"listen": f"127.0.0.1:{ports['forked']}", "exec": [str(script)],
                   "user": "nobody", "nice": 1},  # nice: forked by the loop itself
        "python": {"listen": f"127.0.0.1:{ports['python']}", "python": "report_py.py:handle"},
    }
    d.write_table(services)
    d.start(prefix=[sys.executable, "-c", CTTY_WRAPPER])
    for name, port in ports.items():
        seen = report(tcp_exchange("127.0.0.1", port, b""))
        assert seen.get("sid") == "True", (name, seen)
        assert seen.get("tty") == "refused", (name, seen)
        assert seen.get("ignored") == "0000000000000000", (name, seen)
        assert seen.get("blocked") == "0000000000000000", (name, seen)


def test_usr1_logs_the_status_usr2_and_quit_do_not_kill(superd):
    """Finding 13: SIGUSR1, SIGUSR2 and SIGQUIT must not kill superd; SIGUSR1 writes what
    `superd status` shows into the log, as xinetd's state dump does; SIGUSR2 upgrades in
    place (tests/test_upgrade.py), and a SIGQUIT sent right after it is not lost over the
    exec."""
    port = free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    assert tcp_exchange("127.0.0.1", port, b"a\n", expect_len=2) == b"a\n"
    d.proc.send_signal(signal.SIGUSR1)
    d.wait_log(r"^status: echo accepted=1 active=[01] refused=0 last_exit=None paused=-$")
    for sig in (signal.SIGUSR2, signal.SIGQUIT):
        d.proc.send_signal(sig)
    d.wait_log(r"SIGQUIT ignored")
    d.wait_log(rf"^upgraded: pid {d.pid}, ")
    assert d.proc.poll() is None
    assert tcp_exchange("127.0.0.1", port, b"b\n", expect_len=2) == b"b\n"


def test_python_handler_in_its_own_session(new_daemon):
    """A python handler too leads a session of its own (the loop forks it)."""
    d = new_daemon()
    (d.workdir / "sid.py").write_text(
        "import os\n"
        "def handle(sock, env):\n"
        "    sock.sendall(b'%d %d' % (os.getsid(0), os.getpid()))\n")
    port = free_port()
    d.start({"py": {"listen": f"127.0.0.1:{port}", "python": "sid.py:handle"}})
    sid, pid = tcp_exchange("127.0.0.1", port, b"").split()
    assert sid == pid


@needs_root
def test_exec_failure_as_another_user_says_why(superd):
    """With `user:` set, CPython's fork_exec forks instead of using vfork, so the child may
    still be writing its failure when the spawner first reads: the whole reason is read."""
    script = write_script(rl.world_dir("superd-noexec-") / "secret", "#!/bin/sh\necho no\n")
    script.chmod(0o700)  # root's only: nobody may not execute it
    port = free_port()
    d = superd({"noexec": {"listen": f"127.0.0.1:{port}", "exec": [str(script)],
                           "user": "nobody"}})
    assert tcp_exchange("127.0.0.1", port, b"") == b""
    d.wait_log(rf"^noexec: cannot start handler: exec {script}: execve: Permission denied$")
    d.wait_log(r"^FAIL: noexec exec from=127\.0\.0\.1$")


@pytest.mark.parametrize("where,entry", [
    ("exec", {"exec": ["/bin/echo", "a\0b"]}),
    ("env", {"exec": ["/bin/cat"], "env": {"SECRET": "a\0b"}}),
    ("user", {"exec": ["/bin/cat"], "user": "nobody\0x"}),
], ids=["exec-argument", "env-value", "user"])
def test_nul_bytes_are_refused_at_load(new_daemon, where, entry):
    """Finding 5: a NUL byte in an `env` value or an `exec` argument passed `superd check`;
    each connection then killed a spawner. Now it is a table error with its line."""
    d = new_daemon()
    d.write_table({"nul": {"listen": f"127.0.0.1:{free_port()}", **entry}})
    out = subprocess.run([lib.PY, "-m", "superd", "check", "-c", str(d.table)], cwd=lib.REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1, out.stdout
    assert re.match(rf"^{re.escape(str(d.table))}:\d+: services\.nul\.{where}: .*NUL byte",
                    out.stdout), out.stdout


# -- out of file descriptors ------------------------------------------------------------------

def _hold_echo(port: int, count: int) -> tuple[list[socket.socket], int]:
    """Open `count` echo connections and keep them idle; how many the daemon serves."""
    held, served = [], 0
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", port), timeout=2)
        held.append(s)
        s.sendall(b"x")
        try:
            if s.recv(1) == b"x":
                served += 1
        except (TimeoutError, ConnectionResetError):
            pass
    return held, served


def _services(ports: dict[str, int], d: lib.Superd) -> dict:
    (d.workdir / "py.py").write_text("def handle(sock, env):\n    sock.sendall(b'py\\n')\n")
    return {"echo": {"listen": f"127.0.0.1:{ports['echo']}", "internal": "echo"},
            "cat": {"listen": f"127.0.0.1:{ports['cat']}", "exec": ["/bin/echo", "cat"]},
            "py": {"listen": f"127.0.0.1:{ports['py']}", "python": "py.py:handle"},
            # nice: forked by superd itself, through an exec-status pipe (one more fd)
            "nice": {"listen": f"127.0.0.1:{ports['nice']}", "exec": ["/bin/echo", "nice"],
                     "nice": 1}}


def test_idle_sessions_cannot_take_every_fd(new_daemon):
    """Finding 1: in-loop sessions have a cap (by default half the fds superd may open), so
    idle echo clients leave the fds exec and python handlers need."""
    ports = {name: free_port() for name in ("echo", "cat", "py", "nice")}
    d = new_daemon()
    d.write_table(_services(ports, d))
    d.start(prefix=["prlimit", "--nofile=64:64"])
    held, served = _hold_echo(ports["echo"], 40)
    try:
        assert served == 32, served  # half of 64
        d.wait_log(r"^FAIL: echo session_limit from=127\.0\.0\.1$")
        assert tcp_exchange("127.0.0.1", ports["cat"], b"") == b"cat\n"
        assert tcp_exchange("127.0.0.1", ports["py"], b"") == b"py\n"
    finally:
        for s in held:
            s.close()


def test_out_of_fds_superd_carries_on(new_daemon, tmp_path):
    """Finding 1: with the session cap lifted, idle clients can take every fd but one. Then
    what superd needs next on a connection's way fails with EMFILE (the exec-status pipe of
    a handler the loop forks, the syslog socket when it must be opened again): that one connection
    fails, the service pauses and backs off, superd carries on, and once fds are free again
    everything is served. (It used to exit 1 there, every session and listener gone.)"""
    ports = {name: free_port() for name in ("echo", "cat", "py", "nice")}
    syslog_path = str(tmp_path / "syslog.sock")
    syslog = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    syslog.bind(syslog_path)
    d = new_daemon()
    d.write_table(_services(ports, d), settings={"max_sessions": 1000,
                                                 "syslog": {"address": syslog_path}})
    d.start(prefix=["prlimit", "--nofile=64:64"])
    base = len(rl.proc_fds(d.pid))
    held, served = _hold_echo(ports["echo"], 63 - base)
    try:
        assert served == 63 - base and len(rl.proc_fds(d.pid)) == 63
        syslog.close()  # syslogd goes away: the next line finds it gone...
        os.unlink(syslog_path)
        with socket.create_connection(("127.0.0.1", ports["nice"]), timeout=5) as s:
            s.settimeout(10)  # ...the handler's pipe cannot be made: its client is closed
            assert s.recv(10) == b""
        time.sleep(1.2)  # superd tries the syslog socket again a second later: EMFILE too
        with socket.create_connection(("127.0.0.1", ports["nice"]), timeout=5) as s:
            s.settimeout(10)
            s.recv(10)
        assert d.proc.poll() is None, "superd died"
        lib.wait_until(lambda: "Too many open files" in d.stderr_text(), 5, "EMFILE said")
        for s in held[:20]:
            s.close()
        del held[:20]
        lib.wait_until(lambda: tcp_exchange("127.0.0.1", ports["nice"], b"") == b"nice\n", 15,
                       "the loop's own fork served again")
        assert tcp_exchange("127.0.0.1", ports["cat"], b"") == b"cat\n"
        assert tcp_exchange("127.0.0.1", ports["py"], b"") == b"py\n"
    finally:
        for s in held:
            s.close()
    assert ": fork: Too many open files" in d.stderr_text()
    assert d.proc.poll() is None


def test_idle_internal_session_is_closed(superd):
    """settings.idle_timeout: a session that moves no byte for that long is closed; one that
    keeps talking is not."""
    port = free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}},
               settings={"idle_timeout": 1})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as idle, \
            socket.create_connection(("127.0.0.1", port), timeout=5) as busy:
        idle.sendall(b"a")
        assert idle.recv(1) == b"a"
        for i in range(12):  # 2.4 s of talk
            busy.sendall(b"%d" % (i % 10))
            assert busy.recv(1) == b"%d" % (i % 10)
            time.sleep(0.2)
        assert lib.recv_until_eof(idle, timeout=3) == b""
        busy.sendall(b"z")
        assert busy.recv(1) == b"z"
    d.wait_log(r"^FAIL: echo idle from=127\.0\.0\.1$")


def test_echo_clients_that_never_read_are_capped(new_daemon):
    """Finding 8: an echo client that sends and never reads made superd hold 100-230 KB each,
    without limit. One session holds at most 64 KiB, all together settings.max_buffered, and
    the memory is given back once those clients are gone."""
    port = free_port()
    d = new_daemon()
    d.start({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}},
            settings={"max_buffered": "4M"})
    start = rl.rss_kb(d.pid)
    clients = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.setblocking(False)
            clients.append(s)
        chunk = b"x" * 65536
        for _ in range(3):  # fill every buffer on the way, twice over
            for s in clients:
                for _ in range(64):
                    try:
                        s.send(chunk)
                    except BlockingIOError:
                        break
            time.sleep(0.5)
        peak = rl.rss_kb(d.pid)
        assert peak - start < 16 * 1024, f"RSS {start} -> {peak} KB with 200 clients"
    finally:
        for s in clients:
            s.close()
    lib.wait_until(lambda: rl.rss_kb(d.pid) - start < 6 * 1024, 10,
                   f"RSS back near {start} KB")
