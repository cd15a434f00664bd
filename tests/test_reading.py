"""Reading the table never stalls or ends superd: it is done in a child, with a deadline.

A python handler's module is imported when the table is read, which runs its top level; a
host name in `listen` waits for the name service. A half-edited handler that loops at import,
one that calls os._exit(), a name server that never answers: each is one failed reading (the
reload refused, or the service not started), while every service goes on answering at once.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import threading
import time

import superd_testlib as lib
from superd_testlib import PY, REPO, free_port, tcp_exchange, wait_until

HANDLER = "def handle(sock, env):\n    sock.sendall(b'hi\\n')\n"
# an import that does not return (asleep, not spinning: the test holds on a busy machine too)
NEVER_RETURNS = "import time\nwhile True:\n    time.sleep(1)\n" + HANDLER


def worst_echo(port: int, seconds: float) -> float:
    """The slowest of echo round trips made for `seconds` (bounded in count too)."""
    worst = 0.0
    end = time.monotonic() + seconds
    for _ in range(10_000):
        if time.monotonic() > end:
            break
        t = time.monotonic()
        try:
            got = tcp_exchange("127.0.0.1", port, b"x\n", timeout=10)
        except OSError as e:
            got = repr(e)
        assert got == b"x\n", f"round trip {_ + 1}: {got!r}"
        worst = max(worst, time.monotonic() - t)
    return worst


def reload_cli(d: lib.Superd) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", "reload", "-c", str(d.table)], cwd=REPO,
                          env=lib.daemon_env(), capture_output=True, text=True, timeout=60)


def test_a_handler_that_never_returns_from_its_import_stalls_nothing(new_daemon):
    d = new_daemon()
    echo = free_port()
    services = {"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"}}
    d.start(services, settings={"read_timeout": 3})
    (d.table.parent / "spin.py").write_text(NEVER_RETURNS)
    services["spin"] = {"listen": f"127.0.0.1:{free_port()}", "python": "spin.py:handle"}
    d.write_table(services, settings={"read_timeout": 3})
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=reload_cli(d)), daemon=True)
    t.start()
    worst = worst_echo(echo, 2.0)  # while the reading spins
    t.join(30)
    assert worst < 0.5, f"an echo round trip took {worst:.2f} s during the reading"
    r = result["r"]
    assert r.returncode == 1, r.stdout + r.stderr
    assert "took more than 3 s" in r.stderr and "reload refused" in r.stderr
    d.wait_log(r"^reload refused, keeping the running table: .*took more than 3 s")
    assert lib.status(d)["table_state"]["refused"] is True
    # fixed: the next reload takes it
    (d.table.parent / "spin.py").write_text(HANDLER)
    d.reload(services)  # (and read_timeout back to its default)
    status = lib.status(d)
    assert "spin" in status["services"], status
    with socket.create_connection(("127.0.0.1", services["spin"]["listen"].split(":")[1])) as s:
        assert lib.recv_until_eof(s) == b"hi\n"


def test_a_handler_that_ends_its_process_at_import_fails_only_its_service(superd):
    echo, bye = free_port(), free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"}})
    (d.table.parent / "bye.py").write_text("import os\nos._exit(3)\n" + HANDLER)
    d.reload({"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"},
              "bye": {"listen": f"127.0.0.1:{bye}", "python": "bye.py:handle"}})
    d.wait_log(r"^bye: not started: services\.bye\.python: cannot import bye\.py: its module "
               r"ended the process while loading")
    assert d.proc.poll() is None
    assert tcp_exchange("127.0.0.1", echo, b"still\n") == b"still\n"
    assert lib.connection_refused("127.0.0.1", bye)


def test_superd_starts_beside_a_handler_that_ends_its_process_at_import(new_daemon):
    d = new_daemon()
    echo = free_port()
    (d.table.parent / "bye.py").write_text("import os\nos._exit(3)\n" + HANDLER)
    d.start({"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"},
             "bye": {"listen": f"127.0.0.1:{free_port()}", "python": "bye.py:handle"}})
    assert tcp_exchange("127.0.0.1", echo, b"up\n") == b"up\n"
    failed = lib.status(d)["failed"]
    assert "ended the process while loading" in failed["bye"]["reason"]
    # fixed on disk: the retry takes it, without a reload
    (d.table.parent / "bye.py").write_text(HANDLER)
    d.wait_log(r"^bye: started, \d+ tries after", timeout=15)


def test_an_import_that_never_returns_fails_its_service_alone(superd):
    """Within read_timeout, each handler's import has IMPORT_TIMEOUT (10 s) of its own."""
    echo, spin = free_port(), free_port()
    services = {"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"}}
    d = superd(services)
    (d.table.parent / "spin.py").write_text(NEVER_RETURNS)
    services["spin"] = {"listen": f"127.0.0.1:{spin}", "python": "spin.py:handle"}
    d.write_table(services)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=reload_cli(d)), daemon=True)
    t.start()
    try:
        worst = worst_echo(echo, 3.0)
    except AssertionError as e:
        raise AssertionError(f"{e}\n" + "\n".join(d.lines()[-20:]) + d.stderr_text()) from None
    t.join(60)
    assert worst < 0.5, f"an echo round trip took {worst:.2f} s during the reading"
    r = result["r"]
    assert r.returncode == 1 and "import did not return within 10 s" in r.stderr, r.stderr
    assert lib.status(d)["table_state"]["refused"] is False  # the rest of the table was taken


def test_reloads_asked_for_while_one_reads_are_all_answered(superd):
    echo, later = free_port(), free_port()
    services = {"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"}}
    d = superd(services)
    idx = d.notify_index()
    services["later"] = {"listen": f"127.0.0.1:{later}", "internal": "echo"}
    d.write_table(services)
    for _ in range(3):
        d.proc.send_signal(signal.SIGHUP)
    r = reload_cli(d)
    assert r.returncode == 0, r.stderr
    assert tcp_exchange("127.0.0.1", later, b"x\n") == b"x\n"
    wait_until(lambda: d.notify_index() > idx, 5, "notifications")
    assert d.proc.poll() is None


def test_a_connection_superd_ends_during_a_reading_ends_for_its_client(superd):
    """The reading child holds none of superd's sockets: an echo session open when it was
    forked ends for its client as soon as superd closes it, not when the reading ends."""
    echo = free_port()
    services = {"echo": {"listen": f"127.0.0.1:{echo}", "internal": "echo"}}
    d = superd(services)
    client = socket.create_connection(("127.0.0.1", echo))
    client.sendall(b"before\n")
    assert lib.recv_exact(client, 7) == b"before\n"
    (d.table.parent / "spin.py").write_text(NEVER_RETURNS)
    services["spin"] = {"listen": f"127.0.0.1:{free_port()}", "python": "spin.py:handle"}
    d.write_table(services)
    idx = d.notify_index()
    d.proc.send_signal(signal.SIGHUP)
    d.wait_notify("RELOADING=1", idx)  # the reading child is there now, for 10 s
    t = time.monotonic()
    client.shutdown(socket.SHUT_WR)
    assert lib.recv_until_eof(client, 5) == b""
    client.close()
    assert time.monotonic() - t < 2, "the client waited for the reading to end"
    d.wait_notify("READY=1", idx, timeout=30)
