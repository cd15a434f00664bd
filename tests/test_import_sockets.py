"""What the inetd and xinetd importers now carry over: FreeBSD's socket owners, IPsec lines and
internal unix services, dialects of plain tcp/udp, buffer sizes, xinetd's NODELAY/KEEPALIVE,
the socket as fd 2, directories of files, a summary that counts every comment, and `--split`.
Each imported table is run where it matters, and looked at on its real sockets."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from reliability_lib import nobody, run_as, world_dir
from superd_testlib import (
    PY,
    REPO,
    daemon_env,
    free_port,
    python_script,
    recv_exact,
    tcp_exchange,
)
from test_import import all_services, comments
from test_socket_kinds import unix_exchange
from test_sockets import PROBE


def superd_import(kind: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", "import", kind, *args], cwd=REPO,
                          env=daemon_env(), capture_output=True, text=True, timeout=60)


def imported(kind: str, *args: str) -> tuple[dict, str, str]:
    r = superd_import(kind, *args, "--check")
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    return all_services(r.stdout), r.stdout, r.stderr


@pytest.fixture
def shared():
    path = world_dir("superd-imp-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- FreeBSD ---------------------------------------------------------------------------------


def test_freebsd_socket_owner_group_and_mode(superd, shared):
    path = shared / "cat.sock"
    conf = shared / "inetd.conf"
    conf.write_text(f":nobody:nogroup:660:{path}\tstream\tunix\tnowait\troot\t/bin/cat\tcat\n")
    s, text, _ = imported("inetd", str(conf))
    (svc,) = s.values()
    assert (svc["listen"], svc["socket_user"], svc["socket_group"], svc["socket_mode"]) == (
        str(path), "nobody", "nogroup", "0660")
    assert "does not apply to a unix socket" not in text  # the old, wrong note
    superd(s)
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (nobody().pw_uid,
                                                                 nobody().pw_gid, 0o660)
    assert run_as(nobody(), unix_exchange, str(path), b"nobody's") == b"nobody's"


@pytest.mark.parametrize("prefix,why", [
    (":nobody::660:", "expected FreeBSD's :user:group:mode: before the path"),
    (":nobody:nogroup:rw:", "'rw' is not an octal mode"),
])
def test_freebsd_bad_socket_owner_is_not_carried(tmp_path, prefix, why):
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"# $FreeBSD$\n{prefix}/run/x.sock\tstream\tunix\tnowait\troot\t/bin/cat"
                    "\tcat\n")
    s, text, err = imported("inetd", str(conf))
    assert not s and why in text and f"left out: inetd.conf:2: {prefix}" in err, err


def test_a_unix_socket_keeps_the_mode_its_inetd_gave_it(tmp_path):
    """Without :user:group:mode:, FreeBSD made the socket root's 0200 and the others used
    their umask (0755): only root could connect. superd's 0666 would open it to all."""
    line = "/run/x.sock\tstream\tunix\tnowait\troot\t/bin/cat\tcat\n"
    conf = tmp_path / "inetd.conf"
    conf.write_text("# $FreeBSD$\n" + line)
    s, text, _ = imported("inetd", str(conf))
    assert s["x.sock"]["socket_mode"] == "0200" and "FreeBSD's inetd makes the socket" in text
    conf.write_text(line)
    s, text, _ = imported("inetd", str(conf))
    assert s["x.sock"]["socket_mode"] == "0755" and "inetd made the socket with its umask" in text


def test_freebsd_ipsec_lines_are_said_and_counted(tmp_path):
    conf = tmp_path / "inetd.conf"
    conf.write_text("#@ ipsec ah/require\necho\tstream\ttcp\tnowait\troot\tinternal\n#@\n")
    s, text, err = imported("inetd", str(conf))
    assert "Read as FreeBSD's inetd reads it (the file has FreeBSD's #@ IPsec lines)" in text
    assert "not carried over: inetd.conf:1: IPsec policy for the entries below (ipsec " \
           "ah/require): superd sets no IPsec policy" in text
    assert "not carried over: inetd.conf:3: the end of an IPsec policy" in text
    assert re.search(r"^superd import: not carried over: inetd.conf:1: IPsec", err, re.M), err
    assert "2 thing(s) not carried over" in err and "ok, 1 services" in err


def test_freebsd_internal_service_on_a_unix_socket(superd, shared):
    conf = shared / "inetd.conf"
    path = shared / "chargen"
    conf.write_text(f"# $FreeBSD$\n{path}\tstream\tunix\tnowait\troot\tinternal\n")
    s, _, _ = imported("inetd", str(conf))
    assert s["chargen"]["internal"] == "chargen" and s["chargen"]["socket_mode"] == "0200"
    superd(s)
    with socket.socket(socket.AF_UNIX) as c:
        c.connect(str(path))
        assert recv_exact(c, 74)[:72] == bytes(range(32, 104))  # RFC 864's first line
    conf.write_text(f"{path}\tstream\tunix\tnowait\troot\tinternal\n")  # not FreeBSD: refused
    _, text, _ = imported("inetd", str(conf))
    assert "on a unix socket FreeBSD's inetd takes the last part of the path" in text


def test_seqpacket_unix_lines_are_imported(tmp_path):
    conf = tmp_path / "inetd.conf"
    conf.write_text("/run/sp.sock\tseqpacket\tunix\tnowait\troot\t/bin/cat\tcat\n"
                    f"{free_port()}\tseqpacket\ttcp\tnowait\troot\t/bin/cat\tcat\n")
    s, text, _ = imported("inetd", str(conf))
    assert s["sp.sock"]["protocol"] == "unix-seqpacket"
    assert "seqpacket over tcp does not exist" in text


# -- dialects: plain tcp/udp -----------------------------------------------------------------


@pytest.mark.parametrize("header,flavour,listen,said", [
    ("", None, "{p}", "IPv4 and IPv6, as Debian 12's openbsd-inetd reads it (nothing in the "
                      "file names its inetd)"),
    ("#<off># x stream tcp nowait root /bin/cat cat\n", None, "{p}",
     "(the file has the marks of Debian's update-inetd)"),
    ("# $FreeBSD$\n", None, "0.0.0.0:{p}", "IPv4 only, as FreeBSD's inetd reads it"),
    ("#\t$OpenBSD: inetd.conf,v 1.58 $\n", None, "0.0.0.0:{p}", "as OpenBSD's inetd reads it"),
    ("", "inetutils", "0.0.0.0:{p}", "IPv4 only, as GNU inetutils' inetd reads it (given "
                                     "with --flavour)"),
    ("# $FreeBSD$\n", "debian", "{p}", "IPv4 and IPv6, as Debian 12's openbsd-inetd reads it "
                                       "(given with --flavour)"),
])
def test_plain_tcp_is_read_by_dialect_with_a_note(tmp_path, header, flavour, listen, said):
    conf = tmp_path / "inetd.conf"
    conf.write_text(header + "echo\tstream\ttcp\tnowait\troot\tinternal\n"
                    "echo\tstream\ttcp6\tnowait\troot\tinternal\n")
    s, text, _ = imported("inetd", str(conf), *(["--flavour", flavour] if flavour else []))
    assert s["echo"]["listen"] == listen.format(p=7), s
    assert said in text and "# note: tcp: " in text, text
    assert s["echo-tcp6"]["listen"] == "[::]:7"  # tcp6 is IPv6 alone for them all


def test_flavour_goes_with_inetd_only():
    r = superd_import("xinetd", "/etc/xinetd.conf", "--flavour", "debian")
    assert r.returncode == 2 and "--flavour goes with import inetd" in r.stderr


# -- buffers and TCP options, on the handler's socket ----------------------------------------


def test_inetd_buffers_and_xinetd_flags_reach_the_handler(superd, tmp_path):
    probe = python_script(tmp_path / "probe.py", PROBE)
    p1, p2, p3 = free_port(), free_port(), free_port()
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"127.0.0.1:{p1}\tstream\ttcp4,sndbuf=64k,rcvbuf=16384\tnowait\troot\t"
                    f"{probe}\tprobe\n")
    xconf = tmp_path / "xinetd.conf"
    xconf.write_text(f"service x\n{{\n\ttype = UNLISTED\n\tport = {p2}\n\tbind = 127.0.0.1\n"
                     "\tsocket_type = stream\n\twait = no\n\tuser = root\n"
                     f"\tserver = {probe}\n\tflags = NODELAY KEEPALIVE\n}}\n"
                     f"service u\n{{\n\ttype = UNLISTED\n\tport = {p3}\n\tprotocol = udp\n"
                     "\tsocket_type = dgram\n\twait = yes\n\tuser = root\n"
                     f"\tserver = {probe}\n\tflags = NODELAY\n}}\n")
    s1, _, _ = imported("inetd", str(conf))
    s2, text, _ = imported("xinetd", str(xconf))
    assert (s1[str(p1)]["send_buffer"], s1[str(p1)]["receive_buffer"]) == ("64K", 16384)
    assert (s2["x"]["nodelay"], s2["x"]["keepalive"]) == (True, True)
    assert "flags NODELAY -- a TCP option: xinetd sets it on TCP services only" in text
    superd({**s1, "x": s2["x"]})
    got = json.loads(tcp_exchange("127.0.0.1", p1, b""))
    assert (got["sndbuf"], got["rcvbuf"]) == (2 * 65536, 2 * 16384), got
    got = json.loads(tcp_exchange("127.0.0.1", p2, b""))
    assert (got["nodelay"], got["keepalive"]) == (1, 1), got


@pytest.mark.parametrize("options,why", [
    ("sndbuf=0", ",sndbuf=0 -- not sndbuf= or rcvbuf= with a size"),
    ("window=5", ",window=5 -- not sndbuf= or rcvbuf="),
])
def test_bad_buffer_options_are_said(tmp_path, options, why):
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"echo\tstream\ttcp,{options}\tnowait\troot\tinternal\n")
    _, text, _ = imported("inetd", str(conf))
    assert why in text


# -- fd 2 is the socket, as under inetd ------------------------------------------------------


def test_imported_handlers_keep_the_socket_as_fd2(superd, tmp_path):
    """cvs pserver and friends answer on stderr: the client reads it, as under inetd."""
    port = free_port()
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"127.0.0.1:{port}\tstream\ttcp4\tnowait\troot\t/bin/sh\tsh -c "
                    "echo${IFS}E${IFS}no-such-repository>&2\n")
    s, text, _ = imported("inetd", str(conf))
    assert s[str(port)]["stderr"] == "socket"
    assert "With `stderr: log`, superd's default, its error messages go to" in text
    superd(s)
    assert tcp_exchange("127.0.0.1", port, b"") == b"E no-such-repository\n"


# -- directories, counts, split ---------------------------------------------------------------


def test_inetd_reads_a_directory_as_inetutils_does(tmp_path):
    d = tmp_path / "inetd.d"
    d.mkdir()
    p1, p2 = free_port(), free_port()
    (d / "b-cat").write_text(f"{p1}\tstream\ttcp\tnowait\troot\t/bin/cat\tcat\n")
    (d / "a-cat").write_text(f"{p2}\tstream\ttcp\tnowait\tnobody\t/bin/cat\tcat\n")
    s, text, _ = imported("inetd", str(d))
    assert list(s) == [str(p2), str(p1)]  # files in name order
    assert f"from {d / 'a-cat'}:" in text and "# a-cat:1: " in text
    out = tmp_path / "layout"
    r = superd_import("inetd", str(d), "--split", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "conf.d").iterdir()) == ["a-cat.yaml", "b-cat.yaml"]
    part = yaml.safe_load((out / "conf.d" / "b-cat.yaml").read_text())
    assert list(part["services"]) == [str(p1)]


def test_the_summary_counts_every_comment_and_names_every_service_left_out(tmp_path):
    conf = tmp_path / "inetd.conf"
    conf.write_text("# a comment just above a line that cannot be carried over\n"
                    "rstatd/1-3\tdgram\trpc/udp\twait\troot\t/usr/sbin/rpc.rstatd\trpc.rstatd\n"
                    "echo\tstream\ttcp\tnowait\troot\tinternal\n"
                    "tcpmux/+x\tstream\ttcp\tnowait\troot\t/bin/cat\tcat\n")
    _, text, err = imported("inetd", str(conf))
    dropped = sum(1 for c in comments(text) if c.startswith("# not carried over:"))
    noted = sum(1 for c in comments(text) if c.startswith("# note:"))
    assert (dropped, noted) == (2, 1)
    assert f"{dropped} thing(s) not carried over, {noted} carried over with a note" in err, err
    assert "left out: inetd.conf:2: Sun RPC service" in err
    assert "left out: inetd.conf:4: TCPMUX" in err
    assert "ok, 1 services; 2 left out (named above)" in err


def test_a_file_whose_only_service_is_left_out_says_so(tmp_path):
    conf = tmp_path / "inetd.conf"
    conf.write_text("rstatd/1-3\tdgram\trpc/udp\twait\troot\t/usr/sbin/rpc.rstatd\trpc.rstatd\n")
    _, _, err = imported("inetd", str(conf))
    assert "ok, 0 services; 1 left out (named above)" in err, err


def test_split_writes_a_conf_d_layout_that_loads(tmp_path):
    xd = Path(__file__).parent / "fixtures" / "xinetd"
    out = tmp_path / "etc-superd"
    r = superd_import("xinetd", str(xd / "xinetd.conf"), "--split", str(out), "--check")
    assert r.returncode == 0, r.stderr
    assert not r.stdout  # the files are the output
    files = sorted(p.name for p in (out / "conf.d").iterdir())
    entries = sorted(p.name for p in (xd / "xinetd.d").iterdir()
                     if "." not in p.name and not p.name.endswith("~"))
    assert files == sorted([f"{e}.yaml" for e in entries] + ["extra.conf.yaml"]), files
    main = yaml.safe_load((out / "superd.yaml").read_text())
    assert main["include"] == ["conf.d/*.yaml"] and main["defaults"]["instances"] == 60
    rsync = yaml.safe_load((out / "conf.d" / "rsync.yaml").read_text())
    assert list(rsync) == ["services"] and "rsync" in rsync["services"]
    check = subprocess.run([PY, "-m", "superd", "check", "-c", str(out / "superd.yaml")],
                           cwd=REPO, env=daemon_env(), capture_output=True, text=True,
                           timeout=60)
    one = superd_import("xinetd", str(xd / "xinetd.conf"))
    n = len(yaml.safe_load(one.stdout)["services"] or {})
    assert check.returncode == 0 and check.stdout.strip().endswith(f"ok, {n} services"), \
        check.stdout + check.stderr
    again = superd_import("xinetd", str(xd / "xinetd.conf"), "--split", str(out))
    assert again.returncode == 1 and "exists already; superd import overwrites nothing" in \
        again.stderr
