"""Security: what superd trusts, what handlers inherit, who may talk to the daemon.

- As root, a table, an included file or a python handler file that someone other than root
  could write is refused (as sshd's StrictModes does), by `check`, `run` and on reload.
- Handlers never inherit superd's listening sockets or its control socket: their /proc/PID/fd
  is looked at from outside, for exec and python handlers, nowait and wait, after a reload.
- The control socket is mode 0600 and refuses other uids even when its mode is loosened.
- A handler with `user: nobody` runs as nobody (real, effective, saved and fs ids) with
  nobody's groups only, and cannot get root back.

Most of these need root (to chown files, and to become nobody); they are skipped otherwise.
"""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import socket
import subprocess
import time

import pytest
import reliability_lib as rl
import superd_testlib as lib
from superd_testlib import connect, free_port, recv_exact, tcp_exchange

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")


def echo(port: int) -> dict:
    return {"listen": f"127.0.0.1:{port}", "internal": "echo"}


def superd_check(table) -> subprocess.CompletedProcess:
    return subprocess.run([lib.PY, "-m", "superd", "check", "-c", str(table)], cwd=lib.REPO,
                          capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------------------------
# files others could write


def loosen(path, how: str) -> None:
    if how == "group-writable":
        path.chmod(0o664)
    elif how == "world-writable":
        path.chmod(0o666)
    elif how == "owned-by-nobody":
        pw = rl.nobody()
        os.chown(path, pw.pw_uid, pw.pw_gid)
        path.chmod(0o644)


HOWS = ["group-writable", "world-writable", "owned-by-nobody"]


@needs_root
@pytest.mark.parametrize("which", ["table", "include", "python-file"])
@pytest.mark.parametrize("how", HOWS)
def test_writable_by_others_is_refused_as_root(new_daemon, which, how):
    d = new_daemon()
    port = free_port()
    (d.workdir / "conf.d").mkdir()
    include = d.workdir / "conf.d" / "more.yaml"
    include.write_text(f"services:\n  more: {{listen: \"127.0.0.1:{free_port()}\", "
                       "internal: echo}\n")
    include.chmod(0o644)
    handler = d.workdir / "h.py"
    handler.write_text("def handle(sock, env):\n    return 0\n")
    handler.chmod(0o644)
    text = d.table_text({"echo": echo(port),
                         "py": {"listen": f"127.0.0.1:{free_port()}", "python": "h.py:handle"}})
    d.write_table(text=text.replace("services:", "include: [conf.d/*.yaml]\nservices:", 1))
    culprit = {"table": d.table, "include": include, "python-file": handler}[which]
    loosen(culprit, how)

    r = superd_check(d.table)
    assert r.returncode == 1, f"superd check accepted a {how} {which}:\n{r.stdout}"
    assert re.search(re.escape(str(culprit)) + r".*writable", r.stdout), r.stdout

    if which == "table":  # nothing can be served from a table that is refused
        d.start(wait_ready=False)  # the table as it is on disk
        try:
            rc = d.proc.wait(15)
        except subprocess.TimeoutExpired:
            rc = None
        d.expect_rc = 1
        assert rc == 1, f"superd run went on with a {how} {which}"
        assert str(culprit) in d.stderr_text(), d.stderr_text()
        assert port not in lib.listening_tcp_ports(), "bound something before refusing"
        return
    # An included file or a handler: the services from it are not started, the rest are.
    d.start()
    assert str(culprit) in d.stderr_text(), d.stderr_text()
    assert tcp_exchange("127.0.0.1", port, b"x", expect_len=1) == b"x"
    status = lib.status(d)
    refused = "py" if which == "python-file" else None
    if refused:
        assert refused in status["failed"] and "writable" in status["failed"][refused]["reason"]
    else:
        assert "more" not in status["services"], "a service from a file others could write"
    assert any(str(culprit) in p and "writable" in p for p in status["problems"]), status


@needs_root
@pytest.mark.parametrize("how", HOWS)
def test_writable_table_refused_on_reload(superd, how):
    """A running daemon whose table becomes writable by others keeps its running table."""
    pa, pb = free_port(), free_port()
    d = superd({"echo": echo(pa)})
    d.write_table({"echo": echo(pa), "new": echo(pb)})
    loosen(d.table, how)
    d.reload(wait=False)
    d.wait_log(r"reload refused.*" + re.escape(str(d.table)) + r".*writable")
    assert tcp_exchange("127.0.0.1", pa, b"still\n", expect_len=6) == b"still\n"
    assert lib.connection_refused("127.0.0.1", pb)
    d.table.chmod(0o644)
    os.chown(d.table, 0, 0)
    d.reload()
    assert tcp_exchange("127.0.0.1", pb, b"now\n", expect_len=4) == b"now\n"


# --------------------------------------------------------------------------------------------
# what a handler inherits


INSPECT_PY = '''\
import os, time


def hold(sock, env):
    sock.sendall(b"ready\\n")
    sock.recv(1)
    return 0
'''


def handler_fds(pid: int) -> dict[int, str]:
    return rl.proc_fds(pid)


def is_stderr_socket(d: lib.Superd, target: str) -> bool:
    """`target` (a handler's fd 2) is its service's stderr socket: a connected unix stream
    socket whose other end superd reads (`ss -x` names both ends of each unix socket)."""
    inode = target.removeprefix("socket:[").removesuffix("]")
    out = subprocess.run(["ss", "-xaH"], capture_output=True, text=True, timeout=10).stdout
    peers = [f.split()[-1] for f in out.splitlines()
             if f.split()[:2] == ["u_str", "ESTAB"] and f.split()[5] == inode]
    return len(peers) == 1 and f"socket:[{peers[0]}]" in daemon_sockets(d)


def daemon_sockets(d: lib.Superd) -> set[str]:
    return rl.socket_inodes(d.pid)


def assert_inherits_nothing(d: lib.Superd, pid: int, allowed_socket: str | None = None,
                            wait: bool = False) -> dict[int, str]:
    """The handler `pid` holds exactly fds 0, 1, 2 (and 3 for wait), and no socket of the
    daemon's but the one it was given."""
    fds = handler_fds(pid)
    expected = {0, 1, 2, 3} if wait else {0, 1, 2}
    assert set(fds) == expected, f"handler {pid} has fds {fds}"
    # fd 2 (`stderr: log`) is the service's stderr socket, which superd keeps for the next
    # handler: shared by design, checked by is_stderr_socket.
    theirs = {t for fd, t in fds.items() if t.startswith("socket:") and t != allowed_socket
              and fd != 2}
    # A forked child can answer before its parent has closed its own copy of the connection
    # (a few microseconds after fork): wait, briefly, until superd holds none of the handler's.
    deadline = time.monotonic() + 2.0
    ours = daemon_sockets(d)
    while ours & theirs and time.monotonic() < deadline:
        time.sleep(0.01)
        ours = daemon_sockets(d)
    for fd, target in fds.items():
        if target.startswith("socket:") and target != allowed_socket and fd != 2:
            assert target not in ours, (
                f"handler {pid} fd {fd} is one of superd's own sockets ({target}); "
                f"superd's: {sorted(ours)}")
    return fds


@pytest.mark.parametrize("kind", ["exec", "python"])
def test_nowait_handler_inherits_no_daemon_socket(new_daemon, tmp_path, kind):
    """A nowait handler holds its connection (fds 0 and 1) and its stderr socket, nothing else:
    no listener of any kind (TCP v4/v6, UDP, unix stream and datagram), no control socket;
    also after a reload has bound one more listener."""
    ports = {n: free_port() for n in ("h", "tcp6", "udp", "other")}
    upath, dpath = tmp_path / "s.sock", tmp_path / "d.sock"
    if kind == "exec":
        handler = {"exec": ["/bin/sh", "-c", "echo ready; exec head -c 1"]}
    else:
        handler = {"python": "inspect_handlers.py:hold"}
    services = {
        "h": {"listen": f"127.0.0.1:{ports['h']}", **handler},
        "tcp6": {"listen": f"[::1]:{ports['tcp6']}", "internal": "echo"},
        "udp": {"listen": f"127.0.0.1:{ports['udp']}", "protocol": "udp", "internal": "echo"},
        "unix": {"listen": str(upath), "protocol": "unix", "internal": "echo"},
        "unixd": {"listen": str(dpath), "protocol": "unix-dgram", "internal": "echo"},
    }
    d = new_daemon()
    (d.workdir / "inspect_handlers.py").write_text(INSPECT_PY)
    d.start(services)
    for helper in rl.helpers(d):  # superd's spawner processes hold none of its sockets either
        shared = set(rl.proc_fds(helper).values()) & daemon_sockets(d)
        assert not shared, f"helper {helper} ({rl.cmdline(helper)}) holds {shared}"
    for round_ in range(2):
        with connect("127.0.0.1", ports["h"]) as s:
            assert recv_exact(s, 6) == b"ready\n"
            pid = int(d.wait_start("h", round_ + 1)[-1]["pid"])
            fds = assert_inherits_nothing(d, pid)
            assert fds[0] == fds[1] and fds[0].startswith("socket:")
            assert is_stderr_socket(d, fds[2]), fds  # stderr: log
            s.sendall(b"x")
        d.wait_exit("h", pid)
        # a reload binds one more listener; the next handler must not see it either
        services["other"] = echo(ports["other"])
        d.reload(services)


def test_wait_handler_gets_its_socket_only(superd, tmp_path):
    """A wait handler gets the socket it serves (fds 0, 1, 3), not superd's other sockets."""
    pw, pother = free_port(), free_port()
    script = lib.write_script(tmp_path / "udpwait.sh", "#!/bin/sh\nexec sleep 30\n")
    d = superd({"w": {"listen": f"127.0.0.1:{pw}", "protocol": "udp", "wait": True,
                      "exec": [str(script)], "timeout": 20},
                "other": echo(pother)})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(b"wake", ("127.0.0.1", pw))
        pid = int(d.wait_start("w")[-1]["pid"])
        ours = daemon_sockets(d)
        fds = handler_fds(pid)
        assert set(fds) == {0, 1, 2, 3}, fds
        assert fds[0] == fds[1] == fds[3], fds
        assert fds[0] in ours, "fd 0 should be superd's own bound socket for this service"
        assert is_stderr_socket(d, fds[2]), fds
        os.kill(pid, 9)
    d.wait_log(rf"^EXIT: w signal=9 pid={pid} ")


# --------------------------------------------------------------------------------------------
# the control socket


def _connect_and_ask(path: str, command: str) -> str:
    """The answer to `command` on the control socket, or EACCES when connect is refused (run
    as another user in a forked child, see rl.run_as)."""
    try:
        return lib.control(path, command)
    except PermissionError as e:
        return f"EACCES {e}"


@needs_root
def test_control_socket_is_not_usable_by_another_uid(new_daemon):
    folder = rl.world_dir("superd-ctl-")
    try:
        d = new_daemon()
        ctl = folder / "ctl.sock"
        port = free_port()
        d.start({"echo": echo(port)}, settings={"control_socket": str(ctl)})
        st = os.stat(ctl)
        assert st.st_uid == os.geteuid() and (st.st_mode & 0o777) == 0o600, oct(st.st_mode)
        nobody = rl.nobody()
        answer = rl.run_as(nobody, _connect_and_ask, str(ctl), "status")
        assert answer.startswith("EACCES"), f"nobody reached the control socket: {answer!r}"
        # loosen the mode: the daemon still checks the peer's uid (SO_PEERCRED)
        ctl.chmod(0o666)
        for command in ("status", "reload", "stop"):
            before = len(d.lines())
            answer = rl.run_as(nobody, _connect_and_ask, str(ctl), command)
            got = json.loads(answer)
            assert set(got) == {"error"} and got["error"].startswith("permission denied"), got
            assert d.proc.poll() is None, f"`{command}` from nobody was obeyed"
            assert not [x for x in d.lines()[before:] if x.startswith(("reload", "stopping"))]
        assert tcp_exchange("127.0.0.1", port, b"ok\n", expect_len=3) == b"ok\n"
        # and the owner still can
        assert "services" in json.loads(_connect_and_ask(str(ctl), "status"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# user: nobody


IDS_PY = '''\
import json, os


def ids(sock, env):
    try:
        os.setuid(0)
        regained = True
    except PermissionError:
        regained = False
    sock.sendall(json.dumps({"uid": os.getresuid(), "gid": os.getresgid(),
                             "groups": sorted(os.getgroups()), "regained": regained}).encode())
    return 0
'''


def status_ids(text: str) -> dict[str, list[int]]:
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(x) for x in value.split()]
    return out


def nobody_groups() -> set[int]:
    pw = rl.nobody()
    return set(os.getgrouplist(pw.pw_name, pw.pw_gid))


@needs_root
def test_user_nobody_runs_as_nobody_with_nobodys_groups_only(new_daemon):
    d = new_daemon()
    (d.workdir / "ids.py").write_text(IDS_PY)
    pe, pp = free_port(), free_port()
    d.start({"exec": {"listen": f"127.0.0.1:{pe}", "exec": ["/bin/cat", "/proc/self/status"],
                      "user": "nobody"},
             "py": {"listen": f"127.0.0.1:{pp}", "python": "ids.py:ids", "user": "nobody"}})
    pw = rl.nobody()
    ids = status_ids(tcp_exchange("127.0.0.1", pe, b"").decode())
    assert ids["Uid"] == [pw.pw_uid] * 4, ids
    assert ids["Gid"] == [pw.pw_gid] * 4, ids
    assert set(ids["Groups"]) == nobody_groups(), ids
    assert 0 not in ids["Groups"]
    got = json.loads(tcp_exchange("127.0.0.1", pp, b""))
    assert got["uid"] == [pw.pw_uid] * 3 and got["gid"] == [pw.pw_gid] * 3, got
    assert set(got["groups"]) == nobody_groups(), got
    assert got["regained"] is False


@needs_root
def test_user_and_group_replace_every_group(superd):
    """`user: nobody` with `group: daemon`: gid daemon; no group of root's is left."""
    pe = free_port()
    group = grp.getgrnam("daemon")
    d = superd({"exec": {"listen": f"127.0.0.1:{pe}", "exec": ["/bin/cat", "/proc/self/status"],
                         "user": "nobody", "group": "daemon"}})
    ids = status_ids(tcp_exchange("127.0.0.1", pe, b"").decode())
    assert ids["Uid"] == [rl.nobody().pw_uid] * 4, ids
    assert ids["Gid"] == [group.gr_gid] * 4, ids
    assert 0 not in ids["Groups"], ids
    assert d.proc.poll() is None
