"""A root daemon facing the internet (issue 16): what a handler inherits, what a client or a
spoofed datagram can make superd do.

Each test reproduces one finding from the outside: the daemon as a subprocess, real sockets,
real handlers that look at their own /proc entry and report what they see.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

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
# not python: python ignores SIGPIPE and SIGXFSZ itself at start-up.
set -- $(cat /proc/$$/stat)
[ "$6" = "$$" ] && echo "sid True" || echo "sid False"
if (: <>/dev/tty) 2>/dev/null; then echo "tty opened"; else echo "tty refused"; fi
sed -n 's/^SigIgn:[[:space:]]*/ignored /p; s/^SigBlk:[[:space:]]*/blocked /p' /proc/$$/status
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
    rl.start_custom(d, wrap=[sys.executable, "-c", CTTY_WRAPPER])
    for name, port in ports.items():
        seen = report(tcp_exchange("127.0.0.1", port, b""))
        assert seen.get("sid") == "True", (name, seen)
        assert seen.get("tty") == "refused", (name, seen)
        assert seen.get("ignored") == "0000000000000000", (name, seen)
        assert seen.get("blocked") == "0000000000000000", (name, seen)


def test_usr1_logs_the_status_usr2_and_quit_do_not_kill(superd):
    """Finding 13: SIGUSR1, SIGUSR2 and SIGQUIT must not kill superd; SIGUSR1 writes what
    `superd status` shows into the log, as xinetd's state dump does."""
    port = free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    assert tcp_exchange("127.0.0.1", port, b"a\n", expect_len=2) == b"a\n"
    d.proc.send_signal(signal.SIGUSR1)
    d.wait_log(r"^status: echo accepted=1 active=[01] refused=0 last_exit=None paused=-$")
    for sig in (signal.SIGUSR2, signal.SIGQUIT):
        d.proc.send_signal(sig)
    d.wait_log(r"SIGQUIT ignored")
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
    d.wait_log(r"^noexec: cannot start handler: OSError: Permission denied")
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
