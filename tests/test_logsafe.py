"""Nothing written into the log can forge a record (issue 16, finding 10).

- A NUL or a newline in a handler's stderr, in a path from the table or anywhere else cannot
  end a record: control characters are escaped as rsyslog escapes them (`#000`, `#033`...).
- On a stream syslog socket every record ends with a newline, which rsyslog's imptcp and
  syslog-ng's unix-stream() both take as the end of a record; the NUL superd used to end
  them with is one for syslog-ng only (rsyslog never logged those lines at all).
- A long line is cut at 4096 bytes and ends with ` [cut]`; the rest up to its newline is
  dropped, and the next line is whole.

The syslogd here is a real rsyslogd reading a unix *stream* socket (imptcp), twice: once as
is, once as syslog-ng reads one (a NUL also ends a record: AddtlFrameDelimiter=0), both with
rsyslog's own escaping off, so what superd sends is what lands in the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import superd_testlib as lib
from superd_testlib import PY, free_port, tcp_exchange, wait_until

FORGED_IP = "203.0.113.9"  # TEST-NET-3: never sent to, only written


class StreamSyslog:
    """rsyslogd with two unix stream inputs: `plain` (records end at a newline) and `nul`
    (at a newline or a NUL, as syslog-ng reads), writing raw records to out.log."""

    def __init__(self, directory: Path):
        self.dir = directory
        self.out = directory / "out.log"
        self.plain = directory / "plain.sock"
        self.nul = directory / "nul.sock"
        self.sock = self.nul  # what lib.Superd puts in settings.syslog.address
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        exe = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"
        conf = self.dir / "rsyslog.conf"
        conf.write_text(f"""\
global(workDirectory="{self.dir}" parser.escapeControlCharactersOnReceive="off")
module(load="imptcp")
input(type="imptcp" path="{self.plain}" unlink="on")
input(type="imptcp" path="{self.nul}" unlink="on" AddtlFrameDelimiter="0")
template(name="superdtest" type="list") {{
  property(name="timegenerated" dateFormat="rfc3339")
  constant(value=" sender= ")
  property(name="syslogtag")
  property(name="msg" spIfNo1stSp="on")
  property(name="msg" dropLastLf="on")
  constant(value="\\n")
}}
*.* action(type="omfile" file="{self.out}" template="superdtest" flushOnTXEnd="on")
""")
        check = subprocess.run([exe, "-N1", "-f", str(conf)], capture_output=True, text=True,
                               timeout=20)
        assert check.returncode == 0, check.stderr
        self.err = open(self.dir / "rsyslogd.stderr", "wb")
        self.proc = subprocess.Popen([exe, "-n", "-f", str(conf), "-i",
                                      str(self.dir / "rsyslogd.pid")],
                                     stdin=subprocess.DEVNULL, stdout=self.err, stderr=self.err,
                                     start_new_session=True)
        wait_until(lambda: self.plain.exists() and self.nul.exists(), 10, "rsyslogd sockets")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.err.close()

    def size(self) -> int:
        return self.out.stat().st_size if self.out.exists() else 0

    def raw(self, offset: int = 0) -> bytes:
        if not self.out.exists():
            return b""
        with open(self.out, "rb") as f:
            f.seek(offset)
            return f.read()

    def lines(self, offset: int = 0) -> list[lib.LogLine]:
        text = self.raw(offset).decode("utf-8", "replace")
        return [x for x in map(lib.parse_log_line, text.split("\n")) if x is not None]


@pytest.fixture(scope="module")
def stream_syslog(tmp_path_factory):
    s = StreamSyslog(tmp_path_factory.mktemp("streamlog"))
    s.start()
    yield s
    s.stop()


@pytest.fixture
def daemon(tmp_path, stream_syslog, request):
    """daemon(services, address=...) -> a running superd logging to the stream rsyslogd."""
    made: list[lib.Superd] = []

    def start(services: dict, address: Path | None = None) -> lib.Superd:
        d = lib.Superd(tmp_path / f"d{len(made)}", stream_syslog, request.node.nodeid)
        made.append(d)
        settings = {"syslog": {"address": str(address or stream_syslog.nul)}}
        return d.start(services, settings=settings)

    yield start
    for d in made:
        d.finish()


def writer(port: int, data: bytes) -> dict:
    """An exec service whose handler writes `data` to its stderr and exits."""
    return {"listen": f"127.0.0.1:{port}",
            "exec": [PY, "-c", f"import os; os.write(2, {data!r})"]}


def records_with(d: lib.Superd, mark: str, count: int = 1) -> list[lib.LogLine]:
    """This daemon's records holding `mark`, once there are `count` of them."""
    def found():
        got = [x for x in d.syslog.lines(d.log_offset) if mark in x.msg]
        return got if len(got) >= count else None
    return wait_until(found, 5, f"{count} records with {mark}")


def test_a_nul_in_stderr_cannot_forge_a_record(daemon, stream_syslog):
    """The attack: a handler's stderr line `x<NUL><28>... superd[1]: FAIL: svc address
    from=IP` became a FAIL record of its own, which fail2ban bans IP on."""
    port = free_port()
    mark = uuid.uuid4().hex
    forged = f"<28>Jan  1 00:00:00 superd[1]: FAIL: svc address from={FORGED_IP}"
    d = daemon({"svc": writer(port, f"{mark}\0{forged}\n".encode())})
    tcp_exchange("127.0.0.1", port, b"")
    pid = int(d.wait_start("svc")[0]["pid"])
    d.wait_exit("svc")
    [record] = records_with(d, mark)
    every = stream_syslog.lines(d.log_offset)
    assert not [x for x in every if FORGED_IP in x.msg and x.msg.startswith("FAIL")], \
        "a forged FAIL record: " + repr([x.raw for x in every])
    assert re.fullmatch(rf"svc(\[{pid}\])?: {re.escape(mark + '#000' + forged)}",
                        record.msg), record.raw
    assert record.ident == "superd" and record.tag_pid == d.pid, record.raw
    assert b"\0" not in stream_syslog.raw(d.log_offset)


def test_control_characters_are_escaped(daemon, stream_syslog):
    port = free_port()
    mark = uuid.uuid4().hex
    line = f"{mark} \x1b[31mred\x1b[0m \a\b\r\tx\x7f \u009b2J \u2028 é ✓\n"
    d = daemon({"svc": writer(port, line.encode())})
    tcp_exchange("127.0.0.1", port, b"")
    [record] = records_with(d, mark)
    assert record.msg.endswith(f"{mark} #033[31mred#033[0m #007#010#015#011x#177 #302#2332J "
                               "#342#200#250 é ✓"), record.raw
    raw = stream_syslog.raw(d.log_offset).decode()
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f\u0080-\u009f\u2028]", raw), repr(raw)


def test_a_plain_stream_syslogd_gets_every_record(daemon, stream_syslog):
    """rsyslog's imptcp as it comes (a record ends at a newline): superd's NUL-ended records
    never arrived there."""
    port = free_port()
    marks = [uuid.uuid4().hex for _ in range(3)]
    d = daemon({"svc": writer(port, "".join(f"{m}\n" for m in marks).encode())},
               address=stream_syslog.plain)
    tcp_exchange("127.0.0.1", port, b"")
    for m in marks:
        records_with(d, m)
    d.wait_exit("svc")
    assert d.wait_log(r"^EXIT: svc status=0")


def test_a_long_line_is_cut_and_marked(daemon, stream_syslog):
    port = free_port()
    mark, after = uuid.uuid4().hex, uuid.uuid4().hex
    d = daemon({"svc": writer(port, f"{mark}{'x' * 100_000}\n{after}\n".encode())})
    tcp_exchange("127.0.0.1", port, b"")
    [record] = records_with(d, mark)
    assert record.msg.endswith("x [cut]"), record.msg[-40:]
    assert len(record.msg.encode()) == 4096, len(record.msg.encode())
    [next_one] = records_with(d, after)
    assert next_one.msg.endswith(f": {after}"), next_one.raw
    assert len([x for x in stream_syslog.lines(d.log_offset) if "xxxxxxxx" in x.msg]) == 1


def test_a_path_from_the_table_cannot_break_a_record(daemon, stream_syslog):
    """A handler path with an escape sequence in it is refused in one record, escaped."""
    port = free_port()
    d = daemon({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    bad = "h\x1b[2J\x07.py:handle"
    d.write_table({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"},
                   "bad": {"listen": f"127.0.0.1:{free_port()}", "python": bad}},
                  settings={"syslog": {"address": str(stream_syslog.nul)}})
    d.reload()
    [record] = records_with(d, "bad: not started")
    assert "h#033[2J#007.py: no such file" in record.msg, record.raw
    assert "\x1b" not in stream_syslog.raw(d.log_offset).decode()


def test_without_syslog_the_stderr_fallback_is_escaped_too(new_daemon, tmp_path):
    port = free_port()
    mark = uuid.uuid4().hex
    d = new_daemon()
    d.start({"svc": writer(port, f"{mark}\x1b]0;owned\x07\0end\n".encode())},
            settings={"syslog": {"address": str(tmp_path / "no-such.sock")}})
    tcp_exchange("127.0.0.1", port, b"")
    wait_until(lambda: mark in d.stderr_text(), 5, "the line on superd's stderr")
    [line] = [x for x in d.stderr_path.read_bytes().split(b"\n") if mark.encode() in x]
    assert line.endswith(f"{mark}#033]0;owned#007#000end".encode()), line
