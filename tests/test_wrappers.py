"""tcp_wrappers: real /etc/hosts.allow and /etc/hosts.deny decide (issue 14, item 1).

superd runs in a mount namespace of its own where /etc/hosts.allow, /etc/hosts.deny,
/etc/hosts and /etc/resolv.conf are the test's private files (bind mounts: the host's stay
as they are); names come from a dnsmasq the test starts. The files are edited in place while
superd runs, as an admin would, and the change applies without a reload.
"""

from __future__ import annotations

import os
import time

import pytest
from access_lib import REPLY, dnsmasq, names_etc, refused, served, start_private
from dns_lib import etc_file
from limits_lib import svc_status
from superd_testlib import free_port, wait_until


@pytest.fixture
def dns(tmp_path):
    server = dnsmasq(tmp_path, {"good.example.test": ["127.0.0.2"],
                                "other.example.test": ["127.0.0.7"]})
    yield server
    server.stop()


def wrapped_etc(tmp_path, dns, allow: str, deny: str) -> dict:
    etc = names_etc(tmp_path / "etc", dns.ip)
    etc["/etc/hosts.allow"] = etc_file(tmp_path / "etc", "hosts.allow", allow)
    etc["/etc/hosts.deny"] = etc_file(tmp_path / "etc", "hosts.deny", deny)
    return etc


def test_hosts_allow_and_deny_decide(new_daemon, dns, tmp_path):
    port, p2, p3 = free_port(), free_port(), free_port()
    etc = wrapped_etc(tmp_path, dns,
                      "# who may come in\nin.test: 127.0.0.2 127.0.0.5 EXCEPT 127.0.0.5\n"
                      "sh: .example.test EXCEPT other.example.test\n"
                      "echo: ALL EXCEPT 127.0.0.3\n",
                      "ALL: ALL\n")
    d = start_private(new_daemon, {
        "named": {"listen": f"0.0.0.0:{port}", "exec": REPLY, "tcp_wrappers": "in.test"},
        "default-name": {"listen": f"0.0.0.0:{p2}", "exec": REPLY, "tcp_wrappers": True},
        "echo": {"listen": f"0.0.0.0:{p3}", "internal": "echo", "tcp_wrappers": True},
    }, etc)
    assert served("127.0.0.2", port) == b"hi 127.0.0.2\n"
    refused(d, "named", "127.0.0.3", port, "libwrap")
    refused(d, "named", "127.0.0.5", port, "libwrap")
    # the daemon name is exec[0]'s base name (sh), as tcpd takes it; names come from DNS
    assert served("127.0.0.2", p2) == b"hi 127.0.0.2\n"
    refused(d, "default-name", "127.0.0.7", p2, "libwrap")
    refused(d, "default-name", "127.0.0.9", p2, "libwrap")
    # an internal service goes by its service name, as under xinetd
    assert served("127.0.0.4", p3) == b""
    refused(d, "echo", "127.0.0.3", p3, "libwrap")
    assert svc_status(d, "named")["refused"] == {"libwrap": 2}
    # edited in place, the files apply at once (within the second superd looks again)
    with open(etc["/etc/hosts.allow"], "a") as f:
        f.write("in.test: 127.0.0.3\n")
    started = time.monotonic()
    wait_until(lambda: served("127.0.0.3", port) == b"hi 127.0.0.3\n", 5,
               "the edit of hosts.allow to apply")
    assert time.monotonic() - started < 2.5, "superd looks at the files once a second"


def test_commands_in_hosts_files_are_refused_clearly(new_daemon, dns, tmp_path):
    port = free_port()
    etc = wrapped_etc(tmp_path, dns,
                      "in.test: 127.0.0.2: setenv WRAPPED from_%a : allow\n"
                      "in.test: 127.0.0.3: spawn (echo %a | mail root) &\n"
                      "in.test: 127.0.0.4: twist /bin/echo go away\n",
                      "in.test: 127.0.0.6: allow\nin.test: ALL\n")
    d = start_private(new_daemon, {"w": {"listen": f"0.0.0.0:{port}", "tcp_wrappers": "in.test",
                                         "exec": ["/bin/sh", "-c", 'echo "[$WRAPPED]"']}}, etc)
    assert served("127.0.0.2", port) == b"[from_127.0.0.2]\n", "setenv with %a expanded"
    assert served("127.0.0.6", port) == b"[]\n", "the allow option in hosts.deny"
    refused(d, "w", "127.0.0.3", port, "libwrap")
    refused(d, "w", "127.0.0.4", port, "libwrap")
    d.wait_log(r"tcp_wrappers: /etc/hosts.allow:2: option 'spawn' is not supported by superd")
    d.wait_log(r"tcp_wrappers: /etc/hosts.allow:3: option 'twist' is not supported by superd")
    refused(d, "w", "127.0.0.5", port, "libwrap")
    assert len([x for x in d.lines() if "'spawn' is not supported" in x]) == 1, \
        "said once per version of the file, not per connection"


def test_an_unreadable_hosts_deny_refuses_everyone(new_daemon, dns, tmp_path):
    """A FIFO in place of hosts.deny: superd must neither hang on it nor let anyone in whom
    hosts.allow does not name."""
    port = free_port()
    etc = wrapped_etc(tmp_path, dns, "in.test: 127.0.0.2\n", "")
    fifo = tmp_path / "etc" / "deny.fifo"
    os.mkfifo(fifo)
    etc["/etc/hosts.deny"] = fifo
    d = start_private(new_daemon, {"w": {"listen": f"0.0.0.0:{port}", "exec": REPLY,
                                         "tcp_wrappers": "in.test"}}, etc)
    assert served("127.0.0.2", port) == b"hi 127.0.0.2\n", "hosts.allow lets it in first"
    refused(d, "w", "127.0.0.3", port, "libwrap")
    wait_until(lambda: any("/etc/hosts.deny: cannot read" in x for x in d.lines()), 5,
               "the warning about hosts.deny")
