"""superd run as another user than root (issue 12, point 6): what it cannot switch to or bind
is refused when the table is read, naming the capability it lacks, while the rest serves.

superd runs under setpriv as nobody, as systemd's User= runs it: a service with `user: root`
would fail every connection with a bare "Operation not permitted"; it is refused at load, in
`superd status`, in the log with FILE:LINE, and by `superd check` (exit 1). With
cap_net_bind_service given as an ambient capability (AmbientCapabilities=), a privileged port
binds while `user:` services are still refused.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import reliability_lib as rl
import superd_testlib as lib
from superd_testlib import PY, REPO, daemon_env, free_port, tcp_exchange

from superd import config

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                                reason="needs root and setpriv")
AS_NOBODY = ["setpriv", f"--reuid={rl.nobody().pw_uid}", f"--regid={rl.nobody().pw_gid}",
             "--clear-groups"]
BIND_CAP = ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]


@pytest.fixture(scope="module")
def runnable() -> Iterator[tuple[str, Path]]:
    """The interpreter and source folder nobody can run superd from: this checkout's, or, in a
    checkout nobody may enter (a clone in a `mktemp -d` folder, 0700), a copy of the package
    in a world-readable folder, run by the interpreter the venv was made from (superd's
    dependencies are Debian's, .ci/setup)."""
    probe = subprocess.run([*AS_NOBODY, PY, "-c", "import superd"], cwd=REPO,
                           capture_output=True)
    if probe.returncode == 0:
        yield PY, REPO
        return
    folder = rl.world_dir("superd-nonroot-src-")
    try:
        shutil.copytree(REPO / "superd", folder / "superd",
                        ignore=shutil.ignore_patterns("__pycache__"))
        yield getattr(sys, "_base_executable", PY), folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def daemon(request, prefix: list[str]) -> lib.Superd:
    """A superd whose folder nobody may use: its table, and a private folder of nobody's for
    the control socket (tmp_path is root's, 0700)."""
    folder = rl.world_dir("superd-nonroot-")
    python, source = request.getfixturevalue("runnable")
    d = lib.Superd(folder / "d", None, request.node.nodeid, prefix=[*prefix, "--"],
                   python=python, source=source)
    d.workdir.chmod(0o755)
    run = d.workdir / "run"
    run.mkdir(mode=0o700)
    os.chown(run, rl.nobody().pw_uid, rl.nobody().pw_gid)
    d.ctl = run / "ctl.sock"
    request.addfinalizer(lambda: (d.finish(), shutil.rmtree(folder, ignore_errors=True)))
    return d


def start(d: lib.Superd, services: dict, **kw) -> None:
    old = os.umask(0)  # the notify socket, bound here by root, must take nobody's READY=1
    try:
        d.start(services, settings={"control_socket": str(d.ctl)}, wait_ready=False, **kw)
    finally:
        os.umask(old)
    d.wait_notify("READY=1", 0, 15)


def as_root(port: int) -> dict:
    return {"listen": f"127.0.0.1:{port}", "exec": ["/bin/echo", "hi"], "user": "root"}


def echoes(port: int) -> bool:
    return tcp_exchange("127.0.0.1", port, b"ok\n", expect_len=3) == b"ok\n"


@needs_root
def test_a_user_superd_cannot_become_is_refused_at_load_the_rest_serves(request):
    d = daemon(request, AS_NOBODY)
    pr, pe, pm = free_port(), free_port(), free_port()
    start(d, {"asroot": as_root(pr), "plain": {"listen": f"127.0.0.1:{pe}", "internal": "echo"},
              "mine": {"listen": f"127.0.0.1:{pm}", "exec": ["/usr/bin/id", "-u"],
                       "user": "nobody"}})  # superd's own user: nothing to switch
    assert echoes(pe)
    assert tcp_exchange("127.0.0.1", pm, b"") == f"{rl.nobody().pw_uid}\n".encode()
    failed = d.control()["failed"]
    assert "asroot" in failed, failed
    reason = failed["asroot"]["reason"]
    assert "cap_setuid" in reason and f"uid {rl.nobody().pw_uid}" in reason, reason
    d.wait_log(rf"table problem: {d.table}:\d+: services\.asroot\.user: superd runs as uid "
               r"\d+ .*without cap_setgid and cap_setuid: it cannot switch to uid 0")
    d.wait_log(rf"asroot: not started: services\.asroot\.user: .*cap_setuid.* \({d.table}:\d+\)"
               "; until the table is fixed")
    with socket.socket() as s:  # nothing listens for it: no connection fails one by one
        assert s.connect_ex(("127.0.0.1", pr)) != 0
    r = subprocess.run([*AS_NOBODY, d.python, "-m", "superd", "check", "-c", str(d.table)],
                       cwd=d.source, env=daemon_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "services.asroot.user" in r.stdout + r.stderr and "cap_setuid" in r.stdout + r.stderr


@needs_root
def test_with_cap_net_bind_service_a_privileged_port_binds_user_switches_still_refused(request):
    probe = subprocess.run([*AS_NOBODY, *BIND_CAP, "/bin/true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot give ambient capabilities here: {probe.stderr!r}")
    low = lib.free_low_udp_port()  # also free for TCP? checked by the bind below
    d = daemon(request, [*AS_NOBODY, *BIND_CAP])
    pr = free_port()
    start(d, {"asroot": as_root(pr), "low": {"listen": f"127.0.0.1:{low}", "internal": "echo"}})
    assert echoes(low)
    reason = d.control()["failed"]["asroot"]["reason"]
    assert "cap_setuid" in reason, reason


@needs_root
def test_without_it_a_privileged_port_names_the_capability(request):
    d = daemon(request, AS_NOBODY)
    low, pe = lib.free_low_udp_port(), free_port()
    start(d, {"low": {"listen": f"127.0.0.1:{low}", "internal": "echo"},
              "plain": {"listen": f"127.0.0.1:{pe}", "internal": "echo"}})
    assert echoes(pe)
    reason = d.control()["failed"]["low"]["reason"]
    assert "cannot bind" in reason and "lacks cap_net_bind_service" in reason, reason
    r = subprocess.run([*AS_NOBODY, d.python, "-m", "superd", "check", "--bind", "-c",
                        str(d.table)], cwd=d.source, env=daemon_env(), capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1 and "lacks cap_net_bind_service" in r.stdout, r.stdout + r.stderr


@needs_root
def test_a_privileged_port_systemd_passes_needs_no_capability(request):
    """The socket-activation route: root (systemd) binds the port, superd as nobody serves."""
    d = daemon(request, AS_NOBODY)
    low = lib.free_low_udp_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", low))
        sock.listen(16)
        start(d, {"low": {"listen": f"127.0.0.1:{low}", "internal": "echo"}},
              passed=[("low", sock)])
        assert echoes(low)
        assert d.control()["failed"] == {}


def _retried(table: str, name: str) -> str:
    """As nobody: read `table`, then load entry `name` again as a retry does (it found its
    user missing at first; the retry must refuse it all the same)."""
    doc = config.load(table)
    again = config._load_again(doc, name, {}, doc)
    return "; ".join(map(str, again)) if isinstance(again, list) else f"loaded {again.name}"


@needs_root
def test_a_retry_refuses_a_user_superd_cannot_become_too():
    folder = rl.world_dir("superd-nonroot-")
    try:
        table = folder / "superd.yaml"
        table.write_text(f"services:\n  asroot: {{listen: '127.0.0.1:{free_port()}', "
                         "exec: [/bin/true], user: root}\n")
        table.chmod(0o644)
        with multiprocessing.get_context("fork").Pool(
                1, initializer=rl.as_user(rl.nobody())) as pool:
            said = pool.apply(_retried, (str(table), "asroot"))
        assert "services.asroot.user" in said and "cap_setuid" in said, said
    finally:
        shutil.rmtree(folder, ignore_errors=True)
