"""SIGHUP reloads: nothing refused, running handlers untouched, bad tables kept out."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest
from superd_testlib import (
    connect,
    connection_refused,
    free_port,
    recv_exact,
    recv_until_eof,
    status,
    tcp_exchange,
    wait_until,
)


def echo(port: int) -> dict:
    return {"listen": f"127.0.0.1:{port}", "internal": "echo"}


def test_reload_refuses_no_connection_and_adds_services(superd):
    pe = free_port()
    services = {"echo": echo(pe)}
    d = superd(services)
    stop = threading.Event()
    result = {"ok": 0, "errors": []}

    def hammer():
        end = time.monotonic() + 5
        for i in range(100000):
            if stop.is_set() or time.monotonic() > end:
                return
            msg = f"ping-{i}\n".encode()
            try:
                got = tcp_exchange("127.0.0.1", pe, msg, expect_len=len(msg), timeout=2)
            except (OSError, AssertionError) as e:
                result["errors"].append(f"#{i}: {e!r}")
                continue
            if got == msg:
                result["ok"] += 1
            else:
                result["errors"].append(f"#{i}: sent {msg!r} got {got!r}")

    t = threading.Thread(target=hammer, daemon=True)
    t.start()
    try:
        wait_until(lambda: result["ok"] > 0 or result["errors"], 5, "first round trip")
        for k in range(4):
            pn = free_port()
            services[f"new{k}"] = echo(pn)
            d.reload(services)  # waits for RELOADING=1, then READY=1
            assert tcp_exchange("127.0.0.1", pn, b"new\n", expect_len=4) == b"new\n"
        time.sleep(0.2)
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()
    assert result["errors"] == [], f"{len(result['errors'])} failed: {result['errors'][:5]}"
    assert result["ok"] >= 20, f"only {result['ok']} round trips: the test did not exercise much"


@pytest.mark.parametrize("change", ["add-other", "remove-this"])
def test_running_handler_survives_reload(superd, change):
    pc, pe = free_port(), free_port()
    services = {"cat": {"listen": f"127.0.0.1:{pc}", "exec": ["/bin/cat"]}, "echo": echo(pe)}
    d = superd(services)
    with connect("127.0.0.1", pc) as s:
        s.sendall(b"before\n")
        assert recv_exact(s, 7) == b"before\n"
        pid = int(d.wait_log(r"^START: cat pid=(\d+) ")[0][1])
        if change == "add-other":
            new = dict(services, extra=echo(free_port()))
        else:
            new = {"echo": echo(pe)}
        d.reload(new)
        if change == "remove-this":
            # a removed service stops listening ...
            wait_until(lambda: connection_refused("127.0.0.1", pc), 3, "cat port closed")
        # ... and the running session carries on normally
        s.sendall(b"after\n")
        assert recv_exact(s, 6) == b"after\n"
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, 5) == b""
    d.wait_log(rf"^EXIT: cat status=0 pid={pid} ")
    assert tcp_exchange("127.0.0.1", pe, b"e\n", expect_len=2) == b"e\n"


def _good_then_bad(d, pe: int, pn: int, mistake: str) -> tuple[str, int]:
    """A table text with one mistake; return (text, line number of the mistake)."""
    lines = [
        "settings:",
        f"  control_socket: {d.ctl}",
        f"  syslog: {{address: {d.syslog.sock}}}",
        "  shutdown_grace: 2",
        "services:",
        "  echo:",
        f'    listen: "127.0.0.1:{pe}"',
        "    internal: echo",
        "  newsvc:",
        f'    listen: "127.0.0.1:{pn}"',
    ]
    if mistake == "syntax":
        lines.append("    internal: echo: oops")  # mapping values are not allowed here
    else:
        lines.append("    internal: echo")
        lines.append("    colour: blue")  # unknown key
    return "\n".join(lines) + "\n", len(lines)


@pytest.mark.parametrize("mistake", ["syntax", "unknown-key"])
def test_bad_table_on_reload_is_refused(superd, mistake):
    pe, pn = free_port(), free_port()
    d = superd({"echo": echo(pe)})
    text, line = _good_then_bad(d, pe, pn, mistake)
    d.write_table(text=text)
    d.proc.send_signal(1)  # SIGHUP
    m = d.wait_log(re.escape(f"{d.table}:{line}") + r"\b", timeout=5)[0]
    if mistake == "unknown-key":
        assert "services.newsvc.colour" in m.string, m.string
    # the old table stays: echo answers, the new service does not exist
    assert tcp_exchange("127.0.0.1", pe, b"still\n", expect_len=6) == b"still\n"
    assert connection_refused("127.0.0.1", pn)
    assert d.proc.poll() is None
    # and a good table afterwards is taken
    d.reload({"echo": echo(pe), "newsvc": echo(pn)})
    assert tcp_exchange("127.0.0.1", pn, b"now\n", expect_len=4) == b"now\n"


def test_changed_address_moves_the_service(superd):
    pa, pb = free_port(), free_port()
    d = superd({"echo": echo(pa)})
    assert tcp_exchange("127.0.0.1", pa, b"a\n", expect_len=2) == b"a\n"
    d.reload({"echo": echo(pb)})
    assert tcp_exchange("127.0.0.1", pb, b"b\n", expect_len=2) == b"b\n"
    wait_until(lambda: connection_refused("127.0.0.1", pa), 3, "old port closed")


def test_reload_changed_handler_applies_to_new_connections_only(superd):
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": ["/bin/echo", "old"]}
    cat_port = free_port()
    d = superd({"hello": svc, "cat": {"listen": f"127.0.0.1:{cat_port}", "exec": ["/bin/cat"]}})
    assert tcp_exchange("127.0.0.1", port, b"") == b"old\n"
    with connect("127.0.0.1", cat_port) as held:
        held.sendall(b"1\n")
        assert recv_exact(held, 2) == b"1\n"
        d.reload({"hello": dict(svc, exec=["/bin/echo", "new"]),
                  "cat": {"listen": f"127.0.0.1:{cat_port}", "exec": ["/bin/cat", "-u"]}})
        assert tcp_exchange("127.0.0.1", port, b"") == b"new\n"
        held.sendall(b"2\n")
        assert recv_exact(held, 2) == b"2\n"


def test_reload_reimports_python_handler(new_daemon):
    d = new_daemon()
    handler = d.table.parent / "h.py"
    handler.write_text("def handle(sock, env):\n    sock.sendall(b'version 1\\n')\n")
    port = free_port()
    services = {"py": {"listen": f"127.0.0.1:{port}", "python": "h.py:handle"}}
    d.start(services)
    assert tcp_exchange("127.0.0.1", port, b"") == b"version 1\n"
    handler.write_text("def handle(sock, env):\n    sock.sendall(b'version 2, a longer one\\n')\n")
    d.reload(services)
    assert tcp_exchange("127.0.0.1", port, b"") == b"version 2, a longer one\n"


def test_reload_dual_stack_to_ipv4_only(superd):
    """`P` becoming `127.0.0.1:P` overlaps the old socket; it still moves."""
    port = free_port()
    d = superd({"echo": {"listen": str(port), "internal": "echo"}})
    assert tcp_exchange("::1", port, b"6\n", expect_len=2) == b"6\n"
    d.reload({"echo": echo(port)})
    assert tcp_exchange("127.0.0.1", port, b"4\n", expect_len=2) == b"4\n"
    wait_until(lambda: connection_refused("::1", port), 3, "::1 no longer served")


def test_reload_disabled_service_stops_listening(superd):
    pa, pb = free_port(), free_port()
    d = superd({"a": echo(pa), "b": echo(pb)})
    d.reload({"a": echo(pa), "b": dict(echo(pb), disabled=True)})
    wait_until(lambda: connection_refused("127.0.0.1", pb), 3, "disabled service closed")
    assert tcp_exchange("127.0.0.1", pa, b"a\n", expect_len=2) == b"a\n"


def test_unix_service_survives_reload(superd, tmp_path):
    path = tmp_path / "u.sock"
    svc = {"listen": str(path), "protocol": "unix", "exec": ["/bin/cat"]}
    d = superd({"u": svc})
    inode = path.stat().st_ino
    d.reload({"u": svc, "other": echo(free_port())})
    assert path.exists() and path.stat().st_ino == inode, "an unchanged unix socket is kept"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))
        s.sendall(b"unix\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, 5) == b"unix\n"


def test_reload_moves_the_control_socket(superd):
    """`superd status` reads the path from the table: after an edit and a reload it must answer
    there, and the old socket file is gone."""
    port = free_port()
    d = superd({"echo": echo(port)})
    old = d.ctl
    new = d.workdir / "moved" / "ctl.sock"
    d.reload({"echo": echo(port)}, settings={"control_socket": str(new)})
    d.wait_log(rf"^control socket moved to {re.escape(str(new))}$")
    assert new.is_socket() and not old.exists()
    assert status(d)["services"]
    assert tcp_exchange("127.0.0.1", port, b"still\n", expect_len=6) == b"still\n"


def test_reload_keeps_the_control_socket_it_cannot_move(superd):
    port = free_port()
    d = superd({"echo": echo(port)})
    blocker = d.workdir / "not-a-dir"
    blocker.write_text("a file where the new socket's folder would be\n")
    d.reload({"echo": echo(port)}, settings={"control_socket": str(blocker / "ctl.sock")})
    d.wait_log(rf"^control socket {re.escape(str(blocker))}/ctl.sock: .*; still answering on "
               rf"{re.escape(str(d.ctl))}$")
    d.write_table({"echo": echo(port)})  # the old path in the table again: still reachable
    assert status(d)["services"]
