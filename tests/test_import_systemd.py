"""`superd import systemd UNIT.socket [UNIT.service]`: socket units and their services become
superd services with every socket option carried over in superd's names, and what superd
cannot do kept as comments with the reason. The units are real: `systemd-analyze verify`
accepts every fixture, and the imported services run and are checked on their sockets."""

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
from superd_testlib import PY, REPO, daemon_env, free_port, python_script, tcp_exchange
from test_import import all_services, comments
from test_socket_kinds import unix_exchange
from test_sockets import PROBE

UNITS = Path(__file__).parent / "fixtures" / "systemd"
# Debian's own oidentd units are copied as they ship; systemd warns about their obsolete
# StandardError=syslog, so they are left out of the verify check (they are real, warts too).
OWN = ["kitchen.socket", "kitchen@.service", "files.socket", "files.service", "dgram.socket",
       "tftpish.service", "vsock-ssh.socket", "vsock-ssh@.service"]


def superd_import(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", "import", "systemd", *args], cwd=REPO,
                          env=daemon_env(), capture_output=True, text=True, timeout=60)


def imported(*args: str) -> tuple[dict, str, str]:
    r = superd_import(*args, "--check")
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    return all_services(r.stdout), r.stdout, r.stderr


def verify(*paths: Path) -> None:
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


def test_the_fixture_units_are_valid_systemd_units():
    verify(*(UNITS / name for name in OWN))


def test_every_socket_option_in_systemds_spelling():
    s, text, _ = imported(str(UNITS / "kitchen.socket"))
    assert s["kitchen"] == {
        "listen": ["127.0.0.1:7007", "[::1]:7007"], "wait": False,
        "exec": ["cat"], "program": "/bin/cat", "user": "daemon", "group": "daemon",
        "umask": "027", "nice": 5, "cwd": "/tmp",
        "env": {"GREETING": "hello world", "MODE": "fast"}, "passenv": ["LANG"],
        "rlimits": {"nofile": 1024}, "stderr": "log", "instances": 10, "per_source": 2,
        "timeout": 300, "backlog": 256,
        "free_bind": True, "nodelay": True, "keepalive": {"time": 120, "interval": 15,
                                                          "probes": 5},
        "bind_to_device": "lo", "reuse_port": True, "receive_buffer": 256 << 10,
        "send_buffer": 1 << 20, "defer_accept": 3, "mark": 7, "ip_tos": "low-delay",
        "ip_ttl": 42, "priority": 4, "transparent": True}
    for needle in ("TriggerLimitBurst=10 -- superd never switches a service off",
                   "FileDescriptorName=kitchen -- superd names a passed socket after its service",
                   "ProtectSystem=strict -- superd does not sandbox its handlers",
                   "NoNewPrivileges=yes -- superd does not sandbox",
                   "ExecStart=-... -- superd logs every exit status",
                   "[Install] WantedBy=sockets.target -- superd's services are enabled",
                   "[Unit] Before=sockets.target -- unit ordering"):
        assert needle in text, needle
    assert "# Every socket option superd carries over" in text  # Description= is kept


def test_the_imported_options_are_on_the_handlers_socket(superd, tmp_path):
    """The same spelling, imported and run: getsockopt() on the handler's fd 0."""
    probe = python_script(tmp_path / "probe.py", PROBE)
    port = free_port()
    (tmp_path / "k.socket").write_text(
        f"[Socket]\nListenStream=127.0.0.1:{port}\nAccept=yes\nNoDelay=yes\nKeepAlive=yes\n"
        "KeepAliveTimeSec=90\nKeepAliveIntervalSec=7\nKeepAliveProbes=3\nReceiveBuffer=128K\n"
        "Mark=5\nIPTOS=16\nIPTTL=20\nPriority=2\nBindToDevice=lo\n")
    (tmp_path / "k@.service").write_text(f"[Service]\nExecStart={probe}\nStandardInput=socket\n")
    verify(tmp_path / "k.socket", tmp_path / "k@.service")
    s, _, _ = imported(str(tmp_path / "k.socket"))
    superd(s)
    got = json.loads(tcp_exchange("127.0.0.1", port, b""))
    assert (got["nodelay"], got["keepalive"], got["keepidle"], got["keepintvl"], got["keepcnt"],
            got["rcvbuf"], got["mark"], got["tos"], got["ttl"], got["priority"],
            got["device"]) == (1, 1, 90, 7, 3, 2 * 128 * 1024, 5, 16, 20, 2, "lo"), got


def test_debians_oidentd_units():
    """Debian's own units, as installed: a shell command line over two lines, ${VAR}s inside
    quotes and an optional EnvironmentFile."""
    s, text, _ = imported(str(UNITS / "oidentd.socket"))
    svc = s["oidentd"]
    assert svc["listen"] == "113" and svc["wait"] is False and svc["exec"][:2] == ["/bin/sh",
                                                                                  "-c"]
    assert svc["exec"][2].startswith("exec /usr/sbin/oidentd -IS ")
    assert '-u "nobody" -g "nogroup"' in svc["exec"][2]  # ${OIDENT_USER} from Environment=
    assert "$3" in svc["exec"][2]  # a $ inside a word is no variable for systemd
    assert svc["stderr"] == "log" and svc["instances"] == 64 and svc["backlog"] == 4096
    assert "systemd's default MaxConnections=64" in text
    assert "EnvironmentFile=-/etc/default/oidentd" in text


def test_unix_socket_files_run_with_their_owner_and_mode(superd):
    shared = world_dir("superd-unit-")
    try:
        path = shared / "made" / "u.sock"
        (shared / "u.socket").write_text(
            f"[Socket]\nListenStream={path}\nAccept=yes\nSocketUser=nobody\nSocketGroup=nogroup\n"
            "SocketMode=0660\nDirectoryMode=0711\n")
        (shared / "u@.service").write_text("[Service]\nExecStart=/bin/cat\nStandardInput=socket\n")
        s, _, _ = imported(str(shared / "u.socket"))
        assert s["u"]["socket_mode"] == "0660" and s["u"]["directory_mode"] == "0711"
        superd(s)
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
            nobody().pw_uid, nobody().pw_gid, 0o660)
        assert stat.S_IMODE(os.lstat(path.parent).st_mode) == 0o711
        assert run_as(nobody(), unix_exchange, str(path), b"cat") == b"cat"
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_listen_kinds_make_one_service_each():
    s, text, err = imported(str(UNITS / "files.socket"))
    assert s["files"]["listen"] == "/run/superd-import-fixture/files.sock"
    assert s["files"]["protocol"] == "unix" and s["files"]["wait"] is True
    assert s["files-dgram"]["protocol"] == "unix-dgram"
    assert s["files-seqpacket"] == {
        "listen": "@superd-import-fixture", "protocol": "unix-seqpacket", "wait": True,
        "exec": ["/bin/cat"], "stderr": "log", "backlog": 4096}  # no file: no owner or mode
    assert s["files"]["socket_user"] == "daemon" and s["files-dgram"]["socket_mode"] == "0660"
    assert "SocketUser=daemon -- no file for an abstract socket (systemd ignores it too)" in text
    assert "files.socket:5: ListenFIFO=: superd listens on sockets only" in text
    assert "not carried over: files.socket:5: ListenFIFO=" in err


def test_accept_no_datagrams_and_dual_stack():
    s, text, _ = imported(str(UNITS / "dgram.socket"))
    svc = s["dgram"]
    assert svc["listen"] == ["6969", "6970"] and svc["protocol"] == "udp" and svc["wait"] is True
    assert svc["exec"] == ["/bin/true", "-v", "/run/dgram", "%"]  # %t and %% resolved
    assert (svc["broadcast"], svc["receive_buffer"], svc["stderr"]) == (True, 65536, "null")
    assert "[::]:6970: systemd binds it dual-stack (BindIPv6Only=both)" in text
    assert "KeepAliveTimeSec=30 -- KeepAlive= is off" in text
    assert "MaxConnections=5 -- only for Accept=yes" in text
    assert "Restart=on-failure -- superd starts a handler per connection" in text


def test_per_connection_specifiers_leave_the_service_out():
    r = superd_import(str(UNITS / "vsock-ssh.socket"), "--check")
    assert r.returncode == 0, r.stderr
    assert "ExecStart uses %i, which systemd sets per unit instance" in r.stdout
    assert re.search(r"^superd import: left out: vsock-ssh.socket:3: ExecStart uses %i",
                     r.stderr, re.M), r.stderr
    assert "ok, 0 services; 1 left out (named above)" in r.stderr


def test_vsock_and_ipv6_only_forms(tmp_path):
    (tmp_path / "v.socket").write_text("[Socket]\nListenStream=vsock::2222\nAccept=yes\n")
    (tmp_path / "v@.service").write_text("[Service]\nExecStart=/bin/cat\nStandardInput=socket\n")
    (tmp_path / "six.socket").write_text(
        "[Socket]\nListenStream=[::]:2323\nListenStream=localhost:2324\nBindIPv6Only=ipv6-only\n"
        "Accept=yes\n")
    (tmp_path / "six@.service").write_text("[Service]\nExecStart=/bin/cat\nStandardInput=socket\n")
    verify(tmp_path / "v.socket", tmp_path / "v@.service")
    s, _, _ = imported(str(tmp_path / "v.socket"))
    assert s["v"]["listen"] == "vsock::2222" and s["v"]["protocol"] == "vsock"
    s, text, _ = imported(str(tmp_path / "six.socket"))
    assert s["six"]["listen"] == "[::]:2323"
    (tmp_path / "six.socket").write_text("[Socket]\nListenStream=2325\nAccept=yes\nIPTOS=fast\n")
    s, bad, _ = imported(str(tmp_path / "six.socket"))
    assert "IPTOS=fast -- not 0 to 255, low-delay" in bad and "ip_tos" not in s["six"]
    assert "ListenStream=localhost:2324 -- localhost:2324: superd listens on PORT" in text


def test_the_service_is_found_or_the_reason_given(tmp_path):
    (tmp_path / "lone.socket").write_text("[Socket]\nListenStream=2399\nAccept=yes\n")
    r = superd_import(str(tmp_path / "lone.socket"))
    assert r.returncode == 1 and "lone@.service: cannot read: no such service unit" in r.stderr
    (tmp_path / "other.service").write_text("[Service]\nExecStart=/bin/cat\nStandardInput=socket\n")
    s, _, _ = imported(str(tmp_path / "lone.socket"), str(tmp_path / "other.service"))
    assert s["lone"]["exec"] == ["/bin/cat"]


def test_the_summary_counts_every_comment(tmp_path):
    _, text, err = imported(str(UNITS / "kitchen.socket"))
    dropped = sum(1 for c in comments(text) if c.startswith("# not carried over:"))
    noted = sum(1 for c in comments(text) if c.startswith("# note:"))
    assert f"{dropped} thing(s) not carried over, {noted} carried over with a note" in err, err
    assert yaml.safe_load(text)["services"]


def test_an_imported_unit_runs_as_systemd_ran_it(superd, tmp_path):
    port = free_port()
    (tmp_path / "hi.socket").write_text(f"[Socket]\nListenStream=127.0.0.1:{port}\nAccept=yes\n")
    (tmp_path / "hi@.service").write_text(
        '[Service]\nEnvironment="WORD=hello world"\n'
        "ExecStart=/bin/sh -c 'echo \"$$WORD\" from ${WORD}; echo oops >&2'\n"
        "StandardInput=socket\n")
    verify(tmp_path / "hi.socket", tmp_path / "hi@.service")
    s, _, _ = imported(str(tmp_path / "hi.socket"))
    assert s["hi"]["stderr"] == "socket"  # systemd's default: stderr inherits the socket
    superd(s)
    assert tcp_exchange("127.0.0.1", port, b"") == b"hello world from hello world\noops\n"
    with socket.socket() as probe_free:  # the port is superd's while it runs
        with pytest.raises(OSError):
            probe_free.bind(("127.0.0.1", port))
