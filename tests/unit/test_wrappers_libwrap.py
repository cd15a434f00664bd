"""superd's hosts_access(5) matching, held against the real libwrap (Debian's libwrap0).

The same hosts.allow / hosts.deny pairs and the same clients go to libwrap's own hosts_ctl()
(in a child process, through ctypes, with its hosts_allow_table and hosts_deny_table pointed
at the test's files) and to superd/wrappers.py; every verdict must agree. hosts_ctl() is given
the client's name (or `unknown`, or `paranoid`, the words tcpd itself uses) and user, so
libwrap looks nothing up.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from superd import wrappers  # noqa: E402
from superd.facts import USER, name_of  # noqa: E402
from superd.ident import Identity  # noqa: E402

LIBWRAP = "/lib/x86_64-linux-gnu/libwrap.so.0"
RUNNER = r'''
import ctypes, json, sys
lw = ctypes.CDLL(sys.argv[1])
tables = []
for name, path in (("hosts_allow_table", sys.argv[2]), ("hosts_deny_table", sys.argv[3])):
    keep = ctypes.c_char_p(path.encode())
    tables.append(keep)
    ctypes.c_void_p.in_dll(lw, name).value = ctypes.cast(keep, ctypes.c_void_p).value
lw.hosts_ctl.argtypes = [ctypes.c_char_p] * 4
out = [lw.hosts_ctl(*(x.encode() for x in case)) for case in json.load(sys.stdin)]
print(json.dumps(out))
'''

TABLES = {
    "lists": ("in.ftpd, in.telnetd: 10.0.0. .example.com EXCEPT bad.example.com\n"
              "sshd: ALL EXCEPT 192.168.1.0/255.255.255.0 EXCEPT 192.168.1.7\n"
              "ALL EXCEPT in.fingerd: [::1] [2001:db8::]/32 172.16.0.0/12\n",
              "ALL: ALL\n"),
    "words": ("ALL: LOCAL\nrsyncd: KNOWN\nin.ftpd: UNKNOWN\ngopher: PARANOID\n", "ALL: ALL\n"),
    "users": ("ALL: root@10.0.0. KNOWN@.example.com\nsshd: alice@ALL EXCEPT 10.9.\n",
              "ALL: ALL\n"),
    "wild": ("ALL: *.example.com 192.168.?.* host-??.test\n", "ALL: ALL\n"),
    "deny-only": ("", "in.ftpd: .evil.test 10.6.6.6\nALL EXCEPT sshd: 172.16.\n"),
    "options": ("sshd: 10.0.0.0/8: DENY\nin.ftpd: ALL: setenv X y: allow\n",
                "ALL: .example.com: allow\nALL: ALL\n"),
    "masks": ("ALL: 10.1.0.9/16 10.0.0.0/255.0.255.0 192.168.1.0/24x [2001:db8::1]/32\n"
              "sshd: 10.1.0. [10.0.0.5] [::ffff:10.0.0.1] 0.0.0.0/0\n", "ALL: ALL\n"),
    "case": ("all: all except Bad.Example.Com\n", "ALL: ALL\n"),
    "files": ("ALL: {tmp}/patterns EXCEPT {tmp}/missing\nsshd: ALL\n",
              "in.ftpd: ALL\nALL: ALL"),  # no newline at the end: still a line
    "nested": ("ALL EXCEPT sshd EXCEPT ALL: .example.com EXCEPT a.example.com EXCEPT 1.\n"
               "sshd EXCEPT in.ftpd: root@ALL EXCEPT 10.0.0.1 alice@10.\n", "ALL: ALL\n"),
    "syntax": ("# a comment\n\n in.ftpd : 10.0.0.1 \\\n  10.0.0.2\nno separator here\n"
               "sshd: [::ffff:10.1.0.0]/112\n", "ALL: ALL\n"),
}
DAEMONS = ["in.ftpd", "sshd", "in.fingerd", "rsyncd", "gopher", "in.telnetd"]
CLIENTS = [  # (address, name or unknown/paranoid, user or unknown)
    ("10.0.0.5", "unknown", "unknown"), ("10.0.0.1", "a.example.com", "root"),
    ("10.0.0.2", "bad.example.com", "unknown"), ("1.2.3.4", "a.example.com", "bob"),
    ("192.168.1.3", "unknown", "alice"), ("192.168.1.7", "x.example.com", "unknown"),
    ("192.168.2.9", "paranoid", "unknown"), ("::1", "localhost", "unknown"),
    ("2001:db8::5", "unknown", "unknown"), ("2001:db9::5", "v6.example.com", "root"),
    ("172.20.1.1", "gw", "unknown"), ("10.9.1.1", "host-01.test", "alice"),
    ("10.6.6.6", "b.evil.test", "unknown"), ("10.1.0.9", "unknown", "unknown"),
]


class Known(dict):
    """Facts as the stage would have them: the client's confirmed name, its user."""


def libwrap_verdicts(tmp: Path, allow: str, deny: str, cases: list[tuple]) -> list[int]:
    (tmp / "allow").write_text(allow.format(tmp=tmp))
    (tmp / "deny").write_text(deny.format(tmp=tmp))
    (tmp / "patterns").write_text(".example.com\n  10.9.  [::1]\n")
    out = subprocess.run([sys.executable, "-c", RUNNER, LIBWRAP, str(tmp / "allow"),
                          str(tmp / "deny")], input=json.dumps(cases), capture_output=True,
                         text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def ours(tmp: Path, case: tuple) -> int:
    daemon, name, addr, user = case
    stage = wrappers.TcpWrappers.__new__(wrappers.TcpWrappers)
    stage.daemon, stage.warned = daemon, set()
    stage.log = type("Quiet", (), {"warning": lambda self, text: None})()
    stage.tables = ((wrappers.Table(str(tmp / "allow"), wrappers.hostsfile.parse), True),
                    (wrappers.Table(str(tmp / "deny"), wrappers.hostsfile.parse), False))
    facts = Known({name_of(addr): name, name_of("127.0.0.1"): "unknown",
                   USER: None if user == "unknown" else Identity("UNIX", user)})
    return int(stage.verdict(wrappers.Request(daemon, addr, "127.0.0.1", facts), None)
               is None)


@pytest.mark.skipif(not os.path.exists(LIBWRAP), reason="libwrap0 is not installed")
@pytest.mark.parametrize("table", sorted(TABLES))
def test_verdicts_agree_with_libwrap(table, tmp_path):
    allow, deny = TABLES[table]
    cases = [(d, name, addr, user) for d, (addr, name, user) in
             itertools.product(DAEMONS, CLIENTS)]
    theirs = libwrap_verdicts(tmp_path, allow, deny, cases)
    mine = [ours(tmp_path, case) for case in cases]
    wrong = [(case, "libwrap", t, "superd", m)
             for case, t, m in zip(cases, theirs, mine, strict=True) if t != m]
    assert not wrong, f"{len(wrong)} of {len(cases)} verdicts differ, e.g. {wrong[:6]}"
    assert 0 < sum(theirs) < len(cases), "the cases must see both verdicts"
