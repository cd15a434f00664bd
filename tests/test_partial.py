"""One bad service never takes the others down (issue 12, point 1).

A port another daemon holds, an address not on the machine, a file where a unix socket goes,
a program removed, a broken include: each such service is logged with its file:line and
reason, shown by `superd status` as not started, tried again on its own, and everything else
runs. A reload takes each service's new definition that loads and binds and keeps the running
definition of one that does not.
"""

from __future__ import annotations

import os
import shutil
import socket

import superd_testlib as lib
from superd_testlib import connection_refused, free_port, tcp_exchange, write_script


def echo(port: int, **extra: object) -> dict:
    return {"listen": f"127.0.0.1:{port}", "internal": "echo", **extra}


def echoes(port: int) -> bool:
    try:
        return tcp_exchange("127.0.0.1", port, b"x", expect_len=1, timeout=3) == b"x"
    except OSError:
        return False


def _line_of(path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_a_port_someone_else_holds_fails_that_service_alone_and_is_retried(superd):
    good, held = free_port(), free_port()
    squatter = socket.create_server(("127.0.0.1", held))
    try:
        d = superd({"good": echo(good), "busy": echo(held)})
        assert echoes(good)
        failed = lib.status(d)["failed"]
        assert "busy" in failed and "Address already in use" in failed["busy"]["reason"]
        assert failed["busy"]["where"] == f"{d.table}:{_line_of(d.table, 'busy:')}"
        d.wait_log(r"^busy: not started: services\.busy\.listen: cannot bind 127\.0\.0\.1:\d+: "
                   r"Address already in use .*; trying again in 1s$")
        statuses = [x for _, items in d.notifications for x in items if x.startswith("STATUS=")]
        assert any("1 not started (busy)" in x for x in statuses), statuses
    finally:
        squatter.close()
    # Freed: the retry (1 s, 2 s, 4 s...) binds it.
    lib.wait_until(lambda: echoes(held), 10, "busy served once its port is free")
    d.wait_log(r"^busy: started, \d+ tries after: ")
    assert "busy" not in lib.status(d)["failed"]


def test_an_address_not_on_the_machine_and_a_file_at_a_unix_path(superd, tmp_path):
    good = free_port()
    path = tmp_path / "in-the-way"
    path.write_text("a file someone left here\n")
    d = superd({"good": echo(good),
                "vpn": {"listen": f"192.0.2.10:{free_port()}", "internal": "echo"},
                "sock": {"listen": str(path), "protocol": "unix", "internal": "echo"}})
    assert echoes(good)
    failed = lib.status(d)["failed"]
    assert "Cannot assign requested address" in failed["vpn"]["reason"], failed
    assert "Address already in use" in failed["sock"]["reason"], failed
    assert path.read_text() == "a file someone left here\n", "the file is never removed"


def test_a_removed_program_waits_until_it_is_back(superd, tmp_path):
    prog = write_script(tmp_path / "prog", "#!/bin/sh\necho here\n")
    gone = tmp_path / "prog.removed"
    good, port = free_port(), free_port()
    shutil.move(prog, gone)  # as `apt-get remove` would, before superd starts
    d = superd({"good": echo(good), "prog": {"listen": f"127.0.0.1:{port}", "exec": [str(prog)]},
                "old": {"listen": f"127.0.0.1:{free_port()}", "exec": ["/nonexistent"],
                        "disabled": True}})
    assert echoes(good)
    status = lib.status(d)
    assert "no such executable file" in status["failed"]["prog"]["reason"]
    assert "old" not in status["failed"], "a disabled entry is reported, never tried"
    assert any("/nonexistent" in p for p in status["problems"])
    assert connection_refused("127.0.0.1", port)
    shutil.move(gone, prog)  # installed again: tried again on its own, no reload needed
    lib.wait_until(lambda: "prog" not in lib.status(d)["failed"], 10, "prog tried again")
    assert tcp_exchange("127.0.0.1", port, b"") == b"here\n"


def test_reload_takes_what_loads_and_keeps_what_does_not(superd, tmp_path):
    p1, p2, p3 = free_port(), free_port(), free_port()
    d = superd({"one": echo(p1), "two": echo(p2)})
    # `two` gets a typo, `three` is new and good, `one` changes its address to a held port.
    held = socket.create_server(("127.0.0.1", p3))
    try:
        p4 = free_port()
        d.reload({"one": echo(p1, instances=5), "two": echo(p2, colour="blue"),
                  "three": echo(p4)})
        assert echoes(p1) and echoes(p2) and echoes(p4)
        status = lib.status(d)
        assert "two" in status["services"] and "unknown key" in status["services"]["two"]["kept"]
        assert status["failed"] == {}
        d.wait_log(r"^two: its new definition is not taken, it runs as it did: ")
        d.wait_log(r"^reloaded: 3 services; added three; changed one; kept as they ran two$")
        d.reload({"one": {"listen": f"127.0.0.1:{p3}", "internal": "echo"}, "two": echo(p2),
                  "three": echo(p4)})
        assert echoes(p1), "one keeps its running definition, on its old port"
        assert "Address already in use" in lib.status(d)["services"]["one"]["kept"]
    finally:
        held.close()


def test_a_broken_include_keeps_its_services_running(superd, tmp_path):
    confd = tmp_path / "conf.d"
    confd.mkdir()
    p1, p2 = free_port(), free_port()
    (confd / "a.yaml").write_text(f'services:\n  a: {{listen: "127.0.0.1:{p2}", '
                                  "internal: echo}\n")
    (confd / "a.yaml").chmod(0o644)
    d = superd({"main": echo(p1)})
    text = d.table.read_text().replace("services:", f"include: [{confd}/*.yaml]\nservices:", 1)
    d.reload(text=text)
    assert echoes(p1) and echoes(p2)
    (confd / "a.yaml").write_text("services:\n  a: {listen: [unclosed\n")  # half-edited
    d.reload()
    assert echoes(p2), "a's file cannot be read: nothing is known of it, so it runs on"
    status = lib.status(d)
    assert "could not be read" in status["services"]["a"]["kept"], status
    assert any("a.yaml" in p and "YAML" in p for p in status["problems"]), status


def test_superd_check_stays_strict(tmp_path):
    import subprocess
    port = free_port()
    table = tmp_path / "t.yaml"
    table.write_text(f'services:\n  good: {{listen: "127.0.0.1:{port}", internal: echo}}\n'
                     f'  bad: {{listen: "127.0.0.1:{free_port()}", exec: [/nonexistent]}}\n')
    r = subprocess.run([lib.PY, "-m", "superd", "check", "-c", str(table)], cwd=lib.REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "services.bad.exec" in r.stdout, r
    assert os.path.exists(table)


def test_check_bind_says_who_holds_a_taken_port(tmp_path):
    import subprocess
    taken, free = free_port(), free_port()
    table = tmp_path / "t.yaml"
    table.write_text(f'services:\n  busy: {{listen: "127.0.0.1:{taken}", internal: echo}}\n'
                     f'  fine: {{listen: "127.0.0.1:{free}", internal: echo}}\n')
    holder = subprocess.Popen([lib.PY, "-c", "import socket, sys, time\n"
                               f"s = socket.create_server(('127.0.0.1', {taken}))\n"
                               "print('up', flush=True)\ntime.sleep(60)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "up\n"
        r = subprocess.run([lib.PY, "-m", "superd", "check", "--bind", "-c", str(table)],
                           cwd=lib.REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 1, r
        assert (f"{table}:2: services.busy.listen: cannot bind 127.0.0.1:{taken}: Address "
                f"already in use (held by pid {holder.pid} (python") in r.stdout, r.stdout
        assert "fine" not in r.stdout
    finally:
        holder.kill()
        holder.wait(5)
        holder.stdout.close()
    r = subprocess.run([lib.PY, "-m", "superd", "check", "--bind", "-c", str(table)],
                       cwd=lib.REPO, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r
