"""Host names and .domains in only_from / no_access, host names in listen (issue 14, item 2).

The names are served by a real dnsmasq the test starts on a private 127/8 address; superd runs
in a mount namespace of its own whose /etc/resolv.conf points there and whose /etc/hosts is a
private copy. Clients pick their source address on the loopback network (127.0.0.2, ...).
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from access_lib import REPLY, dnsmasq, echo_latency, names_etc, refused, served, start_private
from dns_lib import Dnsmasq, SilentDns
from limits_lib import connect_from, svc_status
from superd_testlib import connection_refused, free_port, status, tcp_exchange

NAMES = {"good.example.test": ["127.0.0.2"], "named.example.test": ["127.0.0.5"],
         "bad.evil.test": ["127.0.0.4"], "listen.example.test": ["127.0.0.8"]}
LIAR = {"127.0.0.3": "liar.example.test"}  # a PTR whose name has no such address


@pytest.fixture
def dns(tmp_path):
    server = dnsmasq(tmp_path, NAMES, LIAR, ttl=60)
    yield server
    server.stop()


def test_domains_and_host_names_decide_who_is_served(new_daemon, dns, tmp_path):
    """.example.test lets in a host whose PTR is confirmed by its A record, not one whose PTR
    lies (PARANOID) nor one without a PTR; a host name in no_access refuses its address."""
    p1, p2 = free_port(), free_port()
    d = start_private(new_daemon, {
        "dom": {"listen": f"0.0.0.0:{p1}", "exec": REPLY,
                "only_from": [".example.test", "localhost"]},
        "deny": {"listen": f"0.0.0.0:{p2}", "exec": REPLY,
                 "no_access": [".evil.test", "named.example.test"]},
    }, names_etc(tmp_path / "etc", dns.ip))
    assert served("127.0.0.2", p1) == b"hi 127.0.0.2\n"
    assert served("127.0.0.1", p1) == b"hi 127.0.0.1\n", "localhost, from the private hosts"
    refused(d, "dom", "127.0.0.3", p1, "address")
    refused(d, "dom", "127.0.0.9", p1, "address")
    refused(d, "deny", "127.0.0.4", p2, "address")
    refused(d, "deny", "127.0.0.5", p2, "address")
    assert served("127.0.0.9", p2) == b"hi 127.0.0.9\n"
    assert served("127.0.0.2", p2) == b"hi 127.0.0.2\n"
    assert svc_status(d, "dom")["refused"] == {"address": 2}
    asked = dns.queries()
    assert "3.0.0.127.in-addr.arpa" in asked and "liar.example.test" in asked
    # the answers are cached for their TTL: asking again costs no query
    before = len(dns.queries())
    assert served("127.0.0.2", p1) == b"hi 127.0.0.2\n"
    assert len(dns.queries()) == before


def test_a_dead_first_name_server_leaves_time_for_the_second(new_daemon, dns, tmp_path):
    """resolv.conf's timeout (5 s) is longer than the service's lookup_timeout (2 s): the
    resolver spreads its tries over lookup_timeout, so the second server is asked in time and
    the client is served, instead of the stage giving up while the first one is waited for."""
    silent = SilentDns().start()
    try:
        port = free_port()
        etc = names_etc(tmp_path / "etc", f"{silent.ip}\nnameserver {dns.ip}",
                        options="timeout:5 attempts:1")
        start_private(new_daemon, {
            "named": {"listen": f"0.0.0.0:{port}", "exec": REPLY, "lookup_timeout": 2,
                      "only_from": ["good.example.test"]}}, etc)
        started = time.monotonic()
        assert served("127.0.0.2", port) == b"hi 127.0.0.2\n"
        assert time.monotonic() - started < 2.5
        assert silent.count >= 1, "the first server was asked first"
    finally:
        silent.stop()


def test_listen_names_are_resolved_at_load_and_again_on_reload(new_daemon, dns, tmp_path):
    port = free_port()
    etc = names_etc(tmp_path / "etc", dns.ip)
    d = start_private(new_daemon, {"named": {"listen": f"listen.example.test:{port}",
                                             "internal": "echo"}}, etc)
    assert echo_latency(port, "127.0.0.8") < 2
    assert connection_refused("127.0.0.1", port)
    dns.stop()
    moved = Dnsmasq(tmp_path / "dns", {"listen.example.test": ["127.0.0.11"]})
    moved.ip = dns.ip
    moved.start()
    try:
        d.reload()
        assert echo_latency(port, "127.0.0.11") < 2
        assert connection_refused("127.0.0.8", port)
    finally:
        moved.stop()


def test_a_listen_name_that_does_not_resolve_waits_until_it_does(new_daemon, dns, tmp_path):
    """A name that does not resolve (yet: at boot the name server may not be up) keeps that
    service from starting, with the reason; the others serve, and once the name resolves the
    service starts by itself, as for a program that appears later."""
    etc = names_etc(tmp_path / "etc", dns.ip)
    port, other = free_port(), free_port()
    d = start_private(new_daemon, {
        "x": {"listen": f"later.example.test:{port}", "internal": "echo"},
        "echo": {"listen": f"127.0.0.1:{other}", "internal": "echo"}}, etc)
    assert "services.x.listen: later.example.test: the name does not resolve" in \
        d.stderr_text()
    failed = status(d)["failed"]["x"]
    assert "the name does not resolve" in failed["reason"] and failed["next_try_in"] is not None
    assert tcp_exchange("127.0.0.1", other, b"hi\n") == b"hi\n"
    with open(etc["/etc/hosts"], "a") as f:  # the bind-mounted file: same inode
        f.write("127.0.0.1 later.example.test\n")
    d.wait_log(r"^x: started", timeout=20)
    assert tcp_exchange("127.0.0.1", port, b"now\n") == b"now\n"


def test_a_silent_name_server_stalls_nothing_else(new_daemon, tmp_path):
    """Thirty clients wait for a name server that never answers; an echo service of the same
    daemon answers at once all the while; each waiting client is refused (`dns`) at its
    deadline, never let in."""
    silent = SilentDns().start()
    try:
        p1, p2, p3 = free_port(), free_port(), free_port()
        d = start_private(new_daemon, {
            "slow": {"listen": f"0.0.0.0:{p1}", "exec": REPLY, "only_from": [".example.test"],
                     "lookup_timeout": 2},
            "echo": {"listen": f"127.0.0.1:{p2}", "internal": "echo"},
            "deny": {"listen": f"0.0.0.0:{p3}", "exec": REPLY, "lookup_timeout": 1,
                     "no_access": ["bad.example.test"]},
        }, names_etc(tmp_path / "etc", silent.ip, options="timeout:5 attempts:2"))
        # a no_access name that gets no answer refuses: it might have been this client
        refused(d, "deny", "127.0.0.9", p3, "dns")
        waiting = [connect_from(f"127.0.{i // 200}.{2 + i % 200}", "127.0.0.1", p1)
                   for i in range(30)]
        started = time.monotonic()
        worst = max(echo_latency(p2) for _ in range(20))
        assert worst < 0.5, f"echo took {worst:.2f}s while lookups were waiting"
        closed = []

        def wait_closed(s: socket.socket) -> None:
            s.settimeout(10)
            try:
                closed.append(s.recv(64))
            except OSError:
                closed.append(b"")
        threads = [threading.Thread(target=wait_closed, args=(s,)) for s in waiting]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert closed == [b""] * 30, "a client waiting for DNS must be refused, not served"
        # the PTR question of .example.test has half of lookup_timeout (the name found must
        # still be confirmed); its tries spread over that second
        assert 0.8 < time.monotonic() - started < 6
        d.wait_log(r"^FAIL: slow dns from=127\.0\.0\.2$")
        assert svc_status(d, "slow")["refused"] == {"dns": 30}
        assert silent.count >= 1
        for s in waiting:
            s.close()
    finally:
        silent.stop()
