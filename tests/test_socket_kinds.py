"""Unix socket files (owner, group, mode, made directories), abstract names, SOCK_SEQPACKET and
vsock: each with a real client, other users' clients among them, and wait and nowait handlers.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import stat

import pytest
import superd_testlib as lib
from reliability_lib import nobody, run_as, world_dir
from superd_testlib import free_port, python_script, recv_until_eof, wait_until
from test_sockets import PROBE

AF_VSOCK = getattr(socket, "AF_VSOCK", 40)


@pytest.fixture
def shared_dir():
    """A directory every user may enter (tmp_path is 0700), removed afterwards."""
    path = world_dir("superd-sock-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def probe(shared_dir):
    return python_script(shared_dir / "probe.py", PROBE)


def unix_exchange(path: str, data: bytes, kind: int = socket.SOCK_STREAM,
                  timeout: float = 5.0) -> bytes:
    """Connect (as whoever runs this), send, half-close, read to EOF."""
    with socket.socket(socket.AF_UNIX, kind) as c:
        c.settimeout(timeout)
        c.connect(path)
        if data:
            c.sendall(data)
        if kind == socket.SOCK_STREAM:
            c.shutdown(socket.SHUT_WR)
            return recv_until_eof(c, timeout)
        return c.recv(65536)


def other_user() -> pwd.struct_passwd:
    """A second unprivileged user besides nobody (Debian has daemon, uid 1)."""
    return pwd.getpwnam("daemon")


# -- unix socket files -----------------------------------------------------------------------


def test_a_unix_service_is_for_every_local_user_by_default(superd, shared_dir):
    """The socket file is srw-rw-rw- root root (systemd's SocketMode= default), not superd's
    umask: a client running as nobody is served."""
    path = str(shared_dir / "echo.sock")
    d = superd({"echo": {"listen": path, "protocol": "unix", "internal": "echo"}})
    st = os.lstat(path)
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666, oct(st.st_mode)
    assert (st.st_uid, st.st_gid) == (0, 0)
    assert run_as(nobody(), unix_exchange, path, b"from nobody") == b"from nobody"
    d.wait_log(rf"START: echo pid=0 from=uid:{nobody().pw_uid}$")


def test_socket_user_group_and_mode(superd, shared_dir):
    path = str(shared_dir / "private.sock")
    superd({"p": {"listen": path, "protocol": "unix", "internal": "echo",
                  "socket_user": "nobody", "socket_group": "nogroup", "socket_mode": "0600"}})
    st = os.lstat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (
        nobody().pw_uid, nobody().pw_gid, 0o600), (st.st_uid, st.st_gid, oct(st.st_mode))
    assert run_as(nobody(), unix_exchange, path, b"owner") == b"owner"
    with pytest.raises(AssertionError, match="PermissionError"):
        run_as(other_user(), unix_exchange, path, b"stranger")


def test_directory_mode_for_the_directories_superd_makes(superd, shared_dir):
    path = shared_dir / "made" / "deeper" / "s.sock"
    superd({"s": {"listen": str(path), "protocol": "unix-dgram", "wait": True,
                  "exec": ["/bin/true"], "directory_mode": "0750"}})
    for made in (shared_dir / "made", shared_dir / "made" / "deeper"):
        st = os.lstat(made)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750, oct(st.st_mode)
    assert stat.S_IMODE(os.lstat(shared_dir).st_mode) == 0o755  # what existed is left alone
    assert stat.S_ISSOCK(os.lstat(path).st_mode)


def test_a_symlink_planted_at_the_socket_path_is_never_followed(new_daemon, shared_dir):
    """A user who can write the directory points the socket path at a root file: superd does
    not remove it (not a socket), cannot bind over it, and never chmods what it points to."""
    victim = shared_dir / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    path = shared_dir / "svc.sock"
    path.symlink_to(victim)
    d = new_daemon()
    d.start({"s": {"listen": str(path), "protocol": "unix", "internal": "echo",
                   "socket_user": "nobody", "socket_mode": "0666"}})
    d.wait_log(r"^s: not started: .*Address already in use")
    assert "Address already in use" in lib.status(d)["failed"]["s"]["reason"]
    st = os.stat(victim)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert os.path.islink(path)


def test_a_reload_changes_the_mode_of_the_same_socket(superd, shared_dir):
    path = str(shared_dir / "m.sock")
    svc = {"listen": path, "protocol": "unix", "internal": "echo", "socket_mode": "0600"}
    d = superd({"m": svc})
    inode = os.lstat(path).st_ino
    with pytest.raises(AssertionError, match="PermissionError"):
        run_as(nobody(), unix_exchange, path, b"x")
    d.reload({"m": {**svc, "socket_mode": "0666"}})
    assert os.lstat(path).st_ino == inode and stat.S_IMODE(os.lstat(path).st_mode) == 0o666
    assert run_as(nobody(), unix_exchange, path, b"now") == b"now"


def test_unix_send_buffer_is_set_on_each_connection(superd, shared_dir, probe):
    """The kernel does not copy buffer sizes to accepted unix connections: superd sets them."""
    path = str(shared_dir / "b.sock")
    superd({"b": {"listen": path, "protocol": "unix", "exec": [str(probe)],
                  "send_buffer": 300000}})
    got = json.loads(unix_exchange(path, b""))
    assert got["sndbuf"] == 600000, got


# -- abstract names --------------------------------------------------------------------------


def _abstract_listed(name: str) -> bool:
    with open("/proc/net/unix") as f:
        return any(line.split()[-1] == f"@{name}" for line in f.read().splitlines()[1:]
                   if len(line.split()) >= 8)


def test_abstract_socket_serves_every_user_and_leaves_no_file(superd):
    name = f"superd-test-{free_port()}"
    d = superd({"a": {"listen": f"@{name}", "protocol": "unix", "internal": "echo"}})
    assert _abstract_listed(name)
    assert unix_exchange(f"\0{name}", b"abstract") == b"abstract"
    assert run_as(nobody(), unix_exchange, f"\0{name}", b"too") == b"too"
    d.wait_log(rf"START: a pid=0 from=uid:{nobody().pw_uid}$")
    d.stop()
    wait_until(lambda: not _abstract_listed(name), 5, "the abstract name released")


def test_abstract_wait_service(superd, probe):
    name = f"superd-test-{free_port()}"
    superd({"w": {"listen": f"@{name}", "protocol": "unix", "wait": True,
                  "exec": [str(probe), "listen"]}})
    got = json.loads(unix_exchange(f"\0{name}", b""))
    assert got["family"] == socket.AF_UNIX and got["sockname"] == f"\0{name}", got


# -- SOCK_SEQPACKET --------------------------------------------------------------------------


def test_seqpacket_echo_keeps_message_boundaries(superd, shared_dir):
    path = str(shared_dir / "sp.sock")
    superd({"sp": {"listen": path, "protocol": "unix-seqpacket", "internal": "echo"}})
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.settimeout(5)
        c.connect(path)
        for message in (b"one", b"two", b"three"):
            c.send(message)  # sent back to back, before any answer is read
        assert [c.recv(100) for _ in range(3)] == [b"one", b"two", b"three"]
    assert run_as(nobody(), unix_exchange, path, b"nobody", socket.SOCK_SEQPACKET) == b"nobody"


def test_seqpacket_nowait_and_wait_handlers(superd, shared_dir, probe):
    nowait, wait = str(shared_dir / "n.sock"), str(shared_dir / "w.sock")
    superd({"n": {"listen": nowait, "protocol": "unix-seqpacket", "exec": [str(probe)]},
            "w": {"listen": wait, "protocol": "unix-seqpacket", "wait": True,
                  "exec": [str(probe), "listen"]}})
    for path in (nowait, wait):
        got = json.loads(unix_exchange(path, b"", socket.SOCK_SEQPACKET))
        assert got["type"] == socket.SOCK_SEQPACKET and got["family"] == socket.AF_UNIX, got
        assert got["env"]["PROTO"] == "UNIX", got
    got = json.loads(run_as(nobody(), unix_exchange, nowait, b"", socket.SOCK_SEQPACKET))
    assert got["env"]["UNIXREMOTEEUID"] == str(nobody().pw_uid), got


def test_seqpacket_per_source_counts_each_uid(superd, shared_dir):
    """per_source on a unix socket is per peer uid, logged as from=uid:N."""
    path = str(shared_dir / "ps.sock")
    d = superd({"ps": {"listen": path, "protocol": "unix-seqpacket", "exec": ["/bin/cat"],
                       "per_source": 1}})
    held = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        held.settimeout(5)
        held.connect(path)
        held.send(b"hold")
        assert held.recv(10) == b"hold"  # cat runs for root's first connection
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as second:
            second.settimeout(5)
            second.connect(path)
            assert second.recv(10) == b""  # refused: closed at once
        d.wait_log(r"FAIL: ps per_source_limit from=uid:0$")
        assert run_as(nobody(), unix_exchange, path, b"other uid",
                      socket.SOCK_SEQPACKET) == b"other uid"
    finally:
        held.close()


# -- vsock -----------------------------------------------------------------------------------


def _vsock_or_skip() -> None:
    try:
        socket.socket(AF_VSOCK, socket.SOCK_STREAM).close()
    except OSError as e:
        pytest.skip(f"no AF_VSOCK on this machine: socket() fails with {e.strerror}")


def _vsock_port_taken(port: int) -> bool:
    with socket.socket(AF_VSOCK, socket.SOCK_STREAM) as s:
        try:
            s.bind((socket.VMADDR_CID_ANY, port))
        except OSError as e:
            return e.errno == 98  # EADDRINUSE
    return False


def test_vsock_services_bind_their_ports(superd, probe):
    """What can be seen without a peer: superd holds the vsock ports it was given (nobody else
    can bind them), for a nowait internal service and a wait handler, and says so in status."""
    _vsock_or_skip()
    echo, wait = 50000 + free_port() % 10000, 60000 + free_port() % 10000
    assert not _vsock_port_taken(echo) and not _vsock_port_taken(wait)
    d = superd({"ve": {"listen": f"vsock::{echo}", "protocol": "vsock", "internal": "echo"},
                "vw": {"listen": f"vsock::{wait}", "protocol": "vsock", "wait": True,
                       "exec": [str(probe), "listen"]}})
    assert _vsock_port_taken(echo) and _vsock_port_taken(wait)
    d.stop()
    assert not _vsock_port_taken(echo) and not _vsock_port_taken(wait)


LOOPBACK = "/sys/module/vsock_loopback"


def test_vsock_client_through_the_loopback_cid(superd, probe):
    """A real vsock client needs the vsock_loopback transport (CID 1, VMADDR_CID_LOCAL).
    Without it the kernel sends CID 1 to the host's transport, so nothing is tried."""
    _vsock_or_skip()
    if not os.path.exists(LOOPBACK):
        pytest.skip(f"vsock_loopback is not loaded (no {LOOPBACK}): a connection to CID 1 "
                    "would go to the host, not to this machine")
    port = 50000 + free_port() % 10000
    d = superd({"ve": {"listen": f"vsock::{port}", "protocol": "vsock", "internal": "echo",
                       "per_source": 1},
                "vp": {"listen": f"vsock::{port + 1}", "protocol": "vsock",
                       "exec": [str(probe)]}})
    with socket.socket(AF_VSOCK, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect((1, port))
        c.sendall(b"vm")
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == b"vm"
    d.wait_log(r"START: ve pid=0 from=cid:1$")
    with socket.socket(AF_VSOCK, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect((1, port + 1))
        got = json.loads(recv_until_eof(c))
    assert got["family"] == AF_VSOCK, got
    assert (got["env"]["PROTO"], got["env"]["REMOTE_ADDR"], got["env"]["VSOCKREMOTECID"]) == (
        "VSOCK", "vsock:1", "1"), got


def test_seqpacket_echo_answers_messages_sent_after_the_accept(new_daemon, shared_dir):
    """Messages that came after superd had accepted (and read nothing yet) were read, and
    the recv that found no more raised out of the read before they were sent back: the
    echo waited for the next message (a CI run timed out on the test below)."""
    path = str(shared_dir / "late.sock")
    d = new_daemon().start({"sp": {"listen": path, "protocol": "unix-seqpacket",
                                   "internal": "echo"}})
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
        c.settimeout(5)
        c.connect(path)
        d.wait_log(r"^START: sp pid=0 ")
        lib.wait_until(lambda: lib.status(d)["services"]["sp"]["active"] == 1, 5, "accepted")
        c.send(b"a")
        c.send(b"b")
        assert [c.recv(10), c.recv(10)] == [b"a", b"b"]


def test_a_seqpacket_socket_passed_by_systemd(new_daemon, shared_dir):
    """Socket activation of a ListenSequentialPacket= socket: superd takes it as the
    unix-seqpacket socket it is (message echo), and leaves its file alone."""
    path = str(shared_dir / "passed.sock")
    passed = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        passed.bind(path)
        passed.listen(16)
        new_daemon().start({"sp": {"protocol": "unix-seqpacket", "internal": "echo"}},
                           passed=[("sp", passed)])
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as c:
            c.settimeout(5)
            c.connect(path)
            c.send(b"a")
            c.send(b"b")
            assert [c.recv(10), c.recv(10)] == [b"a", b"b"]
    finally:
        passed.close()
