"""exec services driven by socat and nc, over IPv4, IPv6 and a unix stream socket."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
from superd_testlib import (
    connect,
    connection_refused,
    free_port,
    recv_until_eof,
    tcp_exchange,
    write_script,
)


def run_client(argv: list[str], data: bytes, timeout: float = 10) -> bytes:
    r = subprocess.run(argv, input=data, capture_output=True, timeout=timeout)
    assert r.returncode == 0, f"{argv} exited {r.returncode}: {r.stderr!r}"
    return r.stdout


@pytest.fixture
def cat_dual(superd):
    port = free_port()
    d = superd({"cat": {"listen": str(port), "exec": ["/bin/cat"]}})
    return d, port


@pytest.mark.parametrize("target", ["TCP4:127.0.0.1:{p}", "TCP6:[::1]:{p}"])
def test_socat_cat_dual_stack(cat_dual, target):
    d, port = cat_dual
    data = b"hello superd\nsecond line\n"
    assert run_client(["socat", "-t", "5", "-", target.format(p=port)], data) == data
    start = d.wait_start("cat")[0]
    pid = int(start["pid"])
    assert pid > 0 and pid != d.pid
    expected_from = "127.0.0.1" if "TCP4" in target else "::1"
    assert start["ip"] == expected_from, start.string
    d.wait_log(rf"^EXIT: cat status=0 pid={pid} ")


@pytest.mark.parametrize("argv", [["nc", "-N", "127.0.0.1"], ["nc", "-N", "-6", "::1"]],
                         ids=["ipv4", "ipv6"])
def test_nc_cat_dual_stack(cat_dual, argv):
    d, port = cat_dual
    data = b"via netcat\n"
    assert run_client(argv + [str(port)], data) == data


def test_cat_large_payload(cat_dual):
    d, port = cat_dual
    data = os.urandom(1 << 20)
    assert run_client(["socat", "-t", "5", "-", f"TCP4:127.0.0.1:{port}"], data) == data


def test_listen_list_of_explicit_addresses(superd):
    p4, p6 = free_port(), free_port()
    superd({"cat": {"listen": [f"127.0.0.1:{p4}", f"[::1]:{p6}"], "exec": ["/bin/cat"]}})
    assert tcp_exchange("127.0.0.1", p4, b"four\n") == b"four\n"
    assert tcp_exchange("::1", p6, b"six\n") == b"six\n"
    # an explicit address listens on that address only
    assert connection_refused("::1", p4), "127.0.0.1:P must not listen on ::1"
    assert connection_refused("127.0.0.1", p6), "[::1]:P must not listen on 127.0.0.1"


def test_unix_stream_service_with_socat(superd, tmp_path):
    path = tmp_path / "cat.sock"
    d = superd({"ucat": {"listen": str(path), "protocol": "unix", "exec": ["/bin/cat"]}})
    assert path.exists()
    data = b"over a unix socket\n"
    assert run_client(["socat", "-t", "5", "-", f"UNIX-CONNECT:{path}"], data) == data
    d.wait_log(r"^EXIT: ucat status=0 pid=\d+ ")


def test_exec_args_and_program(superd, tmp_path):
    """exec argv is passed as is; with `program`, exec[0] is only the name argv[0] shows."""
    script = write_script(tmp_path / "args.sh",
                          '#!/bin/sh\nfor a in "$@"; do printf "[%s]\\n" "$a"; done\n')
    p1, p2 = free_port(), free_port()
    show_argv = r"tr '\0' '\n' < /proc/$$/cmdline"  # the shell's own argv, argv[0] included
    superd({
        "plain": {"listen": f"127.0.0.1:{p1}", "exec": [str(script), "a b", "", "c"]},
        "named": {"listen": f"127.0.0.1:{p2}", "exec": ["in.fake", "-c", show_argv],
                  "program": "/bin/sh"},
    })
    out = tcp_exchange("127.0.0.1", p1, b"")
    assert out == b"[a b]\n[]\n[c]\n"
    out = tcp_exchange("127.0.0.1", p2, b"")
    assert out.decode().split("\n") == ["in.fake", "-c", show_argv, ""]


def test_exec_failure_is_a_fail_line_and_daemon_carries_on(superd, tmp_path):
    script = write_script(tmp_path / "soon-gone.sh", "#!/bin/sh\necho hi\n")
    p, pe = free_port(), free_port()
    d = superd({
        "broken": {"listen": f"127.0.0.1:{p}", "exec": [str(script)]},
        "echo": {"listen": f"127.0.0.1:{pe}", "internal": "echo"},
    })
    assert tcp_exchange("127.0.0.1", p, b"") == b"hi\n"
    script.chmod(0o644)  # exec now fails with EACCES
    with connect("127.0.0.1", p) as s:
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s, 5) == b"", "the client's connection must just be closed"
    d.wait_log(r"^FAIL: broken exec from=127\.0\.0\.1$")
    assert tcp_exchange("127.0.0.1", pe, b"still\n", expect_len=6) == b"still\n"
    script.chmod(0o755)
    assert tcp_exchange("127.0.0.1", p, b"") == b"hi\n"


@pytest.mark.parametrize("form,answers,refuses", [
    ("0.0.0.0:{p}", "127.0.0.1", "::1"),
    ("[::]:{p}", "::1", "127.0.0.1"),
], ids=["ipv4-wildcard-only", "ipv6-wildcard-only"])
def test_wildcard_listen_forms(superd, form, answers, refuses):
    """`0.0.0.0:P` is IPv4 only, `[::]:P` IPv6 only (IPV6_V6ONLY), SPEC 2."""
    port = free_port()
    superd({"cat": {"listen": form.format(p=port), "exec": ["/bin/cat"]}})
    assert tcp_exchange(answers, port, b"x\n") == b"x\n"
    assert connection_refused(refuses, port)


def test_stale_unix_socket_file_is_replaced(superd, tmp_path):
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # leaves the file behind, as a crashed daemon would
    superd({"ucat": {"listen": str(path), "protocol": "unix", "exec": ["/bin/cat"]}})
    assert run_client(["socat", "-t", "5", "-", f"UNIX-CONNECT:{path}"], b"ok\n") == b"ok\n"


def test_handlers_may_run_on_every_cpu_superd_may(superd):
    """A handler may use every CPU superd may: nothing on the way (a spawner) narrows it."""
    port = free_port()
    d = superd({"cpus": {"listen": f"127.0.0.1:{port}",
                         "exec": ["/bin/grep", "Cpus_allowed_list", "/proc/self/status"]}})
    mine = open(f"/proc/{d.pid}/status").read()
    expected = next(line for line in mine.splitlines() if line.startswith("Cpus_allowed_list"))
    for _ in range(6):  # more connections than spawners: each spawner starts some of them
        with connect("127.0.0.1", port) as s:
            s.shutdown(socket.SHUT_WR)
            assert recv_until_eof(s).decode().strip() == expected


def test_handler_with_a_large_environment(superd):
    """A request too large for a spawner message (over 64 KiB) is started by superd itself."""
    port = free_port()
    big = "x" * 100_000
    d = superd({"big": {"listen": f"127.0.0.1:{port}", "env": {"BIG": big},
                        "exec": ["/bin/sh", "-c", 'printf %s "$BIG" | wc -c']}})
    with connect("127.0.0.1", port) as s:
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s).decode().strip() == "100000"
    d.wait_log(r"^EXIT: big status=0 ")
