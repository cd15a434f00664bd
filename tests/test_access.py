"""only_from / no_access (SPEC §2): the most specific rule wins, no_access on a tie, IPv4-mapped
peers match IPv4 rules, a denied peer is closed before anything is spawned, internal services
(TCP and UDP) are covered too. Clients pick their source address on the loopback network
(127.0.0.2, 127.0.0.3, ...), which Linux routes to lo without any setup.
"""

from __future__ import annotations

import re

import pytest
from limits_lib import closed_at_once, connect_from, recv_all_from, svc_status
from superd_testlib import free_port, udp_request

REPLY = ["/bin/sh", "-c", 'echo "hi $REMOTE_ADDR"']


def starts_from(d, service: str, ip: str) -> list[str]:
    return [m.string for m in d.starts(service) if m["ip"] == ip]


def assert_denied(d, service: str, src: str, host: str, port: int) -> None:
    """`src` is closed with nothing sent, FAIL ... address is logged, nothing was started."""
    with connect_from(src, host, port) as s:
        assert closed_at_once(s), f"{src} must be denied on {service}"
    d.wait_log(rf"^FAIL: {re.escape(service)} address from={re.escape(src)}$")
    assert not starts_from(d, service, src), f"a handler was started for denied {src}"


def assert_admitted(service: str, src: str, host: str, port: int) -> None:
    got = recv_all_from(src, host, port)
    assert got == f"hi {src}\n".encode(), f"{src} must be admitted on {service}: {got!r}"


@pytest.mark.parametrize("form", ["0.0.0.0:{p}", "{p}"], ids=["ipv4-wildcard", "dual-stack"])
def test_only_from_single_host(superd, form):
    """only_from: [127.0.0.2/32] admits 127.0.0.2 and denies 127.0.0.1 (on a dual-stack
    listener the peer is IPv4-mapped and must still match the IPv4 rule)."""
    port = free_port()
    d = superd({"acl": {"listen": form.format(p=port), "exec": REPLY,
                        "only_from": ["127.0.0.2/32"]}})
    assert_denied(d, "acl", "127.0.0.1", "127.0.0.1", port)
    assert_admitted("acl", "127.0.0.2", "127.0.0.1", port)
    assert_denied(d, "acl", "127.0.0.3", "127.0.0.1", port)
    if form == "{p}":
        assert_denied(d, "acl", "::1", "::1", port)
    d.wait_log(r"^EXIT: acl status=0 ")
    st = svc_status(d, "acl")
    denied = 3 if form == "{p}" else 2
    assert st["refused"] == {"address": denied}, st
    assert st["accepted"] == 1, st


def test_most_specific_rule_wins(superd):
    """Inside an allowed /8: a no_access /32 and /30 deny, an only_from /32 inside that /30
    admits again, and an equally specific pair is a tie that no_access wins."""
    port = free_port()
    d = superd({"nest": {"listen": f"0.0.0.0:{port}", "exec": REPLY,
                         "only_from": ["127.0.0.0/8", "127.0.0.5", "127.0.0.9/32"],
                         "no_access": ["127.0.0.3/32", "127.0.0.4/30", "127.0.0.9"]}})
    for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.5", "127.0.0.8"):
        assert_admitted("nest", ip, "127.0.0.1", port)
    for ip in ("127.0.0.3", "127.0.0.4", "127.0.0.6", "127.0.0.7", "127.0.0.9"):
        assert_denied(d, "nest", ip, "127.0.0.1", port)
    d.wait_log(r"^EXIT: nest status=0 ", count=4)
    assert svc_status(d, "nest")["refused"] == {"address": 5}


def test_no_access_alone_denies_only_its_network(superd):
    port = free_port()
    d = superd({"deny": {"listen": f"0.0.0.0:{port}", "exec": REPLY,
                         "no_access": ["127.0.0.2/31"]}})
    assert_denied(d, "deny", "127.0.0.2", "127.0.0.1", port)
    assert_denied(d, "deny", "127.0.0.3", "127.0.0.1", port)
    assert_admitted("deny", "127.0.0.1", "127.0.0.1", port)
    assert_admitted("deny", "127.0.0.4", "127.0.0.1", port)


def test_ipv6_rules(superd):
    """only_from ::1 admits ::1 and denies 127.0.0.1; no_access ::1/128 the other way round."""
    p1, p2 = free_port(), free_port()
    d = superd({"v6only": {"listen": str(p1), "exec": REPLY, "only_from": ["::1"]},
                "v6deny": {"listen": str(p2), "exec": REPLY, "no_access": ["::1/128"]}})
    assert_admitted("v6only", "::1", "::1", p1)
    assert_denied(d, "v6only", "127.0.0.1", "127.0.0.1", p1)
    assert_denied(d, "v6deny", "::1", "::1", p2)
    assert_admitted("v6deny", "127.0.0.1", "127.0.0.1", p2)
    st = {n: svc_status(d, n)["refused"] for n in ("v6only", "v6deny")}
    assert st == {"v6only": {"address": 1}, "v6deny": {"address": 1}}, st


def test_internal_services_are_covered(superd):
    """An internal TCP echo and UDP echo behind only_from: denied peers get nothing."""
    port = free_port()
    d = superd({"iecho": {"listen": f"0.0.0.0:{port}", "internal": "echo",
                          "only_from": ["127.0.0.2"]},
                "iecho-u": {"listen": f"0.0.0.0:{port}", "protocol": "udp", "internal": "echo",
                            "only_from": ["127.0.0.2"]}})
    with connect_from("127.0.0.1", "127.0.0.1", port) as s:
        assert closed_at_once(s), "a denied peer must be closed by an internal service too"
    d.wait_log(r"^FAIL: iecho address from=127\.0\.0\.1$")
    assert not starts_from(d, "iecho", "127.0.0.1")
    with connect_from("127.0.0.2", "127.0.0.1", port) as s:
        s.sendall(b"allowed\n")
        assert s.recv(64) == b"allowed\n"
    assert svc_status(d, "iecho")["refused"] == {"address": 1}
    # UDP: the denied source gets no reply, the admitted one does
    r = udp_request("127.0.0.1", port, b"denied?", timeout=1.0, bind=("127.0.0.1", 0))
    assert r is None, f"UDP echo answered a denied source: {r}"
    r = udp_request("127.0.0.1", port, b"allowed", timeout=3.0, bind=("127.0.0.2", 0))
    assert r is not None and r[0] == b"allowed", r
    r = udp_request("127.0.0.1", port, b"denied again", timeout=1.0, bind=("127.0.0.3", 0))
    assert r is None, f"UDP echo answered a denied source: {r}"
