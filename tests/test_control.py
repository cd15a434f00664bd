"""The control socket's path: nobody can answer in superd's place, nothing but a socket of
superd's is ever removed (issue 16, finding 9).

- The socket's folder is private: made 0700 if missing, refused if others could write to it
  (sticky or not), and then nothing in it is touched.
- What is at the path already is removed only when it is a socket of superd's user that
  nobody answers on (a crash's leftover); a file, a FIFO, a symlink, a live socket stay.
- `superd status|reload|stop` talk only to a process of root or of the user running them
  (SO_PEERCRED), and say so clearly when they refuse.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import reliability_lib as rl
import yaml
from superd_testlib import PY, REPO, daemon_env, free_port, tcp_exchange, wait_until

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", *args], cwd=REPO, env=daemon_env(),
                          capture_output=True, text=True, timeout=timeout)


def echo(port: int) -> dict:
    return {"listen": f"127.0.0.1:{port}", "internal": "echo"}


def echoes(port: int) -> bool:
    return tcp_exchange("127.0.0.1", port, b"ok\n", expect_len=3) == b"ok\n"


def shared_tmp(mode: int = 0o1777) -> Path:
    """A fresh folder like /tmp: root's, sticky, anyone may write."""
    path = Path(tempfile.mkdtemp(prefix="superd-ctlw-", dir="/tmp"))
    path.chmod(mode)
    return path


SQUATTER = r'''
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(sys.argv[1])
os.chmod(sys.argv[1], 0o666)
s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.recv(256)
        c.sendall(json.dumps({"pid": 1, "children": 0, "table": "fake",
                              "services": {}}).encode() + b"\n")
    except OSError:
        pass
    c.close()
'''


def squat(path: Path) -> subprocess.Popen:
    """As nobody: listen at `path` and answer every command as if all went well."""
    proc = subprocess.Popen(["/usr/bin/python3", "-c", SQUATTER, str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=rl.as_user(rl.nobody()), start_new_session=True)
    line = proc.stdout.readline()
    assert line == "ready\n", proc.stderr.read()
    return proc


def end(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(5)


@needs_root
def test_a_squatted_control_socket_is_refused_by_the_command_line(new_daemon):
    """nobody got to the control socket's path first (the old example table put it straight
    in /tmp): superd refuses the folder and says why; `superd stop` refuses nobody's answer
    instead of printing success while superd keeps running."""
    folder = shared_tmp()
    squatter = None
    try:
        ctl = folder / "ctl.sock"
        squatter = squat(ctl)
        port = free_port()
        d = new_daemon().start({"echo": echo(port)}, settings={"control_socket": str(ctl)})
        d.wait_log(rf"control socket {ctl}: its folder {folder} is not private \(writable by "
                   "someone other than root")
        for command in ("stop", "status", "reload"):
            r = cli(command, "-c", str(d.table))
            assert r.returncode == 1, f"superd {command} believed nobody: {r.stdout}{r.stderr}"
            assert f"refusing {ctl}: it is answered by uid {rl.nobody().pw_uid}" in r.stderr, \
                r.stderr
            assert "Traceback" not in r.stderr
        assert d.proc.poll() is None and echoes(port)
        assert squatter.poll() is None and stat.S_ISSOCK(os.lstat(ctl).st_mode), \
            "superd removed another user's socket"
    finally:
        if squatter is not None:
            end(squatter)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("what", ["the-table", "regular-file", "fifo", "symlink", "directory"])
def test_what_is_not_a_socket_at_the_path_is_left_alone(new_daemon, what):
    """control_socket pointed at the table itself deleted the table; now superd says what is
    there and touches nothing (the daemon still serves; only its control socket is missing)."""
    d = new_daemon()
    port = free_port()
    other = d.workdir / "other"
    other.write_text("keep me\n")
    target = {"the-table": d.table, "regular-file": other, "fifo": d.workdir / "fifo",
              "symlink": d.workdir / "link", "directory": d.workdir / "dir"}[what]
    if what == "fifo":
        os.mkfifo(target)
    elif what == "symlink":
        target.symlink_to(other)
    elif what == "directory":
        target.mkdir()
        (target / "inside").write_text("keep\n")
    d.start({"echo": echo(port)}, settings={"control_socket": str(target)})
    text = d.table.read_text()
    before = os.lstat(target)
    d.wait_log(rf"control socket {target}: {target} exists and is not a socket; superd "
               "leaves it alone")
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
    assert d.table.read_text() == text and other.read_text() == "keep me\n"
    assert echoes(port)
    r = cli("status", "-c", str(d.table))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_a_crash_leftover_socket_is_replaced(new_daemon):
    """A socket file of ours that nobody answers on (superd was SIGKILLed) is taken over."""
    d = new_daemon()
    left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    left.bind(str(d.ctl))
    left.close()
    d.start({"echo": echo(free_port())})
    r = cli("status", "-c", str(d.table))
    assert r.returncode == 0, r.stderr


def test_a_live_control_socket_is_not_taken_over(new_daemon):
    """A second superd with the same control socket leaves the first one's alone."""
    first = new_daemon().start({"echo": echo(free_port())})
    second = new_daemon()
    second.start({"echo": echo(free_port())}, settings={"control_socket": str(first.ctl)})
    second.wait_log(rf"control socket {first.ctl}: another superd is answering")
    r = cli("status", "--json", "-c", str(first.table))
    assert r.returncode == 0 and yaml.safe_load(r.stdout)["pid"] == first.pid, r.stderr


def test_a_missing_folder_is_made_private(new_daemon):
    d = new_daemon()
    ctl = d.workdir / "run" / "superd" / "control.sock"
    d.start({"echo": echo(free_port())}, settings={"control_socket": str(ctl)})
    assert stat.S_IMODE(os.stat(ctl.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    assert cli("status", "-c", str(d.table)).returncode == 0


@needs_root
@pytest.mark.parametrize("how", ["sticky-1777", "world-0777", "group-0775", "nobodys"])
def test_a_folder_others_may_write_to_is_refused(new_daemon, how):
    mode = {"sticky-1777": 0o1777, "world-0777": 0o777, "group-0775": 0o775,
            "nobodys": 0o755}[how]
    folder = shared_tmp(mode)
    try:
        if how == "nobodys":
            os.chown(folder, rl.nobody().pw_uid, rl.nobody().pw_gid)
        ctl = folder / "ctl.sock"
        left = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        left.bind(str(ctl))  # looks like a crash's leftover: not removed from such a folder
        left.close()
        port = free_port()
        d = new_daemon().start({"echo": echo(port)}, settings={"control_socket": str(ctl)})
        d.wait_log(rf"control socket {ctl}: its folder {folder} is not private \(.*\): "
                   "whoever can write there could answer in superd's place; use a private "
                   "folder")
        assert stat.S_ISSOCK(os.lstat(ctl).st_mode), "removed something in a shared folder"
        assert echoes(port)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_the_example_table_keeps_its_control_socket_private():
    settings = yaml.safe_load((REPO / "config" / "superd.yaml").read_text())["settings"]
    folder = os.path.dirname(settings["control_socket"])
    assert folder not in ("/tmp", "/var/tmp", "/dev/shm"), folder
    if os.path.isdir(folder):  # made by an earlier run: private
        assert not os.stat(folder).st_mode & 0o022


@needs_root
def test_the_control_socket_moves_only_to_a_private_folder(superd):
    """A reload that moves control_socket to a shared folder keeps the old one answering."""
    folder = shared_tmp()
    try:
        d = superd({"echo": echo(free_port())})
        d.reload({"echo": echo(free_port())},
                 settings={"control_socket": str(folder / "c.sock")})
        d.wait_log(rf"control socket {folder}/c.sock: its folder .* still answering on {d.ctl}")
        wait_until(lambda: d.ctl.exists(), 5, "the old control socket")
        assert not (folder / "c.sock").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
