"""`superd import inetd|xinetd FILE`: every fixture translates to a table `superd check` accepts,
the fields that matter come through unchanged, and whatever superd cannot do stays in the output
as a comment with its reason: nothing is dropped silently."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from superd_testlib import PY, REPO, daemon_env, free_port, tcp_exchange

FIXTURES = Path(__file__).parent / "fixtures"
INETD = sorted((FIXTURES / "inetd").glob("*.conf"))
XINETD = FIXTURES / "xinetd" / "xinetd.conf"
_CACHE: dict[tuple[str, str], subprocess.CompletedProcess] = {}


def superd_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", *args], cwd=REPO, env=daemon_env(),
                          capture_output=True, text=True, timeout=60)


def imported(kind: str, path: Path) -> subprocess.CompletedProcess:
    """`superd import KIND PATH --check`, once per fixture per session."""
    key = (kind, str(path))
    if key not in _CACHE:
        _CACHE[key] = superd_cli("import", kind, str(path), "--check")
    return _CACHE[key]


def ok_output(kind: str, path: Path) -> str:
    r = imported(kind, path)
    assert r.returncode == 0, f"import exited {r.returncode}:\n{r.stderr}\n{r.stdout[-3000:]}"
    return r.stdout


def commented_out(text: str) -> dict[str, dict]:
    """Services written commented out (they would not load here): delete one '#' per line."""
    out: dict[str, dict] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("  # (to use it once that is fixed"):
            continue
        block = [lines[i + 1].replace("#", "", 1)]
        assert re.fullmatch(r"  \S+:", block[0]), block[0]
        for nxt in lines[i + 2:]:
            if not nxt.startswith("  #  "):
                break
            block.append(nxt.replace("#", "", 1))
        out.update(yaml.safe_load("\n".join(block)))
    return out


def all_services(text: str) -> dict[str, dict]:
    doc = yaml.safe_load(text)
    services = dict(doc.get("services") or {})
    hidden = commented_out(text)
    assert not set(services) & set(hidden), "a name is used twice"
    services.update(hidden)
    return services


def comments(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip().startswith("#")]


# ------------------------------------------------------------------------------------------
# every fixture


@pytest.mark.parametrize("kind,path", [("inetd", p) for p in INETD] + [("xinetd", XINETD)],
                         ids=lambda v: v.name if isinstance(v, Path) else v)
def test_fixture_imports_and_passes_superd_check(kind, path, tmp_path):
    r = imported(kind, path)
    assert r.returncode == 0, f"import exited {r.returncode}:\n{r.stderr}"
    n = len(yaml.safe_load(r.stdout)["services"] or {})
    left = len(re.findall(r"^superd import: (left out: |.* is commented out)", r.stderr, re.M))
    assert re.search(rf"^{re.escape(str(path))}: ok, {n} services"
                     + (rf"; {left} left out \(named above\)$" if left else "$"),
                     r.stderr, re.M), r.stderr
    table = tmp_path / "imported.yaml"
    table.write_text(r.stdout)
    table.chmod(0o644)
    check = superd_cli("check", "-c", str(table))
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.strip() == f"{table}: ok, {n} services"


def test_unreadable_input_is_exit_1():
    r = superd_cli("import", "inetd", "/nonexistent/inetd.conf")
    assert r.returncode == 1 and "cannot read" in r.stderr and not r.stdout


# ------------------------------------------------------------------------------------------
# inetd


def inetd_entries(path: Path) -> list[tuple[int, list[str], bool]]:
    """(line, fields, disabled) per entry line, read independently of the importer."""
    out = []
    lines = path.read_text().splitlines()
    for n, raw in enumerate(lines, 1):
        off = raw.startswith("#<off>#")
        text = raw[len("#<off>#"):] if off else raw
        if not text.strip() or text.strip().startswith("#") or raw[:1] in " \t":
            continue
        fields = text.split()
        for nxt in lines[n:]:  # continuation lines start with a blank
            if nxt[:1] in " \t" and nxt.strip():
                fields += nxt.split()
            else:
                break
        out.append((n, fields, off))
    return out


@pytest.mark.parametrize("path", INETD, ids=lambda p: p.name)
def test_inetd_no_line_is_dropped_silently(path):
    text = ok_output("inetd", path)
    services = all_services(text)
    notes = comments(text)
    entries = inetd_entries(path)
    headers = [n for n, *_ in entries if any(c.startswith(f"# {path.name}:{n}: ") for c in notes)]
    dropped = [n for n, *_ in entries
               if any(c.startswith(f"# not carried over: {path.name}:{n}: ") for c in notes)]
    missing = [n for n, *_ in entries if n not in headers and n not in dropped]
    assert not missing, f"input lines with no trace in the output: {missing}\n{text}"
    # one service per line that became one, one comment per line that could not
    address_lines = [n for n, f, _ in entries if len(f) == 1 and f[0].endswith(":")]
    whole_drops = [n for n in dropped if n not in headers]
    assert len(services) + len(whole_drops) + len(address_lines) == len(entries), text
    # a user's comment line is kept as written
    for raw in path.read_text().splitlines():
        if raw.startswith("#") and not raw.startswith("#<off>#"):
            assert any(c == raw.strip().expandtabs(8).strip() for c in notes), raw


@pytest.mark.parametrize("path", INETD, ids=lambda p: p.name)
def test_inetd_fields_round_trip(path):
    """Port, protocol, wait, user, group and the exact argv of every line that became a
    service, checked against the input line itself."""
    text = ok_output("inetd", path)
    services = all_services(text)
    by_line, header = {}, None
    for line in text.splitlines():
        m = re.match(rf"  # {re.escape(path.name)}:(\d+): ", line)
        if m:
            header = int(m[1])
        m = re.fullmatch(r"  #?(\S+):", line)
        if m and str(yaml.safe_load(m[1])) in services:
            assert header is not None and header not in by_line, line
            by_line[header] = services[str(yaml.safe_load(m[1]))]
    assert len(by_line) == len(services)
    for n, fields, off in inetd_entries(path):
        if n not in by_line:
            continue
        svc = by_line[n]
        service, socktype, proto, wait, user, server, *argv = fields
        service = service.rpartition(":")[2] or fields[1]
        transport = proto.split(",")[0][:3]
        assert svc["wait"] == (wait.split(".")[0].split("/")[0] == "wait" or socktype == "dgram")
        assert svc.get("protocol", "tcp") == {"tcp": "tcp", "udp": "udp"}.get(
            transport, "unix" if socktype == "stream" else "unix-dgram")
        listen = svc["listen"] if isinstance(svc["listen"], list) else [svc["listen"]]
        if transport in ("tcp", "udp"):
            port = int(service) if service.isdigit() else socket.getservbyname(service, transport)
            assert all(str(x).rsplit(":", 1)[-1] == str(port) for x in listen), (n, listen)
        else:
            assert listen == [service]
        user_, _, group = user.split("/")[0].replace(":", ".").partition(".")
        assert svc["user"] == user_ and svc.get("group", "") == group
        assert svc.get("disabled", False) == off
        if server == "internal":
            assert svc["internal"] == service
            continue
        want = argv or [server.rsplit("/", 1)[1]]
        assert svc["exec"] == want, (n, svc)
        program = svc.get("program", svc["exec"][0])
        if server.endswith("/tcpd"):
            assert program == (want[0] if want[0].startswith("/") else f"/usr/sbin/{want[0]}")
        else:
            assert program == server


def test_inetd_exact_translations():
    deb = all_services(ok_output("inetd", FIXTURES / "inetd" / "debian.conf"))
    assert deb["echo"] == {"listen": "7", "wait": False, "internal": "echo", "user": "root"}
    assert deb["echo-udp"]["protocol"] == "udp" and deb["echo-udp"]["listen"] == "7"
    assert deb["chargen"]["listen"] == "0.0.0.0:19" and deb["daytime"]["listen"] == "[::]:13"
    assert deb["tftp"] == {"listen": "69", "protocol": "udp", "wait": True, "user": "nobody",
                           "exec": ["in.tftpd", "-s", "/srv/tftp"],
                           "program": "/usr/sbin/in.tftpd", "stderr": "socket"}
    assert deb["rsync"]["rate"] == "60/min"
    assert deb["ftp"]["exec"] == ["/usr/sbin/in.ftpd", "-l", "-A"] and "program" not in deb["ftp"]
    assert deb["shell"]["exec"] == ["in.rshd"] and deb["shell"]["program"] == "/usr/sbin/in.rshd"
    assert deb["telnet"]["disabled"] is True
    obsd = all_services(ok_output("inetd", FIXTURES / "inetd" / "openbsd.conf"))
    assert obsd["daytime"]["listen"] == "127.0.0.1:13"  # from the `127.0.0.1:` line
    assert obsd["echo"]["listen"] == "[::1]:7"  # back to `*:`, then [::1]:echo
    assert obsd["chargen"]["listen"] == ["127.0.0.1:19", "[::1]:19"]
    assert obsd["2323"]["listen"] == "127.0.0.1:2323"
    assert obsd["9999"]["exec"] == ["cat", "-u"]  # the continuation line
    assert (obsd["9999"]["receive_buffer"], obsd["9999"]["send_buffer"]) == ("64K", "1M")
    assert obsd["11111"]["listen"] == "11111" and obsd["11111"]["exec"] == ["/bin/cat"]
    assert obsd["log.sock"]["protocol"] == "unix-dgram" and obsd["log.sock"]["wait"] is True
    fbsd = all_services(ok_output("inetd", FIXTURES / "inetd" / "freebsd.conf"))
    assert fbsd["ftp"]["instances"] == 10 and fbsd["ftp"]["per_source"] == 2
    assert fbsd["7777"]["instances"] == 4 and fbsd["7777"]["per_source"] == 2
    assert fbsd["12345"]["listen"] == "[::]:12345"


@pytest.mark.parametrize("fixture,needle", [
    ("debian.conf", "Sun RPC service"),
    ("debian.conf", "internal service 'ident'"),
    ("debian.conf", "(TCP wrappers) left out: superd runs /usr/sbin/in.ftpd itself"),
    ("debian.conf", "nowait.60: inetd stops the service for 10 minutes"),
    ("openbsd.conf", "TCPMUX (RFC 1078)"),
    ("openbsd.conf", "tcp: IPv4 and IPv6, as Debian 12's openbsd-inetd reads it (nothing in "
                     "the file names its inetd)"),
    ("openbsd.conf", "host name localhost resolved now"),
    ("openbsd.conf", "too few fields"),
    ("openbsd.conf", "socket type raw"),
    ("freebsd.conf", "tcp: IPv4 only, as FreeBSD's inetd reads it (the file has FreeBSD's "
                     "$FreeBSD$ mark)"),
    ("freebsd.conf", "login classes"),
])
def test_inetd_reasons_are_given(fixture, needle):
    assert needle in ok_output("inetd", FIXTURES / "inetd" / fixture)


def test_inetd_argv_with_yaml_special_words_round_trips(tmp_path):
    """inetd does no quoting: each word is one argument, whatever YAML would make of it."""
    words = ['"a', 'b"', "'c'", "#x", "yes", "022", "~", "[a]", "{b}", "a:b", "-", "%p", "@u",
             "null", "1.5", "*", "&x", "!t", "a,b", "...", "---", "'", '\\n']
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"127.0.0.1:{free_port()} stream tcp4 nowait root /bin/echo "
                    + " ".join(words) + "\n")
    r = superd_cli("import", "inetd", str(conf))
    assert r.returncode == 0, r.stderr
    (svc,) = yaml.safe_load(r.stdout)["services"].values()
    assert svc["exec"] == words and svc["program"] == "/bin/echo"


# ------------------------------------------------------------------------------------------
# xinetd

XINETD_MAPPED = {
    "socket_type", "protocol", "wait", "user", "group", "server", "server_args", "instances",
    "per_source", "cps", "env", "passenv", "only_from", "no_access", "log_on_success",
    "log_on_failure", "port", "bind", "interface", "disable", "id", "type", "flags", "nice",
    "umask", "rlimit_as", "rlimit_cpu", "rlimit_files", "v6only", "groups", "log_type",
    "disabled", "enabled", "access_times", "banner", "banner_success", "banner_fail",
    "max_load", "deny_time", "libwrap", "redirect", "rlimit_data", "rlimit_rss", "rlimit_stack",
}


def xinetd_blocks() -> list[tuple[str, str, list[tuple[str, str]]]]:
    """(header ref, kind, [(attr ref, name)]) for every block of the fixture tree."""
    files = [XINETD, FIXTURES / "xinetd" / "extra.conf"] + [
        p for p in sorted((FIXTURES / "xinetd" / "xinetd.d").iterdir())
        if "." not in p.name and not p.name.endswith("~")]
    out = []
    for f in files:
        ref = str(f.relative_to(XINETD.parent))
        block = None
        for n, raw in enumerate(f.read_text().splitlines(), 1):
            line = raw.strip()
            if line.startswith(("service ", "defaults")):
                block = (f"{ref}:{n}", line.split()[0], [])
                out.append(block)
            elif block and "=" in line and not line.startswith("#"):
                block[2].append((f"{ref}:{n}", line.split()[0].rstrip("+-=")))
    return out


def test_xinetd_nothing_is_dropped_silently():
    text = ok_output("xinetd", XINETD)
    notes = comments(text)
    services = all_services(text)
    blocks = xinetd_blocks()
    whole = [ref for ref, _, _ in blocks
             if any(c.startswith(f"# not carried over: {ref}: ") and "would not load" not in c
                    for c in notes)]
    carried = [ref for ref, kind, _ in blocks
               if kind == "service" and any(c.startswith(f"# {ref}: service ") for c in notes)]
    defaults = [ref for ref, kind, _ in blocks if kind == "defaults"]
    assert sorted(whole + carried + defaults) == sorted(ref for ref, _, _ in blocks), text
    assert len(carried) == len(services)
    for ref, _kind, attrs in blocks:
        for where, name in attrs:
            said = any(f"{where}:" in c for c in notes)
            assert said or ref in whole or name in XINETD_MAPPED, (where, name)
    # every comment of every file read is kept (around a service, inside it, or in the
    # verbatim copy of an entry that could not be carried over)
    for f in [XINETD, FIXTURES / "xinetd" / "extra.conf"] + sorted(
            (FIXTURES / "xinetd" / "xinetd.d").glob("[!.]*[!~]")):
        if "." in f.name and f.parent.name == "xinetd.d":
            continue
        for raw in f.read_text().splitlines():
            if raw.strip().startswith("#"):
                want = raw.strip().expandtabs(8)
                assert any(want in c for c in notes), (f.name, raw)
    # files xinetd skips are named as skipped
    assert "skipped as xinetd skips them" in text and "rsync.dpkg-old, rsync~" in text


def test_xinetd_fields_round_trip():
    text = ok_output("xinetd", XINETD)
    doc = yaml.safe_load(text)
    s = all_services(text)
    assert doc["settings"] == {"syslog": {"facility": "authpriv"}}
    assert doc["defaults"] == {
        "instances": 60, "per_source": 10, "rate": "25/s", "umask": "022", "syslog_level": "info",
        "only_from": ["127.0.0.1/32", "10.0.0.0/8", "192.168.1.0/24", "192.168.2.0/24", "::1"],
        "no_access": ["10.1.2.3/32"], "log_on_success": ["pid", "host", "duration"],
        "log_on_failure": ["host"], "passenv": ["LANG"]}
    assert s["rsync"] == {
        "listen": "873", "wait": False, "exec": ["rsync", "--daemon", "--config=/etc/rsyncd.conf"],
        "program": "/usr/bin/rsync", "user": "root", "instances": 30, "per_source": 4,
        "rlimits": {"nofile": 256, "as": 64 << 20, "cpu": 60, "stack": 8 << 20}, "stderr": "socket",
        "log_on_failure": ["host", "userid"], "tcp_wrappers": True}
    assert s["git"] == {
        "listen": "127.0.0.1:9418", "wait": False, "user": "nobody", "group": "nogroup",
        "exec": ["git", "daemon", "--inetd", "--export-all", "--base-path=/srv/git", "/srv/git"],
        "program": "/usr/bin/git", "umask": "027", "nice": 10,
        "env": {"HOME": "/srv/git", "GIT_HTTP_MAX_REQUEST_BUFFER": "100M"},
        "passenv": ["LANG", "TZ"], "stderr": "socket",
        "only_from": ["127.0.0.1/32", "192.168.1.0/24", "192.168.2.0/24", "::1"],
        "log_on_failure": ["host", "userid"], "tcp_wrappers": True}
    assert s["tftp"] == {
        "listen": "0.0.0.0:69", "protocol": "udp", "wait": True, "user": "root",
        "exec": ["in.tftpd", "-s", "/srv/tftp", "-u", "tftp"], "program": "/usr/sbin/in.tftpd",
        "per_source": 11, "rate": "100/s", "stderr": "socket"}
    assert s["time-stream"] == {"listen": "37", "wait": False, "internal": "time",
                                "user": "root", "only_from": ["127.0.0.1/32", "::1"],
                                "tcp_wrappers": "time"}
    assert s["echo-stream"]["disabled"] and s["echo-dgram"]["disabled"]
    assert s["echo-dgram"]["protocol"] == "udp" and s["echo-dgram"]["internal"] == "echo"
    assert s["catd"] == {
        "listen": "20020", "wait": False, "exec": ["cat"], "program": "/bin/cat",
        "user": "nobody", "only_from": ["0.0.0.0/0", "::/0"], "stderr": "socket",
        "log_on_success": ["pid", "host", "exit"], "log_on_failure": ["attempt"],
        "tcp_wrappers": True}
    assert s["ftp"]["exec"] == ["/usr/sbin/in.ftpd", "-l"] and "program" not in s["ftp"]
    assert s["ftp"]["user"] == "root" and s["ftp"]["instances"] == 4 and s["ftp"]["nice"] == 10
    assert s["ftp"]["only_from"] == ["ftp.example.org", ".example.net", "198.51.100.0/24"]
    assert s["ftp"]["no_access"] == ["10.1.2.3/32", "badhost.example.com"]
    assert s["ftp"]["nodelay"] is True  # flags NODELAY
    assert s["ftp"]["tcp_wrappers"] is True  # tcpd's hosts.allow/hosts.deny, by superd
    assert s["ftp"]["access_times"] == ["2:00-9:00", "12:00-24:00"]
    assert (s["ftp"]["banner"], s["ftp"]["max_load"]) == ("/etc/issue.net", 2.5)
    assert (s["ftp"]["log_file"], s["ftp"]["groups"]) == ("/var/log/ftp.log", [])
    assert s["ftp"]["log_on_success"] == ["pid", "host", "duration", "userid"]
    assert s["ftp-data"] == {"listen": "20", "wait": False, "sensor": True, "deny_time": 1440}
    assert s["telnet"]["redirect"] == "192.0.2.10:23" and s["telnet"]["tcp_wrappers"] == "telnet"
    assert "tcp_wrappers" not in s["tftp"]  # a UDP service: a comment says so
    assert s["svn"]["listen"] == "3690" and s["svn"]["exec"] == ["svnserve", "-i", "-r", "/srv/svn"]
    assert s["daytime-udp"] == {"listen": "0.0.0.0:13", "protocol": "udp", "wait": True,
                                "internal": "daytime"}
    assert s["discard"]["disabled"] is True  # xinetd rejects the entry: kept, disabled
    assert not {"rstatd", "servers", "tcpmux", "myorg_server"} & set(s)


@pytest.mark.parametrize("needle", [
    "Sun RPC service", "TCPMUX (RFC 1078)", "xinetd's built-in 'servers'", "SENSOR:",
    "banner_fail: /etc/xinetd.d/banner.fail -- would not load here",
    "xinetd's libwrap checked hosts.allow/hosts.deny for it too; superd's tcp_wrappers "
    "applies to the connections it accepts itself", "applies /etc/hosts.allow and "
    "/etc/hosts.deny",
    "flags REUSE: superd always sets SO_REUSEADDR",
    "user = ftp -- given twice: xinetd keeps the first",
    "cps 25 30: xinetd turned the service off for 30 s", "mdns = yes",
    "colour = blue -- not an xinetd service attribute", "no such user 'svn'",
    "no such executable file", "xinetd needs '{' on a line of its own",
    "superd queues them (on_limit: queue",
])
def test_xinetd_reasons_are_given(needle):
    assert needle in ok_output("xinetd", XINETD)


def test_xinetd_directory_alone(tmp_path):
    """`superd import xinetd /etc/xinetd.d` reads the directory as includedir does."""
    r = superd_cli("import", "xinetd", str(FIXTURES / "xinetd" / "xinetd.d"))
    assert r.returncode == 0, r.stderr
    doc = yaml.safe_load(r.stdout)
    assert "defaults" not in doc and "rsync" in doc["services"]


# ------------------------------------------------------------------------------------------
# the result runs


# A #! script never sees its argv[0] (the kernel puts the interpreter there), so the program is
# python itself and the script reads sys.orig_argv: [argv0, script, args...].
SHOW_ARGV = "import sys\nfor a in [sys.orig_argv[0]] + sys.orig_argv[2:]:\n    print(f'[{a}]')\n"


def test_imported_tables_run_with_exact_argv(superd, tmp_path):
    """inetd's argv[0] is whatever the line says; xinetd's is the server's base name."""
    script = tmp_path / "show_argv.py"
    script.write_text(SHOW_ARGV)
    p1, p2, p3 = free_port(), free_port(), free_port()
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"127.0.0.1:{p1}\tstream\ttcp4\tnowait.100\troot\t{PY}\tin.fake {script} -x y\n"
                    f"127.0.0.1:{p2}\tstream\ttcp4\tnowait\troot\t{PY}\t{PY} {script}\n")
    xconf = tmp_path / "xinetd.conf"
    xconf.write_text(f"service argv\n{{\n\ttype = UNLISTED\n\tport = {p3}\n\tbind = 127.0.0.1\n"
                     f"\tsocket_type = stream\n\twait = no\n\tuser = root\n"
                     f"\tserver = {PY}\n\tserver_args = {script} one two\n}}\n")
    services = {}
    for kind, path in (("inetd", conf), ("xinetd", xconf)):
        r = superd_cli("import", kind, str(path))
        assert r.returncode == 0, r.stderr
        services.update(yaml.safe_load(r.stdout)["services"])
    assert services[str(p1)]["program"] == PY and "program" not in services[str(p2)]
    superd(services)
    assert tcp_exchange("127.0.0.1", p1, b"") == b"[in.fake]\n[-x]\n[y]\n"
    assert tcp_exchange("127.0.0.1", p2, b"") == f"[{PY}]\n".encode()
    name = PY.rsplit("/", 1)[1]
    assert tcp_exchange("127.0.0.1", p3, b"") == f"[{name}]\n[one]\n[two]\n".encode()
