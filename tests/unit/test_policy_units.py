"""Pure logic of issue 14's pieces, in-process: env_file parsing, time windows, the bounded
per-source and ban tables, host rule lists, the ident reply, the tcprules reader."""

from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from superd import envfile, hostpatterns, ident, policy  # noqa: E402
from superd.importer import tcprules  # noqa: E402


def test_env_file_forms():
    text = ('# c\n; c\n  A=1\nB = two words  \nC="q \\"x\\" \\$y"\nD=\'s \\n\'\n'
            'E=con\\\ntinued\nF=\nG="multi\nline"\nH=a\\ b\n')
    assert envfile.parse(text, "f") == [
        ("A", "1"), ("B", "two words"), ("C", 'q "x" $y'), ("D", "s \\n"), ("E", "continued"),
        ("F", ""), ("G", "multi\nline"), ("H", "a b")]
    for bad, why in (("X\n", "f:1: expected NAME=value"), ("1X=2\n", "is not a variable"),
                     ('A="open\n', "quote is not closed")):
        with pytest.raises(ValueError, match=why):
            envfile.parse(bad, "f")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_access_times_across_midnight():
    def at(h: int, m: int) -> time.struct_time:
        return time.struct_time((2024, 1, 1, h, m, 0, 0, 1, 0))
    stage = policy.AccessTimes(((22 * 60, 2 * 60),))
    for h, m, ok in ((23, 0, True), (1, 59, True), (2, 0, True), (2, 1, False), (21, 59, False)):
        stage.now = lambda h=h, m=m: at(h, m)
        assert (stage.check(None, None) is None) == ok, (h, m)  # type: ignore[arg-type]


class Conn:
    def __init__(self, peer: str):
        self.peer, self.addr = peer, (peer, 1)


def test_per_source_rate_refills_and_stays_bounded(monkeypatch):
    clock = Clock()
    stage = policy.PerSourceRate((2, 60.0), clock)
    assert [stage.check(Conn("10.0.0.1"), None) for _ in range(3)] == \
        [None, None, "per_source_rate"]  # type: ignore[arg-type]
    clock.now += 30  # one token back
    assert stage.check(Conn("10.0.0.1"), None) is None  # type: ignore[arg-type]
    monkeypatch.setattr(policy, "MAX_SOURCES", 100)
    for i in range(1000):
        stage.check(Conn(f"10.1.{i // 250}.{i % 250}"), None)  # type: ignore[arg-type]
    assert len(stage.buckets) <= 100


def test_bans_expire_and_stay_bounded(monkeypatch):
    clock = Clock()
    bans = policy.Bans(clock)
    bans.ban("10.0.0.1", 60)
    assert bans.banned("10.0.0.1") and not bans.banned("10.0.0.2")
    clock.now += 61
    assert not bans.banned("10.0.0.1")
    monkeypatch.setattr(policy, "MAX_BANS", 50)
    for i in range(500):
        bans.ban(f"10.2.{i // 250}.{i % 250}", float("inf"))
    assert len(bans.until) <= 50


def test_host_lists():
    nets, names = hostpatterns.split(["10.0.0.0/8", "LocalHost", ".Example.COM", "::1"])
    assert [str(n) for n in nets] == ["10.0.0.0/8", "::1/128"]
    assert names == ("localhost", ".example.com")
    for bad in ("10.0.0.", "a b", "-x", "1.2.3.4.5"):
        with pytest.raises(ValueError, match="not an IP address, a CIDR, a host name"):
            hostpatterns.split([bad])


def test_ident_replies():
    ok = ident.parse_reply(b"6193, 23 : USERID : UNIX : stjohns\r", 6193, 23)
    assert ok == ident.Identity("UNIX", "stjohns")
    assert ident.parse_reply(b"6193, 23 : USERID : OTHER,UTF-8 :a:b\r", 6193, 23).user == "a:b"
    assert ident.parse_reply(b"6193, 24 : USERID : UNIX : x\r", 6193, 23) is None
    assert ident.parse_reply(b"6193, 23 : ERROR : NO-USER\r", 6193, 23) is None
    assert ident.parse_reply(b"6193, 23 : USERID : UNIX : \x1b[31mx\r", 6193, 23).user == \
        "?[31mx"


def test_tcprules_reader(tmp_path):
    src = tmp_path / "rules"
    src.write_text(':allow\n10.:deny\n10.1.:allow,A="1",B=/x/\n10.1.2.3:allow\n'
                   '=a.example:allow\n=.example:deny\nu@1.2.3.4:deny\n')
    lines, dropped = tcprules.translate(str(src))
    assert [(line.hosts, line.allow) for line in lines] == [
        (["10.1.2.3"], True), (["a.example"], True), (["10.1.0.0/16"], True),
        (["10.0.0.0/8"], False), ([".example"], False), (["all"], True)]
    assert lines[2].env == {"A": "1", "B": "x"}
    assert len(dropped) == 1 and "user@ rules" in dropped[0]
