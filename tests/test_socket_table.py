"""The socket keys in the table (every bad value named by file, line and key; a key that cannot
apply to a protocol refused with the reason; defaults applied where they fit), and the
race-free handling of unix socket files, in-process against the real file system."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from reliability_lib import nobody, world_dir
from superd_testlib import PY, REPO, daemon_env, free_port

from superd import unixfile
from superd.accept import _vsock_env, _vsock_peer
from superd.config import load_table
from superd.sockopts import SocketOptions, size

# -- the table -------------------------------------------------------------------------------


def check(tmp_path: Path, services: dict, defaults: dict | None = None) -> tuple[int, str, Path]:
    table = tmp_path / "t.yaml"
    doc: dict = {"services": services}
    if defaults:
        doc = {"defaults": defaults, **doc}
    table.write_text(yaml.safe_dump(doc, sort_keys=False))
    table.chmod(0o644)
    r = subprocess.run([PY, "-m", "superd", "check", "-c", str(table)], cwd=REPO,
                       env=daemon_env(), capture_output=True, text=True, timeout=60)
    return r.returncode, r.stdout + r.stderr, table


TCP = {"listen": "127.0.0.1:7", "internal": "echo"}
UDP = {"listen": "127.0.0.1:7", "protocol": "udp", "internal": "echo"}
UNIX = {"listen": "/run/superd-test/x.sock", "protocol": "unix", "internal": "echo"}
VSOCK = {"listen": "vsock::7000", "protocol": "vsock", "internal": "echo"}


@pytest.mark.parametrize("base,key,value,message", [
    (UNIX, "socket_mode", "0999", "expected an octal mode such as \"0660\""),
    (UNIX, "socket_mode", 0o1777, "expected an octal mode such as \"0660\" (at most 777), not "
                                  "1777 (octal)"),
    (UNIX, "socket_user", "no-such-user-x", "no such user 'no-such-user-x'"),
    (UNIX, "socket_group", "no-such-group-x", "no such group 'no-such-group-x'"),
    (UNIX, "directory_mode", "rwx", "expected an octal mode"),
    (TCP, "keepalive", {"time": 0}, "expected a number of seconds from 1 to 32767"),
    (TCP, "keepalive", {"probes": 500}, "500 is out of range (1 to 127)"),
    (TCP, "keepalive", {"idle": 5}, "unknown keepalive key 'idle'"),
    (TCP, "keepalive", "on", "expected true, false or a mapping of time, interval, probes"),
    (TCP, "nodelay", "yes", "expected true or false, not 'yes'"),
    (TCP, "free_bind", 1, "expected true or false, not 1"),
    (TCP, "receive_buffer", "10X", "expected a size in bytes such as 65536 or 64K"),
    (TCP, "send_buffer", 0, "0 is out of range (1 byte to 1G)"),
    (TCP, "send_buffer", "2G", "2G is out of range"),
    (TCP, "bind_to_device", "a/b", "expected an interface name such as eth0"),
    (TCP, "bind_to_device", "a-name-too-long-0", "expected an interface name"),
    (TCP, "defer_accept", 0, "expected a number of seconds from 1 to 3600"),
    (TCP, "mark", -1, "-1 is out of range (0 to 4294967295)"),
    (TCP, "ip_tos", "fast", "expected 0 to 255 or one of low-delay, throughput"),
    (TCP, "ip_ttl", 256, "256 is out of range (1 to 255)"),
    (TCP, "priority", -1, "-1 is out of range"),
    (UDP, "broadcast", "true", "expected true or false"),
    # keys that cannot apply to the protocol
    (UDP, "nodelay", True, "nodelay cannot apply to protocol udp: it is a TCP option"),
    (UDP, "keepalive", True, "keepalive cannot apply to protocol udp"),
    (UDP, "defer_accept", 5, "defer_accept cannot apply to protocol udp"),
    (TCP, "broadcast", True, "broadcast cannot apply to protocol tcp: it is a UDP option"),
    (TCP, "socket_mode", "0600", "socket_mode cannot apply to protocol tcp: it is the mode of "
                                 "a unix socket's file"),
    (UNIX, "reuse_port", True, "reuse_port cannot apply to protocol unix"),
    (UNIX, "mark", 1, "mark cannot apply to protocol unix: it is an IP option"),
    (VSOCK, "receive_buffer", 4096, "receive_buffer cannot apply to protocol vsock"),
    (VSOCK, "nodelay", True, "nodelay cannot apply to protocol vsock"),
    ({**UNIX, "listen": "@abstract"}, "socket_mode", "0600",
     "socket_mode cannot apply to an abstract socket (@name): it has no file"),
    ({**TCP, "wait": True, "internal": None, "exec": ["/bin/cat"]}, "priority", 3,
     "priority cannot apply to a wait: true tcp service: the kernel does not pass it on"),
    ({**UNIX, "wait": True, "internal": None, "exec": ["/bin/cat"]}, "send_buffer", 4096,
     "send_buffer cannot apply to a wait: true unix service"),
])
def test_bad_socket_values_are_named(tmp_path, base, key, value, message):
    svc = {k: v for k, v in {**base, key: value}.items() if v is not None}
    rc, out, table = check(tmp_path, {"s": svc})
    lines = table.read_text().splitlines()
    line = lines.index(f"    {key}:" if isinstance(value, dict) else
                       next(x for x in lines if x.startswith(f"    {key}: "))) + 1
    line += isinstance(value, dict)  # a mapping is blamed on its first entry
    assert rc == 1 and f"{table}:{line}: services.s.{key}: {message}" in out, out


@pytest.mark.parametrize("protocol,listen,message", [
    ("vsock", "vsock:x:5", "CID 'x' is not a number"),
    ("vsock", "vsock:3", "protocol vsock needs vsock:CID:PORT or vsock::PORT"),
    ("vsock", "vsock:3:0", "port '0' is not a number from 1 to 4294967294"),
    ("vsock", "127.0.0.1:5", "protocol vsock needs vsock:CID:PORT"),
    ("tcp", "vsock:3:5", "a vsock address needs protocol vsock, not tcp"),
    ("tcp", "@name", "a unix socket needs protocol unix, unix-dgram or unix-seqpacket"),
    ("unix-seqpacket", "relative.sock",
     "protocol unix-seqpacket needs an absolute socket path or an abstract @name"),
    ("unix", "@", "'@' names no socket"),
    ("unix", "/" + "x" * 107, f"'/{'x' * 107}' is longer than the 107 bytes a unix socket "
                             "address holds"),
])
def test_bad_listen_forms_are_named(tmp_path, protocol, listen, message):
    rc, out, table = check(tmp_path, {"s": {"listen": listen, "protocol": protocol,
                                            "internal": "echo"}})
    assert rc == 1 and f"{table}:3: services.s.listen: {message}" in out, out


def test_one_unix_path_is_one_socket_whatever_its_type(tmp_path):
    rc, out, table = check(tmp_path, {
        "a": {"listen": "/run/superd-test/same.sock", "protocol": "unix", "internal": "echo"},
        "b": {"listen": "/run/superd-test/same.sock", "protocol": "unix-dgram",
              "internal": "echo"}})
    assert rc == 1 and "services.b.listen[0]: /run/superd-test/same.sock is the same " \
                       "address as services.a" in out, out


def test_defaults_apply_where_they_fit(tmp_path):
    """nodelay in defaults is for the TCP services; a UDP service is not refused for it."""
    rc, out, table = check(tmp_path, {"t": TCP, "u": {**UDP, "listen": "127.0.0.1:8"},
                                      "x": {**UNIX}},
                           defaults={"nodelay": True, "socket_mode": "0660", "broadcast": True})
    assert rc == 0, out
    services = {s.name: s.sockopts for s in load_table(str(table)).services}
    assert services["t"].nodelay and not services["t"].broadcast
    assert services["u"].broadcast and not services["u"].nodelay
    assert services["x"].socket_mode == 0o660 and services["t"].socket_mode == 0o666


def test_sizes_count_in_1024s():
    assert (size(4096), size("64K"), size("1m"), size(" 8 M ")) == (4096, 65536, 1 << 20, 8 << 20)


# -- vsock peers (no vsock client can be made here without vsock_loopback) -------------------


def test_vsock_peer_and_environment():
    assert _vsock_peer(None, (5, 1234)) == "cid:5"  # type: ignore[arg-type]
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        pytest.skip(f"no AF_VSOCK here: {e.strerror}")
    with sock:
        port = 50000 + free_port() % 10000
        sock.bind((socket.VMADDR_CID_ANY, port))
        env = _vsock_env((7, 4321), sock)
    assert env == {"PROTO": "VSOCK", "VSOCKREMOTECID": "7", "VSOCKREMOTEPORT": "4321",
                   "VSOCKLOCALCID": str(socket.VMADDR_CID_ANY), "VSOCKLOCALPORT": str(port),
                   "REMOTE_ADDR": "vsock:7", "REMOTE_PORT": "4321"}


# -- unix socket files: what a user who can write the directory can do ----------------------


@pytest.fixture
def sticky_dir():
    """A /tmp-like directory: everyone may write, sticky."""
    path = world_dir("superd-race-")
    path.chmod(0o1777)
    yield path
    for p in sorted(path.rglob("*"), key=lambda p: -len(p.parts)):
        p.unlink() if not p.is_dir() or p.is_symlink() else p.rmdir()
    path.rmdir()


@pytest.fixture
def victim(sticky_dir):
    """A root file another user would like to own."""
    path = sticky_dir / "victim"
    path.write_text("root's")
    path.chmod(0o600)
    return path


OPEN = SocketOptions(socket_uid=nobody().pw_uid, socket_mode=0o666)


def _untouched(path: Path) -> bool:
    st = os.stat(path)
    return (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)


class SwappingSocket(socket.socket):
    """bind(), then another user's move: the path now names something else."""

    def __init__(self, swap):
        super().__init__(socket.AF_UNIX, socket.SOCK_STREAM)
        self.swap = swap

    def bind(self, address):  # type: ignore[override]
        super().bind(address)
        self.swap(address)


@pytest.mark.parametrize("swap", [os.symlink, os.link], ids=["symlink", "hard-link"])
def test_a_link_to_a_root_file_swapped_in_after_bind_is_not_chowned(sticky_dir, victim, swap):
    path = str(sticky_dir / "s.sock")

    def to_link(p: str) -> None:
        os.unlink(p)
        swap(victim, p)

    with SwappingSocket(to_link) as sock, pytest.raises(unixfile.Replaced):
        unixfile.bind(sock, path, OPEN)
    assert _untouched(victim)


def test_another_socket_swapped_in_after_bind_is_left_alone(sticky_dir):
    path = str(sticky_dir / "s.sock")
    theirs = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def to_their_socket(p: str) -> None:
        os.unlink(p)
        theirs.bind(p)
        os.chmod(p, 0o600)

    try:
        with SwappingSocket(to_their_socket) as sock, pytest.raises(unixfile.Replaced):
            unixfile.bind(sock, path, OPEN)
        st = os.lstat(path)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)  # not given to nobody
    finally:
        theirs.close()


def test_the_socket_superd_bound_gets_owner_and_mode(sticky_dir):
    path = str(sticky_dir / "s.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        inode = unixfile.bind(sock, path, OPEN)
        st = os.lstat(path)
        assert (st.st_ino, st.st_uid, stat.S_IMODE(st.st_mode)) == (inode, nobody().pw_uid,
                                                                     0o666)
        ino, dev = unixfile.bound_file(sock)  # type: ignore[misc]
        assert ino == st.st_ino and (dev >> 20, dev & 0xFFFFF) == (os.major(st.st_dev),
                                                                    os.minor(st.st_dev))


def test_without_sock_diag_only_a_root_only_directory_is_trusted(sticky_dir, monkeypatch,
                                                                 tmp_path):
    monkeypatch.setattr(unixfile, "bound_file", lambda sock: None)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock, \
            pytest.raises(unixfile.Replaced):
        unixfile.bind(sock, str(sticky_dir / "s.sock"), OPEN)
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o755)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        unixfile.bind(sock, str(safe / "s.sock"), OPEN)
    assert os.lstat(safe / "s.sock").st_uid == nobody().pw_uid


def test_a_directory_swapped_for_a_symlink_while_being_made_is_not_chmod_ed(
        sticky_dir, monkeypatch):
    """superd makes a/ then opens it without following symlinks: a user who replaced it by a
    link to a directory of root's stops the bind, and that directory keeps its mode."""
    target = sticky_dir / "roots"
    target.mkdir(mode=0o700)
    real_mkdir = os.mkdir

    def mkdir_then_swap(name, mode=0o777, *, dir_fd=None):
        real_mkdir(name, mode, dir_fd=dir_fd)
        os.rmdir(name, dir_fd=dir_fd)
        os.symlink(target, name, dir_fd=dir_fd)

    monkeypatch.setattr(unixfile.os, "mkdir", mkdir_then_swap)
    with pytest.raises(OSError):
        unixfile.make_parents(str(sticky_dir / "a"), 0o777)
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
