"""Real inetd programs from Debian's packages, under superd, driven by their real clients.

rsync (package rsync) in daemon mode on stdin, git daemon --inetd (package git), and tftpd-hpa's
in.tftpd as a UDP `wait: true` service (packages tftpd-hpa, tftp-hpa). Each test is skipped only
when its program or client is not installed.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from superd_testlib import free_port, wait_until

RSYNC = shutil.which("rsync")
GIT = shutil.which("git")
TFTPD = "/usr/sbin/in.tftpd"
TFTP = shutil.which("tftp")


def run(argv: list[str], cwd: Path, timeout: float = 30) -> str:
    """Run a client; HOME is the test's own folder, so no user config of this machine leaks in."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "LANG": "C",
           "GIT_CONFIG_NOSYSTEM": "1"}
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{argv} exited {r.returncode}:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def make_tree(root: Path, empty_dir: bool = True) -> Path:
    """A small tree with text, binary, nested and empty parts (git keeps no empty folder)."""
    (root / "sub" / "deeper").mkdir(parents=True)
    if empty_dir:
        (root / "empty").mkdir()
    (root / "hello.txt").write_text("hello from superd\n")
    (root / "sub" / "data.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "deeper" / "notes.md").write_text("# notes\n" * 100)
    (root / "zero").write_bytes(b"")
    return root


def same_tree(a: Path, b: Path) -> None:
    """Every file and directory in both, byte for byte."""
    stack = [filecmp.dircmp(a, b)]
    for _ in range(10_000):  # bounded: far more folders than any test tree has
        if not stack:
            return
        c = stack.pop()
        assert not (c.left_only or c.right_only or c.funny_files), (
            c.left, c.left_only, c.right_only, c.funny_files)
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        assert not mismatch and not errors, (c.left, mismatch, errors)
        stack += c.subdirs.values()
    raise AssertionError("tree too deep")


@pytest.mark.skipif(RSYNC is None, reason="rsync is not installed (Debian package rsync)")
def test_rsync_daemon_on_stdin(superd, tmp_path):
    tree = make_tree(tmp_path / "tree")
    conf = tmp_path / "rsyncd.conf"
    conf.write_text(f"use chroot = no\nlog file = {tmp_path / 'rsyncd.log'}\n"
                    f"[mod]\n\tpath = {tree}\n\tread only = yes\n\tuid = 0\n\tgid = 0\n")
    port = free_port()
    d = superd({"rsync": {"listen": f"127.0.0.1:{port}", "exec": [
        "rsync", "--daemon", f"--config={conf}"], "program": RSYNC}})
    listing = run([RSYNC, f"rsync://127.0.0.1:{port}/"], cwd=tmp_path)
    assert "mod" in listing
    dest = tmp_path / "dest"
    run([RSYNC, "-a", f"rsync://127.0.0.1:{port}/mod/", str(dest)], cwd=tmp_path)
    same_tree(tree, dest)
    exits = d.wait_exit("rsync", count=2)
    # rsync itself exits 255 after a module listing (it does under any inetd); the copy is 0
    assert [m["status"] for m in exits] == ["255", "0"], d.lines()


@pytest.mark.skipif(GIT is None, reason="git is not installed (Debian package git)")
def test_git_daemon_inetd_clone(superd, tmp_path):
    work = tmp_path / "work"
    run([GIT, "init", "-q", "-b", "main", str(work)], cwd=tmp_path)
    make_tree(work / "files", empty_dir=False)
    run([GIT, "add", "-A"], cwd=work)
    run([GIT, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-q", "-m",
         "first"], cwd=work)
    base = tmp_path / "srv"
    base.mkdir()
    run([GIT, "clone", "-q", "--bare", str(work), str(base / "repo.git")], cwd=tmp_path)
    port = free_port()
    d = superd({"git": {"listen": f"127.0.0.1:{port}", "exec": [
        "git", "daemon", "--inetd", "--export-all", f"--base-path={base}", str(base)],
        "program": GIT}})
    clone = tmp_path / "clone"
    run([GIT, "clone", "-q", f"git://127.0.0.1:{port}/repo.git", str(clone)], cwd=tmp_path)
    same_tree(work / "files", clone / "files")
    head = run([GIT, "rev-parse", "HEAD"], cwd=work)
    assert run([GIT, "rev-parse", "HEAD"], cwd=clone) == head
    d.wait_exit("git")


@pytest.mark.skipif(not os.path.exists(TFTPD) or TFTP is None,
                    reason="in.tftpd or tftp is not installed (Debian tftpd-hpa, tftp-hpa)")
def test_tftpd_as_udp_wait_service(superd, tmp_path):
    """Three gets in a row from one wait-mode handler; after it times out, a new one."""
    root = tmp_path / "tftp"
    root.mkdir()
    root.chmod(0o755)  # in.tftpd drops to nobody after chroot
    data = os.urandom(200_000)
    (root / "boot.img").write_bytes(data)
    (root / "boot.img").chmod(0o644)
    port = free_port()
    # -t 1: the server waits one second for more requests before it exits (inetd mode)
    d = superd({"tftp": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True,
                         "exec": ["in.tftpd", "-t", "1", "-s", str(root)], "program": TFTPD}})
    got = tmp_path / "got"
    got.mkdir()
    for i in range(3):
        run([TFTP, "-m", "binary", "127.0.0.1", str(port), "-c", "get", "boot.img",
             f"copy{i}"], cwd=got)
        assert (got / f"copy{i}").read_bytes() == data, f"get {i + 1} differs"
    first = d.wait_exit("tftp", timeout=10)[0]
    assert first["status"] == "0"
    run([TFTP, "-m", "binary", "127.0.0.1", str(port), "-c", "get", "boot.img", "again"],
        cwd=got)
    assert (got / "again").read_bytes() == data
    d.wait_exit("tftp", count=2, timeout=10)
    starts = d.starts("tftp")
    assert len(starts) == 2 and starts[0]["pid"] != starts[1]["pid"]
    # wait mode: superd never ran two handlers on the socket at once
    order = [line.split(":")[0] for line in d.lines() if line.startswith(("START: tftp",
                                                                          "EXIT: tftp"))]
    assert order == ["START", "EXIT", "START", "EXIT"], order
    wait_until(lambda: not d.handlers(), 5, "no handler left")
