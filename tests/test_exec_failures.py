"""An exec failure names the program and the step that failed (issue 12, point 7).

`exec PATH: execve: No such file or directory`, `exec PATH: chdir DIR: ...`: in the log line
and in `superd status`, on every way a handler is started: by the spawner pool (a plain exec
service), by superd itself with CPython's fork_exec (a request too large for a spawner), by
superd's own forked child (`nice:`, here), as a `wait: true` handler, and for a python
service by its host. Each failure is made after the table was loaded, as `apt-get remove` or
a careless chmod would: the program removed, made non-executable, its cwd removed.
"""

from __future__ import annotations

import socket
import subprocess

import pytest
from superd_testlib import (
    PY,
    REPO,
    free_port,
    python_script,
    tcp_exchange,
    wait_until,
    write_script,
)

# How each start path is asked for: the keys that send a service down it.
PATHS = {
    "spawner-pool": {},
    "superd-fork-exec": {"env": {"BIG": "x" * 100_000}},  # over a spawner message
    "superd-child": {"nice": 1},
    "wait": {"protocol": "udp", "wait": True},
}
BREAKS = {
    "removed": ("execve: No such file or directory", lambda script, cwd: script.unlink()),
    "not-executable": ("execve: Permission denied", lambda script, cwd: script.chmod(0o644)),
    "cwd-removed": ("chdir {cwd}: No such file or directory", lambda script, cwd: cwd.rmdir()),
}


def poke(port: int, udp: bool) -> None:
    """One client: a connection that is closed at once, or a datagram."""
    if udp:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"hello", ("127.0.0.1", port))
    else:
        assert tcp_exchange("127.0.0.1", port, b"", timeout=10) == b""


def start_failure(d, name: str) -> str | None:
    return d.control("status")["services"][name]["start_failure"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("how", BREAKS)
def test_exec_failure_names_program_and_step(superd, tmp_path, path, how):
    script = write_script(tmp_path / "prog.sh", "#!/bin/sh\necho hi\n")
    cwd = tmp_path / "work"
    cwd.mkdir()
    port = free_port()
    d = superd({"svc": {"listen": f"127.0.0.1:{port}", "exec": [str(script)],
                        "cwd": str(cwd), **PATHS[path]}})
    step, breaks = BREAKS[how]
    breaks(script, cwd)
    expected = f"exec {script}: {step.format(cwd=cwd)}"
    poke(port, PATHS[path].get("wait", False))
    d.wait_log(rf"^svc: cannot start handler: {expected}$", timeout=10)
    d.wait_log(r"^FAIL: svc exec ")
    assert start_failure(d, "svc") == expected
    r = subprocess.run([PY, "-m", "superd", "status", "-c", str(d.table)], cwd=REPO,
                       capture_output=True, text=True, timeout=20)
    assert f"cannot start its handler: {expected}\n" in r.stdout, r.stdout


def test_a_python_handler_whose_cwd_is_gone(superd, tmp_path):
    python_script(tmp_path / "hello.py", "def handle(sock, env):\n    sock.sendall(b'hi\\n')\n")
    cwd = tmp_path / "work"
    cwd.mkdir()
    port = free_port()
    d = superd({"py": {"listen": f"127.0.0.1:{port}", "python": f"{tmp_path}/hello.py:handle",
                       "cwd": str(cwd)}})
    assert tcp_exchange("127.0.0.1", port, b"", timeout=10) == b"hi\n"
    cwd.rmdir()
    poke(port, False)
    expected = f"python {tmp_path}/hello.py:handle: chdir {cwd}: No such file or directory"
    d.wait_log(rf"^py: cannot start handler: {expected}$", timeout=10)
    assert start_failure(d, "py") == expected


def test_a_good_start_clears_the_failure(superd, tmp_path):
    script = write_script(tmp_path / "prog.sh", "#!/bin/sh\necho hi\n")
    port = free_port()
    d = superd({"svc": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}})
    script.chmod(0o644)
    poke(port, False)
    wait_until(lambda: start_failure(d, "svc"), 10, "the failure in superd status")
    script.chmod(0o755)
    assert tcp_exchange("127.0.0.1", port, b"", timeout=10) == b"hi\n"
    d.wait_exit("svc")
    assert start_failure(d, "svc") is None
