"""A service's own syslog facility and level, and its own log file (issue 14, item 4: xinetd's
`log_type SYSLOG facility level` and `log_type FILE path soft hard`).

The facility and level are read by a private rsyslogd whose template writes them out; the
files are read back. A log file that cannot be written (a FIFO nobody reads) must not slow
the daemon down.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time

import pytest
from dns_lib import private_etc
from superd_testlib import free_port, tcp_exchange, wait_until

REPLY = ["/bin/sh", "-c", "echo hi; echo to-stderr >&2"]


class PriSyslog:
    """rsyslogd writing `facility.severity message` per line."""

    def __init__(self, directory):
        self.dir, self.sock, self.out = directory, directory / "log.sock", directory / "out.log"
        conf = directory / "rsyslog.conf"
        conf.write_text(f"""global(workDirectory="{directory}")
module(load="imuxsock" SysSock.Use="off")
input(type="imuxsock" Socket="{self.sock}" CreatePath="on" RateLimit.Interval="0")
template(name="pri" type="string" string="%syslogfacility-text%.%syslogseverity-text% %msg%\\n")
*.* action(type="omfile" file="{self.out}" template="pri" flushOnTXEnd="on")
""")
        exe = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        self.proc = subprocess.Popen([exe, "-n", "-f", str(conf), "-i", str(directory / "pid")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: self.sock.exists(), 10, "private rsyslogd socket")

    def lines(self) -> list[str]:
        try:
            return [" ".join(x.split()) for x in
                    self.out.read_text(errors="replace").splitlines()]
        except FileNotFoundError:
            return []

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def pri_syslog(tmp_path):
    (tmp_path / "pri").mkdir()
    s = PriSyslog(tmp_path / "pri")
    yield s
    s.stop()


def test_facility_and_level_per_service(new_daemon, pri_syslog):
    p1, p2 = free_port(), free_port()
    d = new_daemon()
    d.start({"mail": {"listen": f"127.0.0.1:{p1}", "exec": REPLY,
                      "syslog_facility": "local3", "syslog_level": "notice"},
             "plain": {"listen": f"127.0.0.1:{p2}", "exec": REPLY}},
            settings={"syslog": {"address": str(pri_syslog.sock), "facility": "daemon"}})
    assert tcp_exchange("127.0.0.1", p1, b"") == b"hi\n"
    assert tcp_exchange("127.0.0.1", p2, b"") == b"hi\n"

    def seen():
        lines = pri_syslog.lines()
        return (any(re.fullmatch(r"local3\.notice START: mail pid=\d+ from=127\.0\.0\.1", x)
                    for x in lines)
                and any(x.startswith("local3.notice EXIT: mail status=0") for x in lines)
                and any(re.fullmatch(r"local3\.notice mail\[\d+\]: to-stderr", x) for x in lines)
                and any(x.startswith("daemon.info START: plain") for x in lines))
    try:
        wait_until(seen, 5, "the lines with their facilities and levels")
    except AssertionError:
        raise AssertionError("\n".join(pri_syslog.lines())) from None


def test_log_file_with_soft_and_hard_limits(superd, tmp_path):
    port = free_port()
    path = tmp_path / "svc.log"
    d = superd({"filed": {"listen": f"127.0.0.1:{port}", "exec": REPLY, "log_file": str(path),
                          "log_file_limits": ["400", "700"]}})
    for _ in range(12):
        assert tcp_exchange("127.0.0.1", port, b"") == b"hi\n"
    wait_until(lambda: path.exists() and "EXIT: filed" in path.read_text(), 5, "the file")
    text = path.read_text()
    assert re.search(r"^\d\d/\d\d/\d\d@\d\d:\d\d:\d\d: START: filed pid=\d+ from=127\.0\.0\.1$",
                    text, re.M), text[:200]
    d.wait_log(rf"^{re.escape(str(path))}: \d+ bytes, past its soft limit of 400; no more "
               r"lines once it reaches 700$")
    time.sleep(0.3)  # the writer thread has nothing to signal it is done
    assert 400 <= path.stat().st_size <= 700
    assert not [x for x in d.lines() if "START: filed" in x], "the file, not syslog"


def test_a_log_file_that_blocks_stalls_nothing(superd, tmp_path):
    """The file is a FIFO nobody reads: opening it blocks forever. Only the writer thread
    waits; the service answers as fast as ever and superd stops cleanly."""
    port = free_port()
    fifo = tmp_path / "stuck.log"
    os.mkfifo(fifo)
    superd({"stuck": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/echo", "hi"],
                      "log_file": str(fifo)}})
    started = time.monotonic()
    for _ in range(50):
        assert tcp_exchange("127.0.0.1", port, b"") == b"hi\n"
    assert time.monotonic() - started < 10


def _journal_records(sock: socket.socket) -> list[dict[str, str]]:
    """The records journal.send wrote so far (the native protocol: KEY=value lines)."""
    out = []
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return out
        out.append(dict(line.split("=", 1) for line in data.decode(errors="replace").split("\n")
                        if "=" in line))


def test_facility_and_level_per_service_reach_the_journal(new_daemon, tmp_path):
    """Under systemd every line also goes to the journal: a service's syslog_facility and
    syslog_level must be its SYSLOG_FACILITY and PRIORITY there too, not the settings'. The
    journal is a socket of the test's, bind-mounted where journald's is (private mounts)."""
    run = tmp_path / "run-systemd"
    (run / "journal").mkdir(parents=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(run / "journal" / "socket"))
    sock.setblocking(False)
    try:
        p1, p2 = free_port(), free_port()
        d = new_daemon()
        d.prefix = private_etc({"/run/systemd": run})
        d.start({"mail": {"listen": f"127.0.0.1:{p1}", "exec": REPLY,
                          "syslog_facility": "local3", "syslog_level": "notice"},
                 "plain": {"listen": f"127.0.0.1:{p2}", "exec": REPLY}},
                env={"INVOCATION_ID": "0123456789abcdef0123456789abcdef"},
                settings={"syslog": {"facility": "daemon"}})
        assert tcp_exchange("127.0.0.1", p1, b"") == b"hi\n"
        assert tcp_exchange("127.0.0.1", p2, b"") == b"hi\n"
        records: list[dict[str, str]] = []

        def started(service: str) -> dict[str, str] | None:
            records.extend(_journal_records(sock))
            return next((r for r in records if r.get("SUPERD_SERVICE") == service
                         and r.get("MESSAGE", "").startswith("START:")), None)
        wait_until(lambda: started("mail") and started("plain"), 5, "START lines in the journal")
        mail, plain = started("mail"), started("plain")
        assert (mail["SYSLOG_FACILITY"], mail["PRIORITY"]) == ("19", "5"), mail  # local3.notice
        assert (plain["SYSLOG_FACILITY"], plain["PRIORITY"]) == ("3", "6"), plain  # daemon.info
    finally:
        sock.close()


def test_a_symlink_planted_at_the_log_file_is_not_followed(superd, tmp_path):
    port = free_port()
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    path = tmp_path / "svc.log"
    path.symlink_to(victim)
    d = superd({"filed": {"listen": f"127.0.0.1:{port}", "exec": REPLY, "log_file": str(path)}})
    assert tcp_exchange("127.0.0.1", port, b"") == b"hi\n"
    d.wait_log(rf"^{re.escape(str(path))}: cannot open: ")
    assert victim.read_text() == "keep\n", "the symlink's target must not be written"
