"""The Debian package (issue 15), installed into a fresh Debian root with a real systemd
(tests/systemd_lib.py) the way an admin installs it: `apt-get install`, offline, no compiler.

In order, on one container: the install enables and starts superd with a table that opens no
port; the man pages, completion, handlers and fail2ban filter are where the docs say; a
conf.d service answers after `systemctl start`, another after `systemctl reload`; superd's
records reach rsyslog (behind journald) with the facility and ident of settings.syslog;
fail2ban-regex finds every FAIL line with an address in the journal; `apt-get remove` stops
superd and keeps the conffiles, `apt-get purge` removes them.
"""

from __future__ import annotations

import json
import re
import time

import package_lib as pl
import pytest
import systemd_lib as sl
import yaml
from superd_testlib import (
    REPO,
    connect,
    connection_refused,
    free_port,
    recv_until_eof,
    tcp_exchange,
    udp_request,
    wait_until,
)

import superd

CONFD = "/etc/superd/conf.d"
SERVICES = "/usr/lib/superd/services"


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    why = sl.nspawn_missing()
    if why:
        pytest.skip(why)
    work = tmp_path_factory.mktemp("pkg")
    deb = pl.built_deb(work)
    lock = sl.RootLock()
    container = None
    try:
        root = sl.container_root()
        deps = sl.dependency_debs(root, pl.deb_depends(deb) + list(pl.EXTRA_PACKAGES))
        t0 = time.monotonic()
        container = pl.boot_with_package(root, work, deb, deps)
        container.install_seconds = time.monotonic() - t0
        yield container
    finally:
        if container is not None:
            container.halt()
        lock.release()


def test_the_package_version_is_the_projects():
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert re.match(rf"^superd \({re.escape(superd.__version__)}\) ", first), \
        f"debian/changelog says {first!r}; superd/__init__.py says {superd.__version__}"


def write(box: sl.Container, path: str, text: str) -> None:
    """A file inside, as root writes it (0644: superd refuses tables others may write)."""
    box.run(["sh", "-c", 'umask 022 && cat > "$1.tmp" && mv "$1.tmp" "$1"', "sh", path],
            input=text)


def show(box: sl.Container, *props: str) -> dict[str, str]:
    out = box.run(["systemctl", "show", "superd", "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def inet_sockets(box: sl.Container, pid: int) -> list[str]:
    """The sockets process `pid` holds that are not unix sockets (so: ports)."""
    script = ('for f in /proc/$1/fd/*; do readlink "$f"; done | sed -n "s/^socket:\\[\\(.*\\)\\]'
              '$/\\1/p"; echo --; awk "NR > 1 {print \\$7}" /proc/net/unix')
    out = box.run(["sh", "-c", script, "sh", str(pid)]).stdout
    mine, _, unix = out.partition("--\n")
    return sorted(set(mine.split()) - set(unix.split()))


def test_installs_offline_without_a_compiler_and_starts_listening_on_nothing(box):
    assert box.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "superd"]).stdout == \
        f"install ok installed {superd.__version__}"
    # (gcc-12-base, which libgcc-s1 needs, is a doc folder, not a compiler.)
    r = box.run(["sh", "-c", "command -v cc gcc c99 cpp x86_64-linux-gnu-gcc-12; dpkg -l | awk "
                 "'$1 == \"ii\" && $2 ~ /^(gcc|gcc-[0-9]+|cpp|cpp-[0-9]+|libc6-dev|python3-dev"
                 "|build-essential)(:[a-z0-9]+)?$/'"], check=False)
    assert r.stdout.strip() == "", f"a compiler came with it: {r.stdout}"
    assert box.run(["systemctl", "is-enabled", "superd"]).stdout.strip() == "enabled"
    assert box.run(["systemctl", "is-active", "superd"]).stdout.strip() == "active"
    assert box.run(["systemctl", "is-enabled", "superd.socket"],
                   check=False).stdout.strip() == "disabled"
    st = json.loads(box.run(["superd", "status", "--json"]).stdout)
    assert st["services"] == {} and st["table"] == "/etc/superd/superd.yaml"
    pid = int(show(box, "MainPID")["MainPID"])
    assert st["pid"] == pid and inet_sockets(box, pid) == [], "installing opened a port"
    conffiles = box.run(["dpkg-query", "-W", "-f=${Conffiles}", "superd"]).stdout
    assert re.findall(r"^ (\S+)", conffiles, re.M) == [
        "/etc/fail2ban/filter.d/superd.conf", "/etc/superd/superd.yaml"]
    table = yaml.safe_load(box.run(["cat", "/etc/superd/superd.yaml"]).stdout)
    assert table["include"] == ["conf.d/*.yaml"] and table["services"] == {}
    assert box.run(["ls", "-A", CONFD]).stdout == ""
    r = box.run(["systemd-analyze", "verify", "--man=no",
                 "/lib/systemd/system/superd.service", "/lib/systemd/system/superd.socket"],
                check=False)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_man_pages_completion_handlers_and_filter_are_installed(box):
    for page, section in (("superd", 8), ("superd.yaml", 5), ("superd-handler", 7)):
        where = box.run(["man", "-w", page]).stdout.strip()
        assert where == f"/usr/share/man/man{section}/{page}.{section}.gz"
    text = box.run(["env", "MANWIDTH=200", "MANPAGER=cat", "man", "superd.yaml"]).stdout
    assert all(k in text for k in ("per_source", "shutdown_grace", "log_on_failure"))
    assert "EXIT STATUS" in box.run(["env", "MANPAGER=cat", "man", "superd"]).stdout
    for path in ("/usr/share/bash-completion/completions/superd",
                 "/usr/share/zsh/vendor-completions/_superd",
                 "/etc/fail2ban/filter.d/superd.conf",
                 "/usr/share/doc/superd/examples/jail-superd.conf",
                 "/usr/share/doc/superd/services.md.gz",
                 f"{SERVICES}/hello.py"):
        box.run(["test", "-f", path])
    for program in ("http_hello", "udp_upper"):
        box.run(["test", "-x", f"{SERVICES}/{program}"])


def test_a_conf_d_service_answers_after_start_and_another_after_reload(box):
    pe, ph, pu = free_port(), free_port(), free_port()
    box.run(["systemctl", "stop", "superd"])
    write(box, f"{CONFD}/echo.yaml", yaml.safe_dump({"services": {
        "echo": {"listen": f"127.0.0.1:{pe}", "internal": "echo"},
        "hello": {"listen": f"127.0.0.1:{ph}", "python": f"{SERVICES}/hello.py:handle"}}}))
    box.run(["superd", "check"])
    box.run(["systemctl", "start", "superd"])  # Type=notify: returns once every port is bound
    assert tcp_exchange("127.0.0.1", pe, b"ping\n", expect_len=5) == b"ping\n"
    with connect("127.0.0.1", ph) as s:
        s.sendall(b"upper shout\nquit\n")
        got = recv_until_eof(s)
    assert b"SHOUT\r\n" in got or b"SHOUT\n" in got, got
    main = show(box, "MainPID")["MainPID"]

    write(box, f"{CONFD}/upper.yaml", yaml.safe_dump({"services": {"upper-u": {
        "listen": f"127.0.0.1:{pu}", "protocol": "udp", "wait": True,
        "exec": [f"{SERVICES}/udp_upper"]}}}))
    box.run(["systemctl", "reload", "superd"])
    # systemd 252 returns from reload once SIGHUP is sent: wait (bounded) for the new service.
    def upper() -> bool:
        reply = udp_request("127.0.0.1", pu, b"hi", timeout=0.5)
        return reply is not None and reply[0] == b"HI"
    wait_until(upper, 15,
               "upper-u after systemctl reload", interval=0.2)
    assert show(box, "MainPID")["MainPID"] == main, "reloaded, not restarted"
    assert tcp_exchange("127.0.0.1", pe, b"still\n", expect_len=6) == b"still\n"
    st = json.loads(box.run(["superd", "status", "--json"]).stdout)
    assert sorted(st["services"]) == ["echo", "hello", "upper-u"]


def _log_lines(box: sl.Container, path: str) -> list[str]:
    return box.run(["sh", "-c", f'cat "{path}" 2>/dev/null || true']).stdout.splitlines()


def test_settings_syslog_facility_and_ident_reach_rsyslog_behind_journald(box):
    # Debian 12's rsyslog.conf has user.log but no daemon.log: an admin who wants one adds it.
    write(box, "/etc/rsyslog.d/superd-test.conf",
          "daemon.* -/var/log/daemon.log\nlocal3.* -/var/log/local3.log\n")
    box.run(["systemctl", "restart", "rsyslog"])
    port = free_port()
    write(box, f"{CONFD}/probe.yaml", yaml.safe_dump({"services": {
        "probe": {"listen": f"127.0.0.1:{port}", "internal": "echo"}}}))
    box.run(["superd", "reload"])  # returns once the reload is done
    pid = show(box, "MainPID")["MainPID"]
    assert tcp_exchange("127.0.0.1", port, b"a\n", expect_len=2) == b"a\n"
    start = re.compile(rf" superd\[{pid}\]: START: probe pid=0 from=127\.0\.0\.1$")
    wait_until(lambda: any(start.search(x) for x in _log_lines(box, "/var/log/daemon.log")),
               15, "superd's START line in /var/log/daemon.log (facility: daemon)",
               interval=0.2)
    assert not any("superd" in x for x in _log_lines(box, "/var/log/user.log")), \
        "facility daemon, not user"

    table = box.run(["cat", "/etc/superd/superd.yaml"]).stdout
    edited = table.replace("facility: daemon, ident: superd", "facility: local3, "
                           "ident: superd-edge")
    assert edited != table
    write(box, "/etc/superd/superd.yaml", edited)
    try:
        box.run(["superd", "reload"])
        assert tcp_exchange("127.0.0.1", port, b"b\n", expect_len=2) == b"b\n"
        edge = re.compile(rf" superd-edge\[{pid}\]: START: probe pid=0 from=127\.0\.0\.1$")
        wait_until(lambda: any(edge.search(x) for x in _log_lines(box, "/var/log/local3.log")),
                   15, "the START line as superd-edge in /var/log/local3.log", interval=0.2)
        journal = box.journal("-u", "superd", "-t", "superd-edge", "-o", "json")
        records = [json.loads(x) for x in journal.splitlines()]
        assert records and all(r["SYSLOG_FACILITY"] == "19" for r in records)  # local3
    finally:
        write(box, "/etc/superd/superd.yaml", table)
        box.run(["superd", "reload"])
        box.run(["rm", "-f", f"{CONFD}/probe.yaml"])
        box.run(["superd", "reload"])


def test_fail2ban_regex_finds_every_fail_line_in_the_journal(box):
    p4, p6, ps = free_port(), free_port(), free_port()
    write(box, f"{CONFD}/refuse.yaml", yaml.safe_dump({"services": {
        "deny4": {"listen": f"127.0.0.1:{p4}", "internal": "echo", "only_from": ["192.0.2.0/24"]},
        "deny6": {"listen": f"[::1]:{p6}", "internal": "echo", "no_access": ["::1"]},
        "one": {"listen": f"127.0.0.1:{ps}", "exec": ["/bin/cat"], "per_source": 1}}}))
    box.run(["superd", "reload"])
    for _ in range(3):
        assert tcp_exchange("127.0.0.1", p4, b"") == b""
        assert tcp_exchange("::1", p6, b"") == b""
    with connect("127.0.0.1", ps) as held:
        held.sendall(b"x\n")
        assert held.recv(2) == b"x\n"
        # refused: closed at once (had it sent bytes first, the close would reset it)
        assert tcp_exchange("127.0.0.1", ps, b"") == b""

    def fails():
        text = box.journal("-u", "superd", "-o", "cat")
        lines = [x for x in text.splitlines() if re.match(r"FAIL: \S+ \S+ from=[0-9a-f.:]+$", x)]
        return lines if len(lines) >= 7 else None
    expected = wait_until(fails, 15, "7 FAIL lines in the journal", interval=0.2)
    r = box.run(["fail2ban-regex", "-o", "msg", "systemd-journal",
                 "/etc/fail2ban/filter.d/superd.conf"], timeout=120)
    matched = [re.sub(r"^.*? superd\[\d+\]: ", "", x) for x in r.stdout.splitlines()]
    assert matched == expected, "every FAIL line with an address, and nothing else"
    assert {"FAIL: deny6 address from=::1", "FAIL: one per_source_limit from=127.0.0.1"} \
        <= set(matched)
    box.run(["rm", "-f", f"{CONFD}/refuse.yaml"])
    box.run(["superd", "reload"])


def test_remove_stops_it_and_keeps_the_conffiles_purge_removes_them(box):
    port = free_port()
    write(box, f"{CONFD}/echo.yaml", yaml.safe_dump({"services": {
        "echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}}}))
    box.run(["superd", "reload"])
    assert tcp_exchange("127.0.0.1", port, b"z\n", expect_len=2) == b"z\n"
    apt = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *pl.APT_OFFLINE, "-y", "-q"]

    box.run([*apt, "remove", "superd"], timeout=300)
    assert box.run(["systemctl", "is-active", "superd"], check=False).stdout.strip() in (
        "inactive", "unknown")
    assert connection_refused("127.0.0.1", port)
    assert not any("superd run" in a for _, a in box.processes()), "nothing of superd is left"
    status = box.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "superd"]).stdout
    assert status.strip() == "rc", "removed, config files kept"
    box.run(["test", "!", "-e", "/usr/bin/superd"])
    for kept in ("/etc/superd/superd.yaml", "/etc/fail2ban/filter.d/superd.conf",
                 f"{CONFD}/echo.yaml"):
        box.run(["test", "-f", kept])

    r = box.run([*apt, "purge", "superd"], timeout=300)
    for gone in ("/etc/superd/superd.yaml", "/etc/fail2ban/filter.d/superd.conf"):
        box.run(["test", "!", "-e", gone])
    # What the admin wrote stays (dpkg never deletes a file it did not install), with a note.
    box.run(["test", "-f", f"{CONFD}/echo.yaml"])
    assert "directory '/etc/superd/conf.d' not empty so not removed" in r.stdout + r.stderr
    r = box.run(["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "superd"], check=False)
    assert r.returncode != 0 or r.stdout.strip() in ("", "un"), r.stdout
    assert box.run(["systemctl", "is-enabled", "superd"], check=False).returncode != 0

