"""superd/access.py: only_from / no_access, as SPEC §2 and xinetd decide them.

The most specific matching rule wins; on a tie no_access wins; with only_from given, a peer
it does not match is refused; IPv4-mapped IPv6 peers match IPv4 rules; address rules do not
apply to unix peers (uid:N), which only_from therefore refuses. And the pipeline stage that
applies them (superd/stages.py) names its refusal `address`, the reason of the FAIL line.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from superd import stages
from superd.access import allowed, is_unicast
from superd.config import Service
from superd.pipeline import Connection


def nets(*cidrs: str) -> tuple:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


@pytest.mark.parametrize("ip", ["192.0.2.1", "2001:db8::1", "::ffff:192.0.2.1", "uid:0", ""])
def test_no_rules_let_everyone_in(ip):
    assert allowed(ip, (), ())


@pytest.mark.parametrize("ip, ok", [
    ("10.1.2.3", False),  # no_access /16 is more specific than only_from /8
    ("10.2.0.1", True),
    ("10.1.9.9", False),
    ("10.1.5.5", True),  # ... and only_from /24 inside the /16 more specific again
    ("11.0.0.1", False),  # only_from given and not matched
])
def test_the_most_specific_rule_wins(ip, ok):
    only_from = nets("10.0.0.0/8", "10.1.5.0/24")
    no_access = nets("10.1.0.0/16")
    assert allowed(ip, only_from, no_access) is ok


def test_a_single_host_allowed_inside_a_denied_network():
    assert allowed("10.0.0.7", nets("10.0.0.7"), nets("10.0.0.0/8"))
    assert not allowed("10.0.0.8", nets("10.0.0.7"), nets("10.0.0.0/8"))


@pytest.mark.parametrize("cidr", ["10.0.0.0/8", "10.0.0.7/32", "0.0.0.0/0"])
def test_a_tie_goes_to_no_access(cidr):
    assert not allowed("10.0.0.7", nets(cidr), nets(cidr))


def test_no_access_alone_refuses_only_what_it_names():
    deny = nets("192.0.2.0/24", "2001:db8::/32")
    assert not allowed("192.0.2.200", (), deny)
    assert not allowed("2001:db8:1::5", (), deny)
    assert allowed("198.51.100.1", (), deny)
    assert allowed("::1", (), deny)


@pytest.mark.parametrize("peer", ["::ffff:127.0.0.1", "::ffff:10.9.8.7"])
def test_ipv4_mapped_peers_match_ipv4_rules(peer):
    """A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; the rules say a.b.c.d."""
    v4 = peer.rsplit(":", 1)[1]
    assert allowed(peer, nets(v4), ())
    assert not allowed(peer, (), nets(v4))
    assert not allowed(peer, nets("192.0.2.0/24"), ())


def test_ipv6_rules_and_ipv6_peers():
    only = nets("2001:db8::/32", "::1")
    assert allowed("::1", only, ())
    assert allowed("2001:db8:ffff::1", only, ())
    assert not allowed("2001:db9::1", only, ())
    assert not allowed("127.0.0.1", nets("::1"), ()), "an IPv6 rule does not take IPv4"


@pytest.mark.parametrize("peer", ["uid:1000", "uid:0", ""])
def test_unix_peers_are_refused_by_only_from_and_let_in_by_no_access(peer):
    """Address rules cannot match a unix peer: only_from lets in only what matches, so not
    it; no_access refuses only what matches, so not it either."""
    assert not allowed(peer, nets("127.0.0.1"), ())
    assert allowed(peer, (), nets("0.0.0.0/0", "::/0"))


def test_the_answer_does_not_depend_on_the_order_of_the_rules():
    a = nets("10.0.0.0/8", "10.1.0.0/16", "10.1.1.0/24")
    b = nets("10.1.0.0/20", "10.1.1.128/25")
    for ip in ("10.1.1.200", "10.1.1.5", "10.1.2.3", "10.200.0.1"):
        assert allowed(ip, a, b) == allowed(ip, a[::-1], b[::-1]), ip


@pytest.mark.parametrize("ip, unicast", [
    ("192.0.2.1", True), ("224.0.0.1", False), ("255.255.255.255", False),
    ("192.0.2.255", False), ("ff02::1", False), ("::ffff:224.0.0.5", False), ("::1", True),
    ("/run/x.sock", True),
])
def test_datagram_services_do_not_answer_multicast_or_broadcast(ip, unicast):
    assert is_unicast(ip) is unicast


# -- the stage -------------------------------------------------------------------------------


def test_a_service_without_rules_has_no_stage():
    assert stages.build(Service(name="s")) == ()


def test_no_access_alone_makes_a_stage():
    (stage,) = stages.build(Service(name="s", no_access=nets("192.0.2.0/24")))
    a, b = socket.socketpair()
    try:
        assert stage.check(Connection(a, None, "192.0.2.9", None), lambda c, r: None) == "address"
        assert stage.check(Connection(a, None, "127.0.0.1", None), lambda c, r: None) is None
    finally:
        a.close()
        b.close()


def test_the_access_stage_refuses_with_address():
    svc = Service(name="s", only_from=nets("127.0.0.0/8"), no_access=nets("127.0.0.2"))
    (stage,) = stages.build(svc)
    a, b = socket.socketpair()
    try:
        def check(peer: str):
            return stage.check(Connection(a, None, peer, None), lambda c, r: None)
        assert check("127.0.0.1") is None
        assert check("127.0.0.2") == "address"
        assert check("::ffff:127.0.0.9") is None
        assert check("192.0.2.1") == "address"
        assert check("uid:0") == "address"
    finally:
        a.close()
        b.close()


class Nothing:
    """No fact is known: what a stage asks for is what it would look up."""

    def __contains__(self, key) -> bool:
        return False

    def __getitem__(self, key):
        raise KeyError(key)


def name_access(only: list[str], deny: list[str]) -> stages.NameAccess:
    from superd.hostpatterns import HostSet, split
    return stages.NameAccess(None, 5.0, HostSet(*split(only)), HostSet(*split(deny)))


@pytest.mark.parametrize("only,deny,peer,answer", [
    # the peer's own address is allowed: an only_from name cannot add anything
    (["127.0.0.1", "a.test"], [], "127.0.0.1", None),
    # refused by the addresses and no only_from name: a no_access name cannot let it in
    (["10.0.0.0/8"], [".evil.test"], "127.0.0.9", "address"),
    (["10.0.0.0/8"], ["b.test"], "127.0.0.9", "address"),
    # a /32 no_access beats everything
    (["a.test"], ["127.0.0.9/32", "b.test"], "127.0.0.9", "address"),
])
def test_names_are_not_looked_up_when_the_addresses_decide(only, deny, peer, answer):
    conn = Connection(None, (peer, 1), peer, None)
    assert name_access(only, deny).decide(conn, Nothing()) == answer


def test_only_the_names_that_can_change_the_answer_are_looked_up():
    from superd.facts import addrs, name_of
    conn = Connection(None, ("127.0.0.1", 1), "127.0.0.1", None)
    # let in by 127/8: only the no_access name is asked, not the only_from one
    got = name_access(["127.0.0.0/8", "a.test"], ["b.test"]).decide(conn, Nothing())
    assert got == [addrs("b.test", 4)]
    # refused by the addresses: the only_from name (and the no_access one that could tie)
    got = name_access(["a.test"], [".evil.test"]).decide(conn, Nothing())
    assert got == [addrs("a.test", 4), name_of("127.0.0.1")]


def test_rules_look_up_no_name_whose_rule_cannot_change_the_answer():
    from superd.facts import addrs
    from superd.hostpatterns import HostSet, Rule, split
    from superd.rules import Rules
    conn = Connection(None, ("127.0.0.1", 1), "127.0.0.1", None)
    plain_allow = Rule(True, HostSet(*split(["a.test"])))
    # the last rules let in with nothing added: whether a.test matches changes nothing
    assert Rules(None, 5.0, (plain_allow,)).decide(conn, Nothing()) is None
    denying = Rule(False, HostSet(*split(["b.test"])))
    assert Rules(None, 5.0, (plain_allow, denying)).decide(conn, Nothing()) == \
        [addrs("a.test", 4)], "a later deny rule: a.test decides whether it is reached"
