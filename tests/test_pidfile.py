"""`superd run --daemon --pidfile PATH` takes over only a pidfile (issue 16, finding 15).

A regular file that is not a pidfile was deleted, a directory gave a traceback. Now anything
at PATH but a pidfile (one process id) is refused with a clear message, before detaching,
and left exactly as it was; nothing starts. (A live pidfile refusing a second start and a
stale one being taken over are tests/test_systemd.py's test_daemon_mode_and_its_pidfile.)
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import superd_testlib as lib
from superd_testlib import PY, REPO, free_port, pid_alive, wait_until


def launch(table: Path, pidfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", "run", "--daemon", "--pidfile", str(pidfile),
                           "-c", str(table)], cwd=REPO, env=lib.daemon_env(),
                          capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)


def snapshot(path: Path) -> tuple:
    st = os.lstat(path)
    content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
    listing = sorted(os.listdir(path)) if path.is_dir() and not path.is_symlink() else None
    return st.st_ino, st.st_mode, content, listing


def stop_what_started(pidfile: Path) -> None:
    """The launcher said it detached (the bug): stop the daemon it left behind."""
    def daemon_pid() -> int | None:
        try:
            text = pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() and pid_alive(int(text)) else None
    pid = wait_until(daemon_pid, 5, "the stray daemon's pidfile")
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_alive(pid), 10, "the stray daemon gone")


@pytest.mark.parametrize("what", ["text-file", "the-table", "empty-file", "big-number",
                                  "directory", "symlink", "fifo", "no-folder"])
def test_pidfile_path_that_is_not_a_pidfile_is_refused_and_kept(tmp_path, what):
    port = free_port()
    table = tmp_path / "superd.yaml"
    table.write_text(f'settings: {{control_socket: {tmp_path}/ctl.sock}}\n'
                     f'services:\n  echo: {{listen: "127.0.0.1:{port}", internal: echo}}\n')
    kept = tmp_path / "notes.txt"
    kept.write_text("my notes\n")
    pidfile = {"text-file": kept, "the-table": table, "empty-file": tmp_path / "empty",
               "big-number": tmp_path / "big", "directory": tmp_path / "dir",
               "symlink": tmp_path / "link", "fifo": tmp_path / "fifo",
               "no-folder": tmp_path / "missing" / "superd.pid"}[what]
    if what == "empty-file":
        pidfile.write_text("")
    elif what == "big-number":
        pidfile.write_text("123456789012\n")
    elif what == "directory":
        pidfile.mkdir()
        (pidfile / "inside").write_text("x\n")
    elif what == "symlink":
        pidfile.symlink_to(kept)
    elif what == "fifo":
        os.mkfifo(pidfile)
    before = snapshot(pidfile) if what != "no-folder" else None
    r = launch(table, pidfile)
    if r.returncode == 0:
        stop_what_started(pidfile)
    assert r.returncode == 1, f"exit {r.returncode}: {r.stderr}"
    assert r.stderr.startswith(f"superd: --pidfile {pidfile}: ") and \
        "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().endswith("nothing was changed"), r.stderr
    if before is not None:
        assert snapshot(pidfile) == before, f"the {what} at the pidfile's path was changed"
    assert kept.read_text() == "my notes\n"
    assert port not in lib.listening_tcp_ports(), "superd started anyway"
