"""What superd logs, read back from a real rsyslogd (SPEC 5, xinetd's line layout)."""

from __future__ import annotations

import re
import socket
import uuid

from superd_testlib import (
    Rsyslog,
    connect,
    free_port,
    recv_until_eof,
    tcp_exchange,
    wait_until,
    write_script,
)


def _syslog_msgs(d, prefix: str):
    return [ll for ll in d.syslog_lines() if ll.msg.startswith(prefix)]


def test_exec_start_exit_lines_and_handler_stderr(superd, tmp_path):
    mark = uuid.uuid4().hex
    script = write_script(tmp_path / "noisy.sh", f"""#!/bin/sh
echo "err-one {mark}" >&2
echo "to the client"
echo "err-two {mark}" >&2
sleep 1.2
exit 3
""")
    port = free_port()
    d = superd({"noisy": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}})
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        out = recv_until_eof(s, 10)
    assert out == b"to the client\n", "handler stderr must not go to the client by default"

    wait_until(lambda: _syslog_msgs(d, "EXIT: noisy"), 5, "EXIT line in rsyslog")
    starts, exits = _syslog_msgs(d, "START: noisy"), _syslog_msgs(d, "EXIT: noisy")
    assert len(starts) == 1 and len(exits) == 1, [ll.raw for ll in d.syslog_lines()]
    m = re.fullmatch(r"START: noisy pid=([1-9]\d*) from=127\.0\.0\.1", starts[0].msg)
    assert m, starts[0].raw
    pid = m[1]
    assert re.fullmatch(rf"EXIT: noisy status=3 pid={pid} duration=[12]\(sec\)", exits[0].msg), (
        exits[0].raw)
    for ll in starts + exits:
        # ident superd, tagged with the daemon's pid: "... superd[PID]: START: ..."
        assert re.search(rf" superd\[{d.pid}\]: (START|EXIT): noisy ", ll.raw), ll.raw

    def stderr_lines():
        found = {}
        for ll in d.all_syslog_lines():
            for tag in ("err-one", "err-two"):
                if f"{tag} {mark}" in ll.msg:
                    found[tag] = ll
        return found if len(found) == 2 else None

    found = wait_until(stderr_lines, 5, "handler stderr lines in rsyslog")
    # one syslog line per stderr line
    assert "err-two" not in found["err-one"].msg and "err-one" not in found["err-two"].msg


def test_internal_start_line_in_rsyslog(superd):
    port = free_port()
    d = superd({"tm": {"listen": f"127.0.0.1:{port}", "internal": "time"}})
    with connect("127.0.0.1", port) as s:
        recv_until_eof(s, 5, limit=100)
    ll = wait_until(lambda: _syslog_msgs(d, "START: tm"), 5, "START line")[0]
    assert ll.msg == "START: tm pid=0 from=127.0.0.1", ll.raw
    assert ll.ident == "superd" and ll.tag_pid == d.pid, ll.raw


def test_denied_peer_fail_line(superd, tmp_path):
    flag = tmp_path / "spawned"
    script = write_script(tmp_path / "never.sh", f"#!/bin/sh\ntouch {flag}\necho no\n")
    port = free_port()
    d = superd({"guarded": {"listen": f"127.0.0.1:{port}", "exec": [str(script)],
                            "only_from": ["10.0.0.0/8", "::1"]}})
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, 5) == b""
    ll = wait_until(lambda: _syslog_msgs(d, "FAIL: guarded"), 5, "FAIL line")[0]
    assert ll.msg == "FAIL: guarded address from=127.0.0.1", ll.raw
    assert not flag.exists(), "a denied peer must be closed before anything is spawned"
    assert not _syslog_msgs(d, "START: guarded")


def test_missing_syslog_socket_goes_to_stderr_then_back(new_daemon, tmp_path):
    later = tmp_path / "later"
    later.mkdir()
    sock = later / "log.sock"
    port = free_port()
    d = new_daemon()
    d.start({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}},
            settings={"syslog": {"address": str(sock)}})
    assert tcp_exchange("127.0.0.1", port, b"1\n", expect_len=2) == b"1\n"
    wait_until(lambda: re.search(r"START: echo pid=0 from=127\.0\.0\.1", d.stderr_text()), 5,
               "START line on stderr while the syslog socket is missing")
    r = Rsyslog(later)
    r.start()
    try:
        def in_syslog():
            tcp_exchange("127.0.0.1", port, b"2\n", expect_len=2)
            return [ll for ll in r.lines() if ll.msg == "START: echo pid=0 from=127.0.0.1"]

        wait_until(in_syslog, 5, "START line back in syslog once the socket exists",
                   interval=0.2)
    finally:
        d.stop()
        r.stop()


def test_no_line_lost_when_syslogd_goes_away(new_daemon, tmp_path):
    """The line whose send finds syslogd gone, and every line after, goes to stderr."""
    r = Rsyslog(tmp_path / "rs")
    r.start()
    port = free_port()
    d = new_daemon()
    line = "START: echo pid=0 from=127.0.0.1"
    try:
        d.start({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}},
                settings={"syslog": {"address": str(r.sock)}})
        assert tcp_exchange("127.0.0.1", port, b"0\n", expect_len=2) == b"0\n"
        wait_until(lambda: [ll for ll in r.lines() if ll.msg == line], 5, "START in rsyslog")
    finally:
        r.stop()
    try:
        for i in range(1, 4):
            assert tcp_exchange("127.0.0.1", port, b"%d\n" % i, expect_len=2) == b"%d\n" % i
        wait_until(lambda: d.stderr_text().count(line) >= 3, 5, "3 START lines on stderr")
        assert d.stderr_text().count(line) == 3, d.stderr_text()
    finally:
        d.stop()


def test_stderr_socket_and_null(superd, tmp_path):
    mark = uuid.uuid4().hex
    script = write_script(tmp_path / "err.sh", f'#!/bin/sh\necho "out"\necho "err {mark}" >&2\n')
    ps, pn = free_port(), free_port()
    d = superd({
        "tosock": {"listen": f"127.0.0.1:{ps}", "exec": [str(script)], "stderr": "socket"},
        "tonull": {"listen": f"127.0.0.1:{pn}", "exec": [str(script)], "stderr": "null"},
    })
    assert tcp_exchange("127.0.0.1", ps, b"") == f"out\nerr {mark}\n".encode()
    assert tcp_exchange("127.0.0.1", pn, b"") == b"out\n"
    d.wait_log(r"^EXIT: tonull status=0 ")
    d.wait_log(r"^EXIT: tosock status=0 ")
    assert not [ll.raw for ll in d.all_syslog_lines() if mark in ll.msg], (
        "stderr: socket/null must not be logged")
