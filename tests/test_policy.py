"""Per-connection policies (issue 14): env_file (3), per_source_rate (7), host_env (9),
banners, access_times, the sensor and max_load (10). Real clients from 127.0.0.x; names
from a dnsmasq the test starts, in superd's own mount namespace.
"""

from __future__ import annotations

import os
import re
import socket
import time

import pytest
from access_lib import check, dnsmasq, names_etc, refused, served, start_private
from limits_lib import connect_from, svc_status
from superd_testlib import free_port, recv_until_eof

SHOW = ["/bin/sh", "-c", 'echo "[$TCPREMOTEHOST] [$TCPLOCALHOST] [$TCPCONNNUM] [$A] [$B] [$C]"']


def test_env_file_as_systemd_reads_it(superd, tmp_path):
    env = tmp_path / "default"
    env.write_text('# comment\n; also\nA="quoted value"\nB=\'single $x\'\nC=bare word  \n')
    port = free_port()
    superd({"e": {"listen": f"127.0.0.1:{port}", "exec": SHOW, "env": {"A": "from env"},
                  "env_file": [str(env), f"-{tmp_path}/missing"]}})
    assert served("127.0.0.1", port) == b"[] [] [] [quoted value] [single $x] [bare word]\n", \
        "EnvironmentFile= wins over env; a missing -file is fine"


def test_env_file_problems_name_the_line(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("OK=1\nnot an assignment\n")
    table = tmp_path / "t.yaml"
    r = check(table, f"services:\n  e:\n    listen: 7\n    internal: echo\n"
                     f"    env_file: [{bad}]\n  f:\n    listen: 8\n    internal: echo\n"
                     f"    env_file: {tmp_path}/none\n")
    assert r.returncode == 1
    assert f"{table}:5: services.e.env_file: {bad}:2: expected NAME=value" in r.stdout
    assert f"{table}:9: services.f.env_file: {tmp_path}/none: No such file or directory" \
        in r.stdout


def test_per_source_rate(superd):
    port = free_port()
    d = superd({"r": {"listen": f"0.0.0.0:{port}", "exec": ["/bin/echo", "hi"],
                      "per_source_rate": "3/min"}})
    for _ in range(3):
        assert served("127.0.0.2", port) == b"hi\n"
    refused(d, "r", "127.0.0.2", port, "per_source_rate")
    assert served("127.0.0.3", port) == b"hi\n", "another source has its own budget"
    assert svc_status(d, "r")["refused"] == {"per_source_rate": 1}


@pytest.fixture
def dns(tmp_path):
    server = dnsmasq(tmp_path, {"good.example.test": ["127.0.0.2"]},
                     {"127.0.0.3": "liar.example.test"})
    yield server
    server.stop()


def test_host_env_as_tcpserver_sets_it(new_daemon, dns, tmp_path):
    port = free_port()
    start_private(new_daemon, {"h": {"listen": f"0.0.0.0:{port}", "host_env": True,
                                     "exec": ["/bin/sh", "-c", 'read x; echo "$TCPREMOTEHOST '
                                              '$TCPLOCALHOST $TCPCONNNUM"']}},
                  names_etc(tmp_path / "etc", dns.ip))
    with connect_from("127.0.0.2", "127.0.0.1", port) as first:
        with connect_from("127.0.0.2", "127.0.0.1", port) as second:
            # both wait for "go" in their handlers: the second one counted the first
            for s in (first, second):
                s.sendall(b"go\n")
                s.shutdown(socket.SHUT_WR)
            got = sorted([recv_until_eof(first), recv_until_eof(second)])
    assert got == [b"good.example.test localhost 1\n", b"good.example.test localhost 2\n"]
    with connect_from("127.0.0.3", "127.0.0.1", port) as s:
        s.sendall(b"go\n")
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == b" localhost 1\n", "a PTR that lies sets no name"


def test_banners_before_and_after_the_checks(superd, tmp_path):
    for name, text in (("b", "WELCOME\n"), ("ok", "OK\n"), ("no", "GO AWAY\n")):
        (tmp_path / name).write_text(text)
    port = free_port()
    superd({"ban": {"listen": f"0.0.0.0:{port}", "exec": ["/bin/echo", "hi"],
                    "only_from": ["127.0.0.2"], "banner": str(tmp_path / "b"),
                    "banner_success": str(tmp_path / "ok"), "banner_fail": str(tmp_path / "no")}})
    assert served("127.0.0.2", port) == b"WELCOME\nOK\nhi\n"
    assert served("127.0.0.3", port) == b"WELCOME\nGO AWAY\n"


def test_a_banner_larger_than_the_window_waits_for_the_reader(superd, tmp_path):
    big = os.urandom(60_000)
    (tmp_path / "big").write_bytes(big)
    port = free_port()
    superd({"big": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/echo", "after"],
                    "banner": str(tmp_path / "big")}})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    s.connect(("127.0.0.1", port))
    got = recv_until_eof(s, 10)
    s.close()
    assert got == big + b"after\n"


def test_access_times(superd):
    now = time.localtime()
    minute = now.tm_hour * 60 + now.tm_min

    def hhmm(m: int) -> str:
        m %= 24 * 60
        return f"{m // 60:02d}:{m % 60:02d}"
    open_now, closed_now = free_port(), free_port()
    d = superd({
        "open": {"listen": f"127.0.0.1:{open_now}", "exec": ["/bin/echo", "hi"],
                 "access_times": [f"{hhmm(minute + 30)}-{hhmm(minute + 40)}",
                                  f"{hhmm(minute - 2)}-{hhmm(minute + 3)}"]},
        "shut": {"listen": f"127.0.0.1:{closed_now}", "exec": ["/bin/echo", "hi"],
                 "access_times": [f"{hhmm(minute + 5)}-{hhmm(minute - 5)}"]},
    })
    assert served("127.0.0.1", open_now) == b"hi\n"
    refused(d, "shut", "127.0.0.1", closed_now, "time")


def test_a_sensor_bans_its_caller_from_every_service(superd):
    trap, real, never = free_port(), free_port(), free_port()
    d = superd({"trap": {"listen": f"0.0.0.0:{trap}", "sensor": True, "deny_time": 1},
                "soft": {"listen": f"0.0.0.0:{never}", "sensor": True, "deny_time": "never"},
                "real": {"listen": f"0.0.0.0:{real}", "exec": ["/bin/echo", "hi"]}})
    refused(d, "soft", "127.0.0.4", never, "sensor")
    assert served("127.0.0.4", real) == b"hi\n", "deny_time: never only logs"
    refused(d, "trap", "127.0.0.5", trap, "sensor")
    d.wait_log(r"^SENSOR: trap from=127\.0\.0\.5: refused on every service for 1 min$")
    refused(d, "real", "127.0.0.5", real, "address")
    assert served("127.0.0.6", real) == b"hi\n"


def test_a_sensor_on_udp_is_refused(tmp_path):
    r = check(tmp_path / "t.yaml", "services:\n  trap:\n    listen: 7\n    protocol: udp\n"
                                   "    wait: true\n    sensor: true\n")
    assert r.returncode == 1 and re.search(r"t\.yaml:\d+: services\.trap\.sensor: sensor "
                                           r"applies to connections superd accepts", r.stdout)


def test_max_load(superd):
    load = os.getloadavg()[0]
    if load < 0.02:
        pytest.skip("the machine is idle: no load average to stay under")
    low, high = free_port(), free_port()
    d = superd({"low": {"listen": f"127.0.0.1:{low}", "exec": ["/bin/echo", "hi"],
                        "max_load": load / 4},
                "high": {"listen": f"127.0.0.1:{high}", "exec": ["/bin/echo", "hi"],
                         "max_load": 1000}})
    refused(d, "low", "127.0.0.1", low, "load")
    assert served("127.0.0.1", high) == b"hi\n"

