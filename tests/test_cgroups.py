"""A cgroup per handler (issue 16, finding 12): `timeout`, max_children and a stop reach
everything a handler started, however it forked and whichever session it made.

The daemon as a subprocess, real handlers that leave processes behind in three ways, and the
real cgroup v2 tree: what `superd status` says, which processes live, which directories stay.
Where cgroups are off (`cgroups: no`, or no writable cgroup v2), the subreaper view does what
it can, and that is pinned too.
"""

from __future__ import annotations

import array
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
import reliability_lib as rl
import superd_testlib as lib
from superd_testlib import free_port, write_script

sys.path.insert(0, str(lib.REPO))
from superd import cgroups, spawnproto  # noqa: E402

HERE = cgroups.decide("auto")  # what this machine allows superd (root, a writable cgroup v2)
needs_cgroups = pytest.mark.skipif(not HERE.own, reason=f"cgroups {HERE.reason}")
MODES = [pytest.param("auto", marks=needs_cgroups, id="cgroups"),
         pytest.param("no", id="subreaper")]


def _escaping_handler(path) -> str:
    """A handler that leaves a `sleep` behind in three ways and then waits: a child in a new
    session, a double-forked grandchild in its own session, one in the handler's session."""
    return str(write_script(path, """#!/bin/sh
setsid sleep 300 </dev/null >/dev/null 2>&1 &
(setsid sleep 301 </dev/null >/dev/null 2>&1 &)
(sleep 302 </dev/null >/dev/null 2>&1 &)
echo started
exec sleep 303
"""))


def _sleeps(d: lib.Superd) -> list[int]:
    """The sleep processes left by _escaping_handler that still live (in superd's tree)."""
    return [p for p in lib.descendants(d.pid)
            if rl.cmdline(p).startswith("sleep 30") and lib.pid_alive(p)]


def _base(pid: int) -> str:
    """superd's own cgroups: superd-PID-TICKS (its pid and start time)."""
    return cgroups.base_of(HERE.own, pid, lib.start_ticks(pid) or 0)


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return next(line[3:].strip() for line in f if line.startswith("0::"))


def _second_then_refused(d: lib.Superd, port: int, counted: int) -> tuple[socket.socket, ...]:
    """A second connection, `counted` processes then, and a third over max_children."""
    c2 = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert c2.recv(8) == b"started\n"
    lib.wait_until(lambda: lib.status(d)["children"] == counted, 5, "what they left counted")
    c3 = socket.create_connection(("127.0.0.1", port), timeout=5)
    c3.settimeout(5)
    assert c3.recv(8) == b""
    d.wait_log(r"^FAIL: esc process_limit from=127\.0\.0\.1$")
    return c2, c3


def _line(c: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n") and (chunk := c.recv(256)):
        data += chunk
    return data.decode().strip()


def _status_line(d: lib.Superd) -> str:
    r = subprocess.run([lib.PY, "-m", "superd", "status", "-c", str(d.table)], cwd=lib.REPO,
                       env=lib.daemon_env(), capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return next(line for line in r.stdout.splitlines() if line.startswith("cgroups: "))


@pytest.mark.parametrize("mode", MODES)
def test_stop_ends_what_handlers_left_behind(new_daemon, tmp_path, mode):
    """Processes that left the handler's process group survived `superd stop`. Now a stop
    ends everything a handler started, whatever group or session it is in."""
    port = free_port()
    d = new_daemon()
    d.start({"esc": {"listen": f"127.0.0.1:{port}", "exec": [_escaping_handler(
        tmp_path / "esc")]}}, settings={"cgroups": mode})
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    for c in clients:
        assert c.recv(8) == b"started\n"
    lib.wait_until(lambda: len(_sleeps(d)) == 12, 5, "12 sleeps")
    left = _sleeps(d)
    # In cgroups, all four processes of each handler count; in the subreaper view the
    # handler and the two that became superd's children (the third is the handler's child).
    counted = 12 if mode == "auto" else 9
    lib.wait_until(lambda: lib.status(d)["children"] == counted, 5, "the left ones counted")
    assert d.stop() == 0
    survivors = [p for p in left if lib.pid_alive(p)]
    for c in clients:
        c.close()
    for p in survivors:
        os.kill(p, signal.SIGKILL)  # ours: clean up what the test made
    assert not survivors, f"{len(survivors)} of {len(left)} left behind survived superd stop"
    if mode == "auto":
        assert not os.path.exists(_base(d.pid)), "superd's cgroups outlived it"


@needs_cgroups
def test_timeout_ends_everything_a_handler_started(new_daemon, tmp_path):
    """`timeout` reached only the handler's process group and session, and max_children
    did not count what a handler left (3 counted while 38 ran). In its cgroup, nothing a
    handler starts gets away: all of it counts, and all of it ends at the timeout."""
    port = free_port()
    d = new_daemon()
    d.start({"esc": {"listen": f"127.0.0.1:{port}", "timeout": 3,
                     "exec": [_escaping_handler(tmp_path / "esc")]}},
            settings={"max_children": 6})
    assert lib.status(d)["cgroups"] == f"on, in {HERE.own}"
    assert _status_line(d) == f"cgroups: on, in {HERE.own}"
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert c.recv(8) == b"started\n"
    lib.wait_until(lambda: len(_sleeps(d)) == 4, 5, "4 sleeps")
    first = _sleeps(d)
    where = {_cgroup_of(p) for p in first}
    assert len(where) == 1 and re.search(rf"/superd-{d.pid}-\d+/h\d+$", where.pop()), \
        "the handler and all it started share one cgroup of superd's"
    lib.wait_until(lambda: lib.status(d)["children"] == 4, 5, "what it started counted")
    c2, c3 = _second_then_refused(d, port, 8)  # 4 < 6: the second is admitted
    lib.wait_until(lambda: not _sleeps(d), 10, "the timeouts done: nothing left")
    lib.wait_until(lambda: lib.status(d)["children"] == 0, 5, "nothing counted")
    for s in (c, c2, c3):
        s.close()
    # The cgroups are empty, kept for the next handlers.
    kept = [n for n in os.listdir(_base(d.pid)) if n.startswith("h")]
    assert kept and all(not cgroups.procs(os.path.join(_base(d.pid), n)) for n in kept)


def test_without_cgroups_timeout_reaches_the_handlers_session(new_daemon, tmp_path):
    """`cgroups: no`: the subreaper view. The timeout ends each handler and what it left in
    its session, but for the double-forked daemon that made a session of its own: nothing
    ties it to its handler. It is counted, and a stop ends it."""
    port = free_port()
    d = new_daemon()
    d.start({"esc": {"listen": f"127.0.0.1:{port}", "timeout": 3,
                     "exec": [_escaping_handler(tmp_path / "esc")]}},
            settings={"max_children": 6, "cgroups": False})  # YAML's `no`
    assert lib.status(d)["cgroups"] == "off (settings: cgroups: no)"
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    assert c.recv(8) == b"started\n"
    lib.wait_until(lambda: len(_sleeps(d)) == 4, 5, "4 sleeps")
    # The handler and the two it left to superd (the third is still its own child).
    lib.wait_until(lambda: lib.status(d)["children"] == 3, 5, "what it left counted")
    c2, c3 = _second_then_refused(d, port, 6)
    lib.wait_until(lambda: sorted(rl.cmdline(p) for p in _sleeps(d)) ==
                   ["sleep 301", "sleep 301"], 10, "the timeouts done")
    assert lib.status(d)["children"] == 2
    for s in (c, c2, c3):
        s.close()


PY_HANDLER = '''
import os, sys, time

def run(sock, env):
    with open("/proc/self/cgroup") as f:
        sock.sendall(f.read().encode())
    if os.fork() == 0:           # a double-forked daemon in a session of its own
        os.setsid()
        if os.fork() == 0:
            os.execvp("sleep", ["sleep", "304"])
        os._exit(0)
    time.sleep(300)
'''


@needs_cgroups
def test_python_handlers_and_what_they_fork_are_in_their_cgroup(new_daemon):
    """A python handler is forked by its host (superd/pyhost.py), not by a spawner: it is
    put in its cgroup too, before its code runs, and its timeout ends what it forked."""
    port = free_port()
    d = new_daemon()
    (d.table.parent / "esc.py").write_text(PY_HANDLER)
    d.start({"pyesc": {"listen": f"127.0.0.1:{port}", "python": "esc.py:run",
                       "timeout": 2}})
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        line = lib.recv_until_eof(c, 10).decode()
    assert re.search(rf"^0::/.*superd-{d.pid}-\d+/h\d+$", line, re.M), line
    d.wait_log(r"^EXIT: pyesc signal=15 pid=\d+")
    lib.wait_until(lambda: not [p for p in lib.descendants(d.pid)
                                if rl.cmdline(p) == "sleep 304"], 10, "sleep 304 ended")


@needs_cgroups
def test_spawners_go_back_to_superds_cgroup(new_daemon, tmp_path):
    """A spawner moves itself into the handler's cgroup to fork it, then back: it must
    never be counted as, or die with, a handler."""
    port = free_port()
    d = new_daemon()
    script = write_script(tmp_path / "where", "#!/bin/sh\ngrep ^0:: /proc/self/cgroup\n")
    d.start({"where": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}})
    seen = set()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            seen.add(lib.recv_until_eof(c, 5).decode().strip())
    assert all(re.match(rf"^0::/.*superd-{d.pid}-\d+/h\d+$", s) for s in seen), seen
    spawners = rl.helpers(d)
    assert spawners
    assert {_cgroup_of(p) for p in spawners} == {_cgroup_of(d.pid)}


@needs_cgroups
def test_cgroups_a_dead_superd_left_are_removed(new_daemon):
    """A superd killed outright leaves its cgroup directories: the next one removes those
    that are empty, and leaves alone one that still holds a process (a handler that runs
    on), and those of a superd that still runs: the same pid with the same start time (a
    pid alone could be another process's by now)."""
    me = os.getpid()
    stale = os.path.join(HERE.own, f"superd-{me}-1")  # this pid, but not this start time
    busy = os.path.join(HERE.own, f"superd-{me}-2")
    live = os.path.join(HERE.own, f"superd-{me}-{lib.start_ticks(me)}")
    for path in (stale, busy, live):
        os.makedirs(os.path.join(path, "h1"), exist_ok=True)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        with open(os.path.join(busy, "h1", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))  # (the test moves its sleep, as superd its handler)
        d = new_daemon()
        d.start({})
        assert not os.path.exists(stale)
        assert os.path.exists(os.path.join(busy, "h1"))
        assert os.path.exists(os.path.join(live, "h1"))
        assert oct(os.stat(_base(d.pid)).st_mode & 0o7777) == "0o755"
    finally:
        sleeper.kill()
        sleeper.wait()
        for path in (busy, stale, live):
            for sub in ("h1", ""):
                try:
                    os.rmdir(os.path.join(path, sub))
                except OSError:
                    pass


def _leaver(path) -> str:
    """A handler that double-forks a daemon and exits at once."""
    return str(write_script(path, """#!/bin/sh
(setsid sleep 305 </dev/null >/dev/null 2>&1 &)
echo left
"""))


def _upgrade(d: lib.Superd) -> None:
    r = subprocess.run([lib.PY, "-m", "superd", "upgrade", "-c", str(d.table)], cwd=lib.REPO,
                       env=lib.daemon_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d.wait_log(rf"^upgraded: pid {d.pid}, ")


@needs_cgroups
def test_an_upgrade_keeps_every_cgroup_and_what_it_holds(new_daemon, tmp_path):
    """Over `superd upgrade` (the same pid, a new program), a running handler's cgroup and
    a cgroup whose handler exited with a daemon left in it are still watched: counted,
    ended at the timeout or at the stop."""
    pe, pl = free_port(), free_port()
    d = new_daemon()
    d.start({"esc": {"listen": f"127.0.0.1:{pe}", "timeout": 6,
                     "exec": [_escaping_handler(tmp_path / "esc")]},
             "leave": {"listen": f"127.0.0.1:{pl}", "exec": [_leaver(tmp_path / "leave")]}})
    c = socket.create_connection(("127.0.0.1", pe), timeout=5)
    assert c.recv(8) == b"started\n"
    with socket.create_connection(("127.0.0.1", pl), timeout=5) as c2:
        assert lib.recv_until_eof(c2, 5) == b"left\n"
    d.wait_log(r"^EXIT: leave status=0 ")
    # 4 of esc's, and the daemon in leave's lingering cgroup.
    lib.wait_until(lambda: lib.status(d)["children"] == 5, 5, "all five counted")
    _upgrade(d)
    lib.wait_until(lambda: lib.status(d)["children"] == 5, 5, "all five counted after")
    lib.wait_until(lambda: [rl.cmdline(p) for p in _sleeps(d)] == ["sleep 305"], 10,
                   "esc's timeout ended all four of its processes")
    c.close()
    daemon = _sleeps(d)
    lib.wait_until(lambda: lib.status(d)["children"] == 1, 5, "the lingering daemon counted")
    assert d.stop() == 0
    assert not lib.pid_alive(daemon[0]), "the stop ended the lingering daemon"
    assert not os.path.exists(_base(d.pid))


@needs_cgroups
def test_a_reload_turns_cgroups_on_and_off(new_daemon, tmp_path):
    """`cgroups` is read at each reload: new handlers follow it; the ones running keep
    where they are."""
    port = free_port()
    d = new_daemon()
    script = write_script(tmp_path / "where", "#!/bin/sh\ngrep ^0:: /proc/self/cgroup\n")
    services = {"where": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}}
    d.start(services, settings={"cgroups": "no"})

    def where() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return lib.recv_until_eof(c, 5).decode().strip()
    assert where() == "0::" + _cgroup_of(d.pid)
    d.reload(services, settings={"cgroups": "auto"})
    assert lib.status(d)["cgroups"] == f"on, in {HERE.own}"
    assert re.match(rf"^0::/.*superd-{d.pid}-\d+/h\d+$", where())
    d.reload(services, settings={"cgroups": "no"})
    assert where() == "0::" + _cgroup_of(d.pid)


@needs_cgroups
def test_cgroups_are_roots_whatever_the_umask_and_survive_meddling(new_daemon, tmp_path):
    """Started with umask 0, superd's cgroup directories were world-writable: a `nobody`
    handler could make cgroups of its own in there. And what root does in there (a pooled
    cgroup removed, a directory named h² that int() cannot read) must not fail the next
    handler, nor an upgrade."""
    port = free_port()
    d = new_daemon()
    script = write_script(tmp_path / "where", "#!/bin/sh\ngrep ^0:: /proc/self/cgroup\n")
    d.start({"where": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}},
            prefix=["sh", "-c", 'umask 0; exec "$@"', "sh"])

    def where() -> str:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return lib.recv_until_eof(c, 5).decode().strip()
    first = where()
    assert re.match(rf"^0::/.*superd-{d.pid}-\d+/h\d+$", first), first
    base = _base(d.pid)
    mine = os.path.join(base, os.path.basename(first))
    for path in (base, mine):
        assert oct(os.stat(path).st_mode & 0o7777) == "0o755", path
    lib.wait_until(lambda: cgroups.procs(mine) == [], 5, "the handler gone from it")
    d.wait_log(r"^EXIT: where status=0 ")
    os.rmdir(mine)  # pooled, and gone
    os.mkdir(os.path.join(base, "h\u00b2"))
    try:
        again = where()
        assert again == first  # handed out unlooked-at, and made again by the spawner
        assert oct(os.stat(mine).st_mode & 0o7777) == "0o755"
        _upgrade(d)
        assert re.match(rf"^0::/.*superd-{d.pid}-\d+/h\d+$", where())
    finally:
        os.rmdir(os.path.join(base, "h\u00b2"))


@needs_cgroups
def test_a_bursts_cgroups_are_reused_and_then_let_go(new_daemon, tmp_path):
    """Beyond 64 handlers at once, each handler's cgroup was made for it and removed after
    it (an mkdir and an rmdir in the loop, 120 us, for every connection of a burst). Now a
    second burst reuses the first one's cgroups, and when the bursts stop the empty ones go
    back down to 64, TRIM each survey round."""
    port = free_port()
    n = cgroups.POOL + 3 * cgroups.TRIM
    d = new_daemon()
    script = write_script(tmp_path / "hold",
                          "#!/bin/sh\ngrep ^0:: /proc/self/cgroup\nexec cat >/dev/null\n")
    d.start({"hold": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}},
            settings={"max_children": 2 * n})

    def burst() -> set[str]:
        conns = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(n)]
        try:
            where = {_line(c) for c in conns}
        finally:
            for c in conns:
                c.close()
        lib.wait_until(lambda: lib.status(d)["running"] == 0, 20, "the burst's handlers gone")
        return where
    first = burst()
    assert len(first) == n
    second = burst()
    assert len(second - first) <= 2 * cgroups.TRIM, "the first burst's cgroups were removed"

    def empty() -> list[str]:
        return [x for x in os.listdir(_base(d.pid)) if x.startswith("h")]
    assert len(empty()) > cgroups.POOL
    lib.wait_until(lambda: len(empty()) == cgroups.POOL, 20, "the unused cgroups removed")


@needs_cgroups
def test_a_spawner_forks_a_handler_without_a_cgroup_at_home(tmp_path):
    """A spawner goes home only before its replies go out, so a request without a cgroup
    (after a reload to `cgroups: no`, or when none could be made) that came right after one
    with a cgroup was forked in that handler's cgroup: counted with it, killed at its
    timeout. The real spawner, two requests back to back (one stretch)."""
    scratch = os.path.join(HERE.own, f"spawner-test-{os.getpid()}")
    os.makedirs(os.path.join(scratch, "h1"))
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    spawner = subprocess.Popen([sys.executable, "-S", "-E", "-s",
                                str(lib.REPO / "superd" / "spawner.py"), str(theirs.fileno())],
                               pass_fds=(theirs.fileno(),))
    theirs.close()
    conns = []
    started: dict[int, int] = {}
    try:
        for token, where in ((1, os.path.join(scratch, "h1")), (2, "")):
            a, b = socket.socketpair()
            conns += [a, b]
            request = spawnproto.Request(token, "null", (b"/bin/sleep", b"30"), (b"/bin/sleep",),
                                         [], "/", None, None, None, -1, where)
            ours.sendmsg([spawnproto.encode_request(request)],
                         [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [a.fileno()]).tobytes())])
        ours.settimeout(10)
        while len(started) < 2:
            for reply in spawnproto.decode_replies(ours.recv(spawnproto.MAX_REPLY)):
                if isinstance(reply, spawnproto.Started):
                    assert reply.pid, reply.failure
                    started[reply.token] = reply.pid
        home = _cgroup_of(os.getpid())
        assert _cgroup_of(started[1]).endswith(f"/spawner-test-{os.getpid()}/h1")
        assert _cgroup_of(started[2]) == home
        assert _cgroup_of(spawner.pid) == home
    finally:
        for pid in started.values():
            os.kill(pid, signal.SIGKILL)  # (the spawner's children: it reaps them)
        ours.close()
        spawner.wait(10)
        for c in conns:
            c.close()
        lib.wait_until(lambda: cgroups.procs(os.path.join(scratch, "h1")) == [], 5, "h1 empty")
        os.rmdir(os.path.join(scratch, "h1"))
        os.rmdir(scratch)


@needs_cgroups
def test_cgroups_root_removed_altogether_are_made_again(new_daemon, tmp_path):
    """Pooled cgroups are handed out unlooked-at; with superd's whole tree removed (every
    hN, then superd-PID-TICKS), each was refused in turn, up to the whole pool."""
    port = free_port()
    d = new_daemon()
    script = write_script(tmp_path / "where",
                          "#!/bin/sh\ngrep ^0:: /proc/self/cgroup\nexec cat >/dev/null\n")
    d.start({"where": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}})
    conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    first = {_line(c) for c in conns}
    for c in conns:
        c.close()
    lib.wait_until(lambda: lib.status(d)["running"] == 0, 10, "the handlers gone")
    base = _base(d.pid)
    lib.wait_until(lambda: all(cgroups.procs(os.path.join(base, n)) == []
                               for n in os.listdir(base) if n.startswith("h")), 5, "empty")
    for name in os.listdir(base):
        if name.startswith("h"):
            os.rmdir(os.path.join(base, name))
    os.rmdir(base)
    again = []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            again.append(_line(c))
    assert set(again) <= first, again
    assert oct(os.stat(base).st_mode & 0o7777) == "0o755"


@needs_cgroups
def test_an_upgrade_to_cgroups_no_still_removes_them_at_the_end(new_daemon, tmp_path):
    """Upgraded to a table with `cgroups: no` while no handler ran, superd forgot its
    pooled cgroups: they stayed in the tree after it exited."""
    port = free_port()
    d = new_daemon()
    services = {"true": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/true"]}}
    d.start(services)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        lib.recv_until_eof(c, 5)
    d.wait_log(r"^EXIT: true status=0 ")
    base = _base(d.pid)
    assert [n for n in os.listdir(base) if n.startswith("h")]
    d.write_table(services, settings={"cgroups": "no"})
    _upgrade(d)
    assert lib.status(d)["cgroups"] == "off (settings: cgroups: no)"
    assert d.stop() == 0
    assert not os.path.exists(base)
