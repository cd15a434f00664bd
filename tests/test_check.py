"""`superd check` (and `superd run` on a bad table): every mistake, with file, line and field."""

from __future__ import annotations

import re
import subprocess

import pytest
import superd_testlib as lib
from superd_testlib import (
    PY,
    REPO,
    connection_refused,
    daemon_env,
    free_port,
    port_is_free,
    tcp_exchange,
)


def superd_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", *args], cwd=REPO, env=daemon_env(),
                          capture_output=True, text=True, timeout=timeout)


def numbered(rows: list[tuple[str, str | None]]) -> tuple[str, dict[str, int]]:
    """rows of (text, tag): the YAML text and {tag: 1-based line number}."""
    text = "\n".join(r[0] for r in rows) + "\n"
    return text, {tag: i + 1 for i, (_, tag) in enumerate(rows) if tag}


def write(path, text: str):
    path.write_text(text)
    path.chmod(0o644)
    return path


def output_lines(r: subprocess.CompletedProcess) -> list[str]:
    return (r.stdout + r.stderr).splitlines()


def assert_problem(lines: list[str], table, line: int, field_rx: str) -> None:
    rx = re.compile(rf"^{re.escape(str(table))}:{line}: {field_rx}: \S")
    assert any(rx.match(x) for x in lines), (
        f"no line like {rx.pattern!r} in:\n" + "\n".join(lines))


IDX = r"(?:\[\d+\]|\.\d+)?"  # a list index after the field, if the checker names one


def many_mistakes(tmp_path, ports) -> tuple[object, dict[str, int]]:
    p1, p2, p3, p4, p5 = ports
    text, at = numbered([
        ("settings:", None),
        (f"  control_socket: {tmp_path}/ctl.sock", None),
        ("services:", None),
        ("  good:", None),
        (f'    listen: "127.0.0.1:{p1}"', None),
        ("    internal: echo", None),
        ("  unknownkey:", None),
        (f'    listen: "127.0.0.1:{p2}"', None),
        ("    internal: echo", None),
        ("    colour: blue", "unknown"),
        ("  wrongtype:", None),
        (f'    listen: "127.0.0.1:{p3}"', None),
        ("    internal: echo", None),
        ("    backlog: [1, 2]", "type"),
        ("  relexec:", None),
        (f'    listen: "127.0.0.1:{p4}"', None),
        ("    exec: [bin/cat, -u]", "relexec"),
        ("  dup1:", None),
        (f'    listen: "127.0.0.1:{p5}"', "dup1"),
        ("    internal: echo", None),
        ("  dup2:", None),
        (f'    listen: "127.0.0.1:{p5}"', "dup2"),
        ("    internal: echo", None),
        ("  dupudp:", None),  # same address, other protocol: fine
        (f'    listen: "127.0.0.1:{p5}"', None),
        ("    protocol: udp", None),
        ("    internal: echo", None),
        ("  badaddr:", None),
        ('    listen: "127.0.0.1:99999"', "badaddr"),
        ("    internal: echo", None),
    ])
    return write(tmp_path / "bad.yaml", text), at


def assert_many_mistakes_reported(lines: list[str], table, at: dict[str, int]) -> None:
    assert_problem(lines, table, at["unknown"], r"services\.unknownkey\.colour")
    assert_problem(lines, table, at["type"], r"services\.wrongtype\.backlog")
    assert_problem(lines, table, at["relexec"], rf"services\.relexec\.exec{IDX}")
    dup = [x for x in lines
           if re.match(rf"^{re.escape(str(table))}:{at['dup2']}: services\.dup2\.listen{IDX}: ",
                       x)
           or re.match(rf"^{re.escape(str(table))}:{at['dup1']}: services\.dup1\.listen{IDX}: ",
                       x)]
    assert dup, "the duplicate address is not reported:\n" + "\n".join(lines)
    assert_problem(lines, table, at["badaddr"], rf"services\.badaddr\.listen{IDX}")
    assert not [x for x in lines if "services.good" in x or "services.dupudp" in x], lines
    assert not [x for x in lines if "Traceback" in x], "a traceback instead of an error line"


def test_check_reports_every_mistake(tmp_path):
    table, at = many_mistakes(tmp_path, [free_port() for _ in range(5)])
    r = superd_cli("check", "-c", str(table))
    assert r.returncode == 1, r
    assert_many_mistakes_reported(output_lines(r), table, at)
    assert "ok," not in r.stdout


def test_check_more_mistakes(tmp_path):
    text, at = numbered([
        ("services:", None),
        ("  nopy:", None),
        (f'    listen: "127.0.0.1:{free_port()}"', None),
        ('    python: "no_such_module_here.py:handle"', "python"),
        ("  noprog:", None),
        (f'    listen: "127.0.0.1:{free_port()}"', None),
        ("    exec: [/nonexistent/superd-test/prog]", "program"),
        ("  nouser:", None),
        (f'    listen: "127.0.0.1:{free_port()}"', None),
        ("    exec: [/bin/cat]", None),
        ("    user: no-such-user-superd-test", "user"),
    ])
    table = write(tmp_path / "bad2.yaml", text)
    r = superd_cli("check", "-c", str(table))
    lines = output_lines(r)
    assert r.returncode == 1, r
    assert_problem(lines, table, at["python"], r"services\.nopy\.python")
    assert_problem(lines, table, at["program"], rf"services\.noprog\.exec{IDX}")
    assert_problem(lines, table, at["user"], r"services\.nouser\.user")
    assert not [x for x in lines if "Traceback" in x]


def test_check_yaml_syntax_error_has_its_line(tmp_path):
    text, at = numbered([
        ("services:", None),
        ("  echo:", None),
        (f'    listen: "127.0.0.1:{free_port()}"', None),
        ("    internal: echo: oops", "bad"),
    ])
    table = write(tmp_path / "syntax.yaml", text)
    r = superd_cli("check", "-c", str(table))
    assert r.returncode == 1, r
    assert any(x.startswith(f"{table}:{at['bad']}:") for x in output_lines(r)), r
    assert "Traceback" not in r.stdout + r.stderr


def test_check_alias_bomb_and_include_loop(tmp_path):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghij"):
        prev = "abcdefghij"[i]
        bomb.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    bomb.append("services: {}")
    table = write(tmp_path / "bomb.yaml", "\n".join(bomb) + "\n")
    r = superd_cli("check", "-c", str(table), timeout=30)
    assert r.returncode == 1, r
    assert str(table) in r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, "include: [b.yaml]\nservices: {}\n")
    write(b, "include: [a.yaml]\nservices: {}\n")
    r = superd_cli("check", "-c", str(a), timeout=30)
    assert r.returncode == 1, r
    assert re.search(rf"{re.escape(str(a))}:\d+|{re.escape(str(b))}:\d+", r.stdout + r.stderr), r
    assert "Traceback" not in r.stdout + r.stderr


def test_check_good_table(tmp_path):
    p1, p2, p3 = free_port(), free_port(), free_port()
    text = f"""\
settings:
  control_socket: {tmp_path}/ctl.sock
services:
  echo:
    listen: "127.0.0.1:{p1}"
    internal: echo
  echo-u:
    listen: "127.0.0.1:{p1}"
    protocol: udp
    internal: echo
  cat:
    listen: ["127.0.0.1:{p2}", "[::1]:{p2}"]
    exec: [/bin/cat]
  off:
    listen: "127.0.0.1:{p3}"
    internal: daytime
    disabled: true
"""
    table = write(tmp_path / "good.yaml", text)
    r = superd_cli("check", "-c", str(table))
    assert r.returncode == 0, r
    assert f"{table}: ok, 4 services" in r.stdout.splitlines(), r
    # check starts nothing
    assert port_is_free(p1) and port_is_free(p2) and port_is_free(p3)


def test_world_writable_table_is_refused(tmp_path):
    table = write(tmp_path / "ww.yaml",
                  f'services:\n  echo: {{listen: "127.0.0.1:{free_port()}", internal: echo}}\n')
    assert superd_cli("check", "-c", str(table)).returncode == 0
    table.chmod(0o666)
    r = superd_cli("check", "-c", str(table))
    assert r.returncode == 1, r
    assert str(table) in r.stdout + r.stderr


def test_bad_usage_exits_2():
    assert superd_cli("check", "--no-such-option").returncode == 2
    assert superd_cli("no-such-command").returncode == 2


def test_run_serves_what_loads_and_names_what_does_not(new_daemon, tmp_path):
    """One bad service never takes the others down (issue 12): superd run reports every
    mistake as `superd check` does, serves the services that load, binds nothing for those
    that do not, and `superd status` says which are not started and why."""
    ports = [free_port() for _ in range(5)]
    table, at = many_mistakes(tmp_path, ports)
    d = new_daemon()
    d.start(text=table.read_text())
    lines = (d.stdout_text() + d.stderr_text()).splitlines()
    assert_many_mistakes_reported(lines, d.table, at)
    p1, p2, p3, p4, p5 = ports
    assert tcp_exchange("127.0.0.1", p1, b"good\n", expect_len=5) == b"good\n"
    assert tcp_exchange("127.0.0.1", p5, b"dup1\n", expect_len=5) == b"dup1\n"  # the first
    for p in (p2, p3, p4):
        assert connection_refused("127.0.0.1", p), f"port {p} is bound for a bad service"
    status = lib.status(d)
    assert set(status["services"]) == {"good", "dup1", "dupudp"}, status["services"]
    failed = status["failed"]
    assert set(failed) == {"unknownkey", "wrongtype", "relexec", "dup2", "badaddr"}, failed
    assert failed["relexec"]["where"] == f"{d.table}:{at['relexec'] - 2}"
    assert "is not an absolute path" in failed["relexec"]["reason"]
    assert failed["relexec"]["next_try_in"] is None, "a mistake in the table is not retried"
    assert len(status["problems"]) >= 5


def test_run_with_a_table_it_cannot_read_exits_1_without_binding(new_daemon, tmp_path):
    """Only a table that cannot be read at all (not YAML, not a mapping) refuses to start."""
    port = free_port()
    d = new_daemon()
    d.expect_rc = 1
    d.start(text=f"services:\n  echo: {{listen: \"127.0.0.1:{port}\", internal: echo\n",
            wait_ready=False)
    try:
        rc = d.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("superd run kept running with a table it could not read")
    assert rc == 1, f"exit {rc}\n{d.stderr_text()}"
    assert re.search(rf"^{re.escape(str(d.table))}:\d+: YAML: ", d.stderr_text(), re.M), \
        d.stderr_text()
    d.notify_index()
    assert not any("READY=1" in items for _, items in d.notifications), d.notifications
    assert port_is_free(port)


def test_include_counts_services_and_names_the_included_file(tmp_path):
    confd = tmp_path / "conf.d"
    confd.mkdir()
    p1, p2, p3 = free_port(), free_port(), free_port()
    main = write(tmp_path / "main.yaml", f"""\
include: [conf.d/*.yaml]
services:
  echo: {{listen: "127.0.0.1:{p1}", internal: echo}}
""")
    write(confd / "a.yaml", f'services:\n  a: {{listen: "127.0.0.1:{p2}", internal: time}}\n')
    write(confd / "b.yaml", f'services:\n  b: {{listen: "127.0.0.1:{p3}", internal: daytime}}\n')
    r = superd_cli("check", "-c", str(main))
    assert r.returncode == 0, r
    assert f"{main}: ok, 3 services" in r.stdout.splitlines(), r
    # a mistake in an included file is reported with that file and its line
    write(confd / "b.yaml", "services:\n  b:\n"
          f'    listen: "127.0.0.1:{p3}"\n    internal: daytime\n    colour: red\n')
    r = superd_cli("check", "-c", str(main))
    assert r.returncode == 1, r
    assert_problem(output_lines(r), confd / "b.yaml", 5, r"services\.b\.colour")


def test_superd_config_env_names_the_table(tmp_path):
    table = write(tmp_path / "env.yaml",
                  f'services:\n  echo: {{listen: "127.0.0.1:{free_port()}", internal: echo}}\n')
    env = daemon_env({"SUPERD_CONFIG": str(table)})
    r = subprocess.run([PY, "-m", "superd", "check"], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=20)
    assert r.returncode == 0, r
    assert f"{table}: ok, 1 services" in r.stdout.splitlines(), r
