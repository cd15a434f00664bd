"""Ident (RFC 1413): TCPREMOTEINFO, the USERID log line, `ident: required` (xinetd IDONLY),
user@host in hosts.allow (issue 14, item 8).

The ident server is the real oidentd, started by the test on port 113 of an address of its
own in 127/8 (its clients connect from that address, so superd asks it there). Clients run
as `nobody` in a child process, so the answer is that user's name. A server that accepts and
never answers shows the wait is bounded and stalls nothing else.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess

import pytest
from access_lib import echo_latency, names_etc, refused, start_private
from dns_lib import etc_file, private_address
from superd_testlib import free_port, wait_until

ENV = ["/bin/sh", "-c", 'echo "info=[$TCPREMOTEINFO]"']


def client_as(user: str, src: str, port: int) -> str:
    """What a client (socat) running as `user`, from `src`, reads from 127.0.0.1:port."""
    return subprocess.run(["socat", "-T", "10", "STDIO", f"TCP:127.0.0.1:{port},bind={src}"],
                          user=user, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20, check=False).stdout


@pytest.fixture
def oidentd(tmp_path):
    ip = private_address()
    log = open(tmp_path / "oidentd.log", "wb")
    proc = subprocess.Popen(["oidentd", "--foreground", "--nosyslog", "--address", ip,
                             "--port", "113", "--timeout", "5"], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True)

    def up() -> bool:
        try:
            socket.create_connection((ip, 113), timeout=0.2).close()
            return True
        except OSError:
            return proc.poll() is not None
    wait_until(up, 10, "oidentd listening")
    assert proc.poll() is None, (tmp_path / "oidentd.log").read_text()
    yield ip
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    log.close()


def test_the_ident_answer_reaches_handler_and_log(superd, oidentd):
    port = free_port()
    d = superd({"id": {"listen": f"0.0.0.0:{port}", "exec": ENV, "ident": True,
                       "log_on_success": ["pid", "host", "userid"]}})
    assert client_as("nobody", oidentd, port) == "info=[nobody]\n"
    d.wait_log(r"^USERID: id UNIX : nobody$")
    d.wait_log(rf"^START: id pid=\d+ from={re.escape(oidentd)}$")
    # no ident server at the client's address: no TCPREMOTEINFO, but served
    assert client_as("nobody", "127.0.0.2", port) == "info=[]\n"


def test_ident_required_refuses_a_client_without_an_answer(superd, oidentd):
    port = free_port()
    d = superd({"idonly": {"listen": f"0.0.0.0:{port}", "exec": ENV, "ident": "required"}})
    assert client_as("nobody", oidentd, port) == "info=[nobody]\n"
    refused(d, "idonly", "127.0.0.2", port, "ident")


def test_a_silent_ident_server_stalls_nothing_else(superd):
    ip = private_address()
    silent = socket.socket()
    silent.bind((ip, 113))
    silent.listen(64)  # connections complete in the backlog; nobody ever answers
    try:
        p1, p2, p3 = free_port(), free_port(), free_port()
        d = superd({
            "maybe": {"listen": f"0.0.0.0:{p1}", "exec": ENV, "ident": True,
                      "lookup_timeout": 2},
            "must": {"listen": f"0.0.0.0:{p2}", "exec": ENV, "ident": "required",
                     "lookup_timeout": 2},
            "echo": {"listen": f"127.0.0.1:{p3}", "internal": "echo"},
        })
        waiting = subprocess.Popen(["socat", "-T", "10", "STDIO", f"TCP:127.0.0.1:{p1},bind={ip}"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        wait_until(lambda: _queries(silent), 5, "the ident question")
        assert max(echo_latency(p3) for _ in range(20)) < 0.5
        out, _ = waiting.communicate(timeout=10)
        assert out == "info=[]\n", "served without an answer, after lookup_timeout"
        refused(d, "must", ip, p2, "ident", timeout=6)
    finally:
        silent.close()


def _queries(listener: socket.socket) -> bool:
    listener.settimeout(0.05)
    try:
        listener.accept()  # the question arrived (left unanswered)
        return True
    except OSError:
        return False


def test_user_at_host_in_hosts_allow(new_daemon, oidentd, tmp_path):
    port = free_port()
    etc = names_etc(tmp_path / "etc", "127.0.0.1")  # no name is looked up here
    etc["/etc/hosts.allow"] = etc_file(tmp_path / "etc", "hosts.allow",
                                       f"in.test: nobody@{oidentd}\n")
    etc["/etc/hosts.deny"] = etc_file(tmp_path / "etc", "hosts.deny", "in.test: ALL\n")
    d = start_private(new_daemon, {"w": {"listen": f"0.0.0.0:{port}", "exec": ENV,
                                         "tcp_wrappers": "in.test"}}, etc)
    assert client_as("nobody", oidentd, port) == "info=[]\n"
    assert client_as("root", oidentd, port) == "", "root@ is not nobody@"
    d.wait_log(rf"^FAIL: w libwrap from={re.escape(oidentd)}$")


