"""Handlers' stderr lines are logged as `SERVICE[PID]: line` (issue 16, finding 17).

- PID is the handler's, the one in its START line: concurrent connections are told apart,
  and their half-written lines never mix.
- A handler's stderr line never comes before its START line, and what it wrote before it
  exited comes before its EXIT line, a last line without a newline included.
- A line written by a process the handler started is logged with the handler's pid while
  that process is there to be asked.
"""

from __future__ import annotations

import re
import socket
import uuid

import pytest
from superd_testlib import (
    EXIT_RE,
    PY,
    START_RE,
    connect,
    free_port,
    recv_exact,
    tcp_exchange,
    wait_until,
)

TAGGED = re.compile(r"^(?P<svc>[\w.-]+)\[(?P<pid>\d+)\]: (?P<text>.*)$")


def py_exec(port: int, code: str, **more) -> dict:
    return {"listen": f"127.0.0.1:{port}", "exec": [PY, "-c", code], **more}


def tagged(d, service: str, mark: str) -> list[re.Match]:
    return [m for m in map(TAGGED.match, d.lines()) if m and m["svc"] == service
            and mark in m["text"]]


HALVES = """
import os, sys
os.write(2, b"%d {mark} first-half" % os.getpid())
os.write(1, b"go\\n")
sys.stdin.buffer.read(1)
os.write(2, b" second-half\\n")
"""


@pytest.mark.parametrize("kind", ["exec", "python"])
def test_concurrent_handlers_are_told_apart(new_daemon, kind):
    """Three handlers each write half a line, wait, and write its end: three whole lines,
    each tagged with the pid of the handler that wrote it, as in its START line."""
    mark = uuid.uuid4().hex
    port = free_port()
    d = new_daemon()
    code = HALVES.format(mark=mark)
    if kind == "exec":
        service = py_exec(port, code)
    else:
        (d.workdir / "halves.py").write_text(
            "import os\n\ndef handle(sock, env):\n"
            f"    os.write(2, b'%d {mark} first-half' % os.getpid())\n"
            "    sock.sendall(b'go\\n')\n    sock.recv(1)\n"
            "    os.write(2, b' second-half\\n')\n    return 0\n")
        service = {"listen": f"127.0.0.1:{port}", "python": "halves.py:handle"}
    d.start({"svc": service})
    clients = [connect("127.0.0.1", port) for _ in range(3)]
    try:
        for c in clients:
            assert recv_exact(c, 3) == b"go\n"
        for c in clients:
            c.sendall(b"x")
        got = wait_until(lambda: (lambda ms: ms if len(ms) == 3 else None)(tagged(d, "svc", mark)),
                         5, "three stderr lines")
    finally:
        for c in clients:
            c.close()
    starts = {m["pid"] for m in (START_RE.match(x) for x in d.lines()) if m}
    assert len(starts) == 3
    for m in got:
        assert m["text"] == f"{m['pid']} {mark} first-half second-half", m.group()
    assert {m["pid"] for m in got} == starts


def test_a_line_never_comes_before_its_start_and_always_before_its_exit(new_daemon):
    """Handlers started by a spawner write at once, before superd hears their pid."""
    port = free_port()
    mark = uuid.uuid4().hex
    d = new_daemon().start({"svc": py_exec(
        port, f"import os; os.write(2, b'{mark} early\\n'); os.write(2, b'{mark} last')")})
    n = 30
    clients = [connect("127.0.0.1", port) for _ in range(n)]
    for c in clients:
        c.shutdown(socket.SHUT_WR)
    for c in clients:
        c.settimeout(10)
        assert c.recv(10) == b""
        c.close()
    d.wait_log(r"^EXIT: svc ", count=n, timeout=10)
    order: dict[str, list[str]] = {}
    for line in d.lines():
        start, end, m = START_RE.match(line), EXIT_RE.match(line), TAGGED.match(line)
        if start:
            order.setdefault(start["pid"], []).append("START")
        elif end:
            order.setdefault(end["pid"], []).append("EXIT")
        elif m and mark in m["text"]:
            order.setdefault(m["pid"], []).append(m["text"].split()[-1])
    assert len(order) == n, order
    for pid, events in order.items():
        assert events == ["START", "early", "last", "EXIT"], (pid, events)


CHILD = """
import os, sys, time
if os.fork() == 0:
    os.write(2, b"{mark} from the child %d\\n" % os.getpid())
    time.sleep(1.5)
    os._exit(0)
os.wait()
"""


def test_a_line_of_the_handlers_child_carries_the_handlers_pid(superd):
    port = free_port()
    mark = uuid.uuid4().hex
    d = superd({"svc": py_exec(port, CHILD.format(mark=mark))})
    assert tcp_exchange("127.0.0.1", port, b"", timeout=10) == b""
    pid = d.wait_start("svc")[0]["pid"]
    [m] = wait_until(lambda: tagged(d, "svc", mark), 5, "the child's line")
    assert m["pid"] == pid and m["text"].split()[-1] != pid, m.group()


def test_stderr_lines_of_a_wait_handler(superd):
    port = free_port()
    mark = uuid.uuid4().hex
    code = (f"import os, socket; os.write(2, b'{mark} wait %d\\n' % os.getpid()); "
            "s = socket.socket(fileno=0); c, _ = s.accept(); c.sendall(b'hi\\n')")
    d = superd({"w": py_exec(port, code, wait=True)})
    assert tcp_exchange("127.0.0.1", port, b"", timeout=10) == b"hi\n"
    pid = d.wait_log(r"^START: w pid=(\d+)")[0][1]  # a wait stream service: no peer
    [m] = wait_until(lambda: tagged(d, "w", mark), 5, "the wait handler's line")
    assert m["pid"] == pid and m["text"] == f"{mark} wait {pid}"
