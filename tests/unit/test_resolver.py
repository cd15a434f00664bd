"""superd's own resolver against a real name server (dnsmasq on a private 127/8 address) and
against one that never answers; the DNS message reader against broken messages.

In-process: a real superd Loop drives the lookups; the system files it reads (nsswitch.conf,
hosts, resolv.conf) are private copies given to SystemNames. No real DNS is asked.
"""

from __future__ import annotations

import os
import struct
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dns_lib import Dnsmasq, SilentDns, etc_file  # noqa: E402

from superd import dnswire  # noqa: E402
from superd.facts import PARANOID, UNKNOWN  # noqa: E402
from superd.loop import Loop  # noqa: E402
from superd.resolver import Resolver  # noqa: E402
from superd.sysnames import SystemNames, parse_hosts, parse_resolv, parse_sources  # noqa: E402


class Clock:
    def __init__(self):
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


@pytest.fixture
def loop():
    lp = Loop(lambda signum: None, ())
    yield lp
    lp.close()


def system(tmp_path, server: str, hosts: str = "", sources: str = "files dns",
           clock=time.monotonic) -> SystemNames:
    paths = (str(etc_file(tmp_path, "nsswitch.conf", f"hosts: {sources}\n")),
             str(etc_file(tmp_path, "hosts", hosts)),
             str(etc_file(tmp_path, "resolv.conf",
                          f"nameserver {server}\noptions timeout:1 attempts:1\n")))
    return SystemNames(clock, paths)


def run(loop: Loop, results: list, count: int, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while len(results) < count and time.monotonic() < end:
        loop.run_once()
    assert len(results) >= count, f"only {results} within {timeout}s"


@pytest.fixture
def dns(tmp_path):
    server = Dnsmasq(tmp_path, {"good.example.test": ["127.0.0.2", "::2"],
                                "two.example.test": ["127.0.0.4", "127.0.0.5"]},
                     {"127.0.0.3": "liar.example.test"}, ttl=30).start()
    yield server
    server.stop()


def test_names_addresses_and_paranoid_names(loop, dns, tmp_path):
    r = Resolver(loop, system=system(tmp_path, dns.ip))
    out: dict = {}
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.9", "::2"):
        got = r.confirmed_name(ip, lambda v, ip=ip: out.__setitem__(ip, v))
        assert got is False, "nothing is known yet: the answer must come later"
    got = r.addresses("two.example.test", 4, lambda v: out.__setitem__("two", v))
    assert got is None
    run(loop, out, 5)
    assert out["127.0.0.2"] == "good.example.test"
    assert out["::2"] == "good.example.test"
    assert out["127.0.0.3"] == PARANOID, "a PTR whose name has no such address is a lie"
    assert out["127.0.0.9"] == UNKNOWN
    assert out["two"].ok and sorted(out["two"].values) == ["127.0.0.4", "127.0.0.5"]
    # answered from the cache now: at once, no new query
    asked = len(dns.queries())
    assert r.confirmed_name("127.0.0.2", lambda v: None) == "good.example.test"
    assert len(dns.queries()) == asked


def test_ttl_is_honoured(loop, tmp_path):
    server = Dnsmasq(tmp_path, {"short.example.test": ["127.0.0.7"]}, ttl=5).start()
    try:
        clock = Clock()
        r = Resolver(loop, clock=clock, system=system(tmp_path, server.ip, clock=clock))
        out: list = []
        assert r.addresses("short.example.test", 4, out.append) is None
        run(loop, out, 1)
        assert r.addresses("short.example.test", 4, out.append).values == ("127.0.0.7",)
        clock.offset = 4.0
        assert r.addresses("short.example.test", 4, out.append) is not None, "still fresh"
        clock.offset = 6.0
        assert r.addresses("short.example.test", 4, out.append) is None, "expired: ask again"
        run(loop, out, 2)
        assert server.queries().count("short.example.test") == 2
    finally:
        server.stop()


def test_questions_asked_together_share_one_query(loop, dns, tmp_path):
    r = Resolver(loop, system=system(tmp_path, dns.ip))
    out: list = []
    for _ in range(20):
        assert r.addresses("good.example.test", 4, out.append) is None
    run(loop, out, 20)
    assert all(x.values == ("127.0.0.2",) for x in out)
    assert dns.queries().count("good.example.test") == 1


def test_hosts_file_first_and_nsswitch_order(loop, dns, tmp_path):
    hosts = "127.0.0.8 eight.example.test eight\n::8 eight.example.test\n"
    r = Resolver(loop, system=system(tmp_path, dns.ip, hosts))
    assert r.addresses("EIGHT.example.test", 4, print).values == ("127.0.0.8",)
    assert r.addresses("eight.example.test", 6, print).values == ("::8",)
    assert r.addresses("eight", 4, print).values == ("127.0.0.8",)
    assert r.confirmed_name("127.0.0.8", print) == "eight.example.test"
    assert dns.queries() == ["ping.test"], "answered from the hosts file alone"
    only_dns = Resolver(loop, system=system(tmp_path / "..", dns.ip, hosts, "dns"))
    out: list = []
    assert only_dns.addresses("eight.example.test", 4, out.append) is None
    run(loop, out, 1)
    assert out[0].ok and out[0].values == ()


def test_a_server_that_never_answers_fails_the_lookup(loop, tmp_path):
    silent = SilentDns().start()
    try:
        r = Resolver(loop, system=system(tmp_path, silent.ip))
        out: list = []
        started = time.monotonic()
        assert r.confirmed_name("127.0.0.2", out.append) is False
        run(loop, out, 1, timeout=5)
        assert out == [None], "no answer is a failure, never 'no such name'"
        assert 0.9 < time.monotonic() - started < 3
        assert silent.count >= 1
        assert r.confirmed_name("127.0.0.2", out.append) is False, "a failure is not cached"
    finally:
        silent.stop()


def test_messages_that_are_not_answers_are_refused():
    q = dnswire.query(7, "a.test", dnswire.A)
    with pytest.raises(dnswire.BadMessage):
        dnswire.parse(q, 7, "a.test", dnswire.A)  # a query, not an answer
    answer = bytearray(q)
    answer[2] |= 0x80
    with pytest.raises(dnswire.BadMessage):
        dnswire.parse(bytes(answer), 8, "a.test", dnswire.A)  # another id
    with pytest.raises(dnswire.BadMessage):
        dnswire.parse(bytes(answer), 7, "b.test", dnswire.A)  # another question
    looped = bytes(answer[:12]) + b"\xc0\x0c" + b"\x00\x01\x00\x01"
    with pytest.raises(dnswire.BadMessage):
        dnswire.parse(looped, 7, "a.test", dnswire.A)  # a name that points at itself
    truncated = bytearray(answer)
    truncated[2] |= 0x02
    with pytest.raises(dnswire.Truncated):
        dnswire.parse(bytes(truncated), 7, "a.test", dnswire.A)


def test_answer_with_cname_chain_and_negative_ttl():
    name = dnswire.encode_name
    header = struct.pack("!HHHHHH", 9, 0x8180, 1, 2, 0, 0)
    question = name("www.a.test") + struct.pack("!HH", dnswire.A, 1)
    cname = name("www.a.test") + struct.pack("!HHIH", dnswire.CNAME, 1, 300, 8) + \
        name("b.test")
    a = name("b.test") + struct.pack("!HHIH", dnswire.A, 1, 60, 4) + bytes([10, 0, 0, 1])
    rcode, got = dnswire.parse(header + question + cname + a, 9, "www.a.test", dnswire.A)
    assert got == dnswire.Answer(True, ("10.0.0.1",), 60)
    soa = name("a.test") + struct.pack("!HHIH", dnswire.SOA, 1, 900, 1 + 1 + 20) + \
        b"\x00\x00" + struct.pack("!IIIII", 1, 2, 3, 4, 120)
    nx = struct.pack("!HHHHHH", 9, 0x8183, 1, 0, 1, 0) + question + soa
    rcode, got = dnswire.parse(nx, 9, "www.a.test", dnswire.A)
    assert rcode == dnswire.NXDOMAIN and got == dnswire.Answer(False, (), 120)


def test_system_files():
    assert parse_sources("hosts: files mdns4_minimal [NOTFOUND=return] dns myhostname\n") == \
        ("files", "dns")
    assert parse_sources("hosts: resolve [!UNAVAIL=return] files\n") == ("dns", "files")
    forward, reverse = parse_hosts("127.0.0.1 localhost\n# x\n::1 localhost ip6-localhost\n"
                                   "10.0.0.1 a.test a\n10.0.0.2 a.test\n")
    assert forward["localhost"] == ("127.0.0.1", "::1")
    assert forward["a.test"] == ("10.0.0.1", "10.0.0.2") and reverse["10.0.0.2"] == "a.test"
    assert parse_resolv("nameserver 10.1.1.1\nnameserver bogus\noptions timeout:2 "
                        "attempts:3\n") == (("10.1.1.1",), 2.0, 3)
    assert parse_resolv("") == (("127.0.0.1",), 5.0, 2)
