"""fail2ban reads superd's log (issue 15): the shipped filter, config/fail2ban/superd.conf, run
by the real `fail2ban-regex` on the lines real daemons wrote through a real rsyslogd into a
syslog file in Debian's layout. Every FAIL line that names an address matches, with that
address; no START, EXIT or BACKOFF line does. (From the journal: tests/test_package.py.)

The FAIL lines are provoked for every reason superd has: address, service_limit,
per_source_limit, process_limit, exec, timeout.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from superd_testlib import REPO, connect, free_port, recv_exact, tcp_exchange, wait_until

FILTER = REPO / "config" / "fail2ban" / "superd.conf"
JAIL = REPO / "config" / "fail2ban" / "jail-superd.conf"
STOCK_FILTERS = Path("/etc/fail2ban/filter.d")
REASONS = {"address", "service_limit", "per_source_limit", "process_limit", "exec", "timeout"}
FAIL_WITH_ADDRESS = re.compile(r"FAIL: (\S+) (\S+) from=([0-9a-fA-F.:]+)$")


def fail2ban_regex(tmp_path: Path, log: Path, filter_name: str) -> tuple[list[str], list[str]]:
    """(matched lines, the address fail2ban took from each) of `fail2ban-regex LOG FILTER`,
    with the filter beside fail2ban's own common.conf, which it includes."""
    exe = shutil.which("fail2ban-regex")
    if exe is None or not (STOCK_FILTERS / "common.conf").exists():
        pytest.fail("fail2ban is not installed (bash .ci/setup --test installs it)")
    conf = tmp_path / "fail2ban"
    if not conf.exists():
        shutil.copytree(STOCK_FILTERS, conf / "filter.d")
        shutil.copy2(FILTER, conf / "filter.d" / "superd.conf")
    out = {}
    for what in ("msg", "ip"):
        r = subprocess.run([exe, "-c", str(conf), "-o", what, str(log), filter_name],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        out[what] = r.stdout.splitlines()
    return out["msg"], out["ip"]


def _refused(port: int) -> bool:
    """A line sent to /bin/cat comes back, unless superd refused the connection: then it is
    closed (EOF), or reset, since the line reached a socket closed unread."""
    with connect("127.0.0.1", port, 5) as s:
        s.sendall(b"y\n")
        try:
            return s.recv(2) == b""
        except ConnectionResetError:
            return True


def _hold(port: int) -> object:
    """An open connection to an exec `cat` service, known to have its handler running."""
    s = connect("127.0.0.1", port)
    s.sendall(b"x\n")
    assert recv_exact(s, 2) == b"x\n"
    return s


def test_the_filter_matches_every_fail_line_with_an_address_and_nothing_else(
        superd, tmp_path, rsyslog):
    ports = {name: free_port() for name in
             ("acl", "acl6", "busy", "persrc", "slow", "gone", "ok", "cat", "crash", "nohost",
              "one", "tftp")}
    gone = tmp_path / "gone.sh"
    gone.write_text("#!/bin/sh\nexit 0\n")
    gone.chmod(0o755)
    unix = tmp_path / "u.sock"
    cat = ["/bin/cat"]
    d = superd({
        "acl": {"listen": f"127.0.0.1:{ports['acl']}", "internal": "echo",
                "only_from": ["192.0.2.0/24"]},
        "acl6": {"listen": f"[::1]:{ports['acl6']}", "internal": "echo", "no_access": ["::1"]},
        "busy": {"listen": f"127.0.0.1:{ports['busy']}", "exec": cat, "instances": 1,
                 "on_limit": "refuse"},
        "persrc": {"listen": f"127.0.0.1:{ports['persrc']}", "exec": cat, "per_source": 1},
        "slow": {"listen": f"127.0.0.1:{ports['slow']}", "exec": ["/bin/sleep", "30"],
                 "timeout": 0.3},
        "gone": {"listen": f"127.0.0.1:{ports['gone']}", "exec": [str(gone)]},
        "ok": {"listen": f"127.0.0.1:{ports['ok']}", "internal": "echo"},
        "cat": {"listen": f"127.0.0.1:{ports['cat']}", "exec": ["/bin/echo", "hi"]},
        "crash": {"listen": f"127.0.0.1:{ports['crash']}", "exec": ["/bin/false"]},
        "nohost": {"listen": f"127.0.0.1:{ports['nohost']}", "internal": "echo",
                   "only_from": ["192.0.2.1"], "log_on_failure": ["attempt"]},
        "unixacl": {"listen": str(unix), "protocol": "unix", "internal": "echo",
                    "only_from": ["127.0.0.1"]},
        # A refused datagram's FAIL line: its source is whatever the sender wrote.
        "tftp": {"listen": f"127.0.0.1:{ports['tftp']}", "protocol": "udp", "wait": True,
                 "exec": ["/bin/true"], "only_from": ["192.0.2.0/24"]},
    })
    # A second daemon for process_limit: max_children counts the handlers of all services.
    d1 = superd({"one": {"listen": f"127.0.0.1:{ports['one']}", "exec": cat}},
                settings={"max_children": 1})

    for name in ("acl", "nohost"):
        assert tcp_exchange("127.0.0.1", ports[name], b"") == b""
    assert tcp_exchange("::1", ports["acl6"], b"") == b""
    held = [_hold(ports["busy"]), _hold(ports["persrc"]), _hold(ports["one"])]
    for port in (ports["busy"], ports["persrc"], ports["one"]):
        assert _refused(port)
    with connect("127.0.0.1", ports["slow"]):
        d.wait_log(r"^FAIL: slow timeout from=127\.0\.0\.1$")
    os.unlink(gone)
    for _ in range(5):  # five starts that fail in a row: BACKOFF
        with connect("127.0.0.1", ports["gone"], 10) as s:
            try:
                assert s.recv(10) == b""  # closed: its handler could not be started
            except ConnectionResetError:
                pass
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(unix))
        assert s.recv(10) == b""
    assert tcp_exchange("127.0.0.1", ports["ok"], b"ok\n", expect_len=3) == b"ok\n"
    assert tcp_exchange("127.0.0.1", ports["cat"], b"") == b"hi\n"
    for _ in range(5):  # five non-zero exits: no BACKOFF (nothing a client can trigger)
        tcp_exchange("127.0.0.1", ports["crash"], b"")
    d.wait_log(r"^BACKOFF: gone 1s$")
    d.wait_log(r"^FAIL: gone exec from=127\.0\.0\.1$")
    d.wait_log(r"^FAIL: unixacl address from=uid:\d+$")
    d.wait_log(r"^FAIL: nohost address$")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\0\1file\0octet\0", ("127.0.0.1", ports["tftp"]))
    d.wait_log(r"^FAIL: tftp address from=127\.0\.0\.1 \(datagram: its source is not "
               r"verified\)$")
    d1.wait_log(r"^FAIL: one process_limit from=127\.0\.0\.1$")
    for s in held:
        s.close()
    d.wait_exit("cat")

    # The same lines, as Debian's rsyslog writes /var/log/syslog: `Mon DD HH:MM:SS host
    # superd[PID]: message`. Only these two daemons' lines go into the file fail2ban reads.
    ours = re.compile(rf" superd\[({d.pid}|{d1.pid})\]: ")
    want = len(d.lines()) + len(d1.lines())

    def our_lines():
        lines = [x for x in rsyslog.syslog_file.read_text(errors="replace").splitlines()
                 if ours.search(x)]
        return lines if len(lines) >= want else None
    lines = wait_until(our_lines, 10, "the daemons' lines in the syslog file")
    log = tmp_path / "syslog"
    log.write_text("\n".join(lines) + "\n")

    fails = [x for x in lines if FAIL_WITH_ADDRESS.search(x)]
    assert {FAIL_WITH_ADDRESS.search(x)[2] for x in fails} == REASONS, \
        "every FAIL reason superd has is provoked above"
    assert any(x.endswith(" from=::1") for x in fails)
    matched, ips = fail2ban_regex(tmp_path, log, "superd")
    assert matched == fails, "exactly the FAIL lines with an address, in order"
    assert ips == [FAIL_WITH_ADDRESS.search(x)[3] for x in fails], "the address each names"
    events = [x for x in lines if re.search(r": (START|EXIT|BACKOFF): ", x)]
    assert len(events) >= 10 and not set(events) & set(matched)
    unbannable = [x for x in lines if "FAIL: " in x and x not in fails]
    assert len(unbannable) == 3, ("from=uid:N, a FAIL line without host and a refused "
                                  "datagram's: nothing to ban")

    # The README used to promise that fail2ban's stock xinetd filter keeps working: with its
    # _daemon = xinetd it matches not one of superd's lines.
    stock, _ = fail2ban_regex(tmp_path, log, "xinetd-fail")
    assert stock == []


def test_the_filter_can_be_narrowed_to_some_reasons(superd, tmp_path, rsyslog):
    pa, pb = free_port(), free_port()
    d = superd({"a": {"listen": f"127.0.0.1:{pa}", "internal": "echo", "only_from": ["192.0.2.1"]},
                "b": {"listen": f"127.0.0.1:{pb}", "exec": ["/bin/sleep", "30"],
                      "timeout": 0.2}})
    assert tcp_exchange("127.0.0.1", pa, b"") == b""
    with connect("127.0.0.1", pb):
        d.wait_log(r"^FAIL: b timeout from=")
    d.wait_log(r"^FAIL: a address from=")
    tag = f" superd[{d.pid}]: "

    def our_lines():
        lines = [x for x in rsyslog.syslog_file.read_text().splitlines() if tag in x]
        return lines if sum("FAIL: " in x for x in lines) >= 2 else None
    lines = wait_until(our_lines, 10, "both FAIL lines in the syslog file")
    log = tmp_path / "syslog"
    log.write_text("\n".join(lines) + "\n")
    matched, _ = fail2ban_regex(tmp_path, log, 'superd[reasons="address|per_source_limit"]')
    assert [m.split(tag)[1] for m in matched] == ["FAIL: a address from=127.0.0.1"]


def test_the_jail_example_uses_the_filter():
    jail = JAIL.read_text()
    assert re.search(r"^\[superd\]$", jail, re.M)
    assert re.search(r"^filter\s*=\s*superd$", jail, re.M)
    assert re.search(r"^backend\s*=\s*systemd$", jail, re.M)
