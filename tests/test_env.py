"""What a handler receives: environment, file descriptors, signal state."""

from __future__ import annotations

import json
import os
import socket

import pytest
from superd_testlib import (
    LEAK_MARKER_NAME,
    LEAK_MARKER_VALUE,
    MARKER_HOME,
    MARKER_PATH_DIR,
    connect,
    connect_unix,
    daemon_env,
    free_port,
    python_script,
    recv_until_eof,
)

# Reads the environment exec() gave it (/proc/self/environ, untouched by Python's own start-up)
# and its open fds, and sends both as JSON to the client.
DUMP = r'''
import json, os
raw = open("/proc/self/environ", "rb").read().decode()
env = dict(kv.split("=", 1) for kv in raw.split("\0") if kv)
names = os.listdir("/proc/self/fd")
fds = []
for n in names:  # the fd listdir used is closed again by now
    try:
        os.fstat(int(n))
        fds.append(int(n))
    except OSError:
        pass
out = json.dumps({"env": env, "fds": sorted(fds), "pid": os.getpid()}).encode()
while out:
    out = out[os.write(1, out):]
'''

SPEC_TCP_VARS = {"PROTO", "TCPREMOTEIP", "TCPREMOTEPORT", "TCPLOCALIP", "TCPLOCALPORT",
                 "REMOTE_ADDR", "REMOTE_PORT", "REMOTE_HOST", "SUPERD_SERVICE"}
SPEC_UNIX_VARS = {"UNIXREMOTEEUID", "UNIXREMOTEEGID", "UNIXREMOTEPID"}
STANDARD_PATH_DIRS = {"/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin",
                      "/bin"}
# Set from the handler's user, not copied from superd's environment, so tolerated:
USER_VARS = {"HOME", "USER", "LOGNAME", "SHELL"}
PASS_VALUE = "passed-through-" + LEAK_MARKER_VALUE[-6:]


@pytest.fixture
def dump_script(tmp_path):
    return python_script(tmp_path / "dump.py", DUMP)


def _service(listen, script, **extra):
    svc = {"listen": listen, "exec": [str(script)],
           "env": {"FOO": "bar baz", "EMPTY": ""}, "passenv": ["PASSME"]}
    svc.update(extra)
    return svc


def _fetch(sock: socket.socket) -> dict:
    sock.shutdown(socket.SHUT_WR)
    return json.loads(recv_until_eof(sock, 5))


def _assert_clean(env: dict, allowed: set[str]) -> None:
    # a standard system PATH, nothing of superd's own
    path = env.get("PATH", "")
    dirs = path.split(":")
    assert "/usr/bin" in dirs and "/bin" in dirs, f"PATH={path!r}"
    assert set(dirs) <= STANDARD_PATH_DIRS, f"PATH is not a standard system PATH: {path!r}"
    assert MARKER_PATH_DIR not in path
    # env: and passenv: are there
    assert env.get("FOO") == "bar baz"
    assert env.get("EMPTY") == ""
    assert env.get("PASSME") == PASS_VALUE
    # nothing else of the daemon's environment leaks
    assert LEAK_MARKER_NAME not in env
    assert LEAK_MARKER_VALUE not in json.dumps(env)
    superd_env = daemon_env({"PASSME": PASS_VALUE, "NOT_PASSED": "x"})
    superd_env["NOTIFY_SOCKET"] = "?"
    leaked = {k: v for k, v in env.items()
              if k not in allowed and k in superd_env and k not in USER_VARS}
    assert not leaked, f"superd's environment leaked into the handler: {leaked}"
    assert env.get("HOME") != MARKER_HOME, "HOME copied from superd's environment"
    unexpected = set(env) - allowed - USER_VARS
    assert not unexpected, f"unexpected variables in the handler's environment: {unexpected}"


@pytest.mark.parametrize(
    "listen_form,client_ip",
    [("{p}", "127.0.0.1"), ("{p}", "::1"), ("127.0.0.1:{p}", "127.0.0.1"),
     ("[::1]:{p}", "::1")],
    ids=["dual-v4", "dual-v6", "v4", "v6"])
def test_tcp_handler_environment(superd, dump_script, listen_form, client_ip):
    port = free_port()
    superd({"envdump": _service(listen_form.format(p=port), dump_script)},
           env={"PASSME": PASS_VALUE, "NOT_PASSED": "x"})
    with connect(client_ip, port) as s:
        my_ip, my_port = s.getsockname()[:2]
        srv_ip, srv_port = s.getpeername()[:2]
        info = _fetch(s)
    env = info["env"]
    assert my_ip == client_ip
    expect = {
        "PROTO": "TCP",
        "TCPREMOTEIP": client_ip,  # plain 127.0.0.1 on a dual-stack listener, not ::ffff:
        "TCPREMOTEPORT": str(my_port),
        "TCPLOCALIP": srv_ip,
        "TCPLOCALPORT": str(srv_port),
        "REMOTE_ADDR": client_ip,
        "REMOTE_PORT": str(my_port),
        "REMOTE_HOST": client_ip,
        "SUPERD_SERVICE": "envdump",
    }
    got = {k: env.get(k) for k in expect}
    assert got == expect
    assert srv_port == port
    _assert_clean(env, SPEC_TCP_VARS | {"PATH", "FOO", "EMPTY", "PASSME"})
    assert info["fds"] == [0, 1, 2], f"handler fds: {info['fds']}"


def test_unix_handler_environment(superd, dump_script, tmp_path):
    path = tmp_path / "env.sock"
    superd({"uenv": _service(str(path), dump_script, protocol="unix")},
           env={"PASSME": PASS_VALUE, "NOT_PASSED": "x"})
    with connect_unix(path) as s:
        info = _fetch(s)
    env = info["env"]
    assert env.get("PROTO") == "UNIX"
    assert env.get("SUPERD_SERVICE") == "uenv"
    assert env.get("UNIXREMOTEEUID") == str(os.geteuid())
    assert env.get("UNIXREMOTEEGID") == str(os.getegid())
    assert env.get("UNIXREMOTEPID") == str(os.getpid())
    _assert_clean(env, SPEC_TCP_VARS | SPEC_UNIX_VARS | {"PATH", "FOO", "EMPTY", "PASSME"})
    assert info["fds"] == [0, 1, 2], f"handler fds: {info['fds']}"


def test_handler_signal_mask_and_dispositions_are_default(superd):
    """grep itself changes no signal state, so what it reads is what superd handed over."""
    port = free_port()
    superd({"sigs": {"listen": f"127.0.0.1:{port}",
                     "exec": ["/bin/grep", "-E", "^Sig(Blk|Ign):", "/proc/self/status"]}})
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        out = recv_until_eof(s, 5).decode()
    fields = dict(line.split(":\t") for line in out.splitlines())
    assert fields == {"SigBlk": "0000000000000000", "SigIgn": "0000000000000000"}, out


def test_handler_user_group_cwd_umask_nice_rlimits(superd, tmp_path):
    import pwd

    nobody = pwd.getpwnam("nobody")
    port = free_port()
    superd({"creds": {
        "listen": f"127.0.0.1:{port}",
        "exec": ["/bin/sh", "-c",
                 "id -u; id -g; pwd; umask; cut -d' ' -f19 /proc/$$/stat; ulimit -n"],
        "user": "nobody", "cwd": "/tmp", "umask": "027", "nice": 5,
        "rlimits": {"nofile": 64},
    }})
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        out = recv_until_eof(s, 5).decode().split("\n")
    assert out[:6] == [str(nobody.pw_uid), str(nobody.pw_gid), "/tmp", "0027", "5", "64"], out


def test_defaults_apply_and_services_override_them(superd):
    import pwd

    nobody = pwd.getpwnam("nobody")
    pd, po = free_port(), free_port()
    show = ["/bin/sh", "-c", 'id -u; echo "$GREETING"']
    superd({
        "dflt": {"listen": f"127.0.0.1:{pd}", "exec": show},
        "own": {"listen": f"127.0.0.1:{po}", "exec": show, "user": "root",
                "env": {"GREETING": "own"}},
    }, defaults={"user": "nobody", "env": {"GREETING": "from defaults"}})
    assert tcp_exchange_text(pd) == [str(nobody.pw_uid), "from defaults"]
    assert tcp_exchange_text(po) == ["0", "own"]


def tcp_exchange_text(port: int) -> list[str]:
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        return recv_until_eof(s, 5).decode().splitlines()
