"""Shell completion (issue 15): config/completion/superd.bash, run by a real bash the way
bash runs a completion function (COMP_WORDS, COMP_CWORD, then COMPREPLY), against the real
command line and a running daemon; and the zsh one, checked by zsh itself and against the
command line. Also `superd status SERVICE...`, which the service-name completion serves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import superd_testlib as lib
from superd_testlib import PY, REPO, free_port

from superd import cli

BASH = REPO / "config" / "completion" / "superd.bash"
ZSH = REPO / "config" / "completion" / "_superd"
BIN = Path(sys.prefix) / "bin"


def complete(line: str, cwd: Path = REPO) -> list[str]:
    """What bash offers at the end of `line` (a trailing space: a new, empty word)."""
    words = line.split()
    if line.endswith(" "):
        words.append("")
    script = ('source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); '
              'COMP_LINE="${COMP_WORDS[*]}"; _superd; printf "%s\\n" "${COMPREPLY[@]}"')
    r = subprocess.run(["bash", "-c", script, "bash", str(BASH), *words], cwd=cwd,
                       capture_output=True, text=True, timeout=30,
                       env={"PATH": f"{BIN}:/usr/bin:/bin", "LANG": "C.UTF-8"})
    assert r.returncode == 0 and not r.stderr, r.stderr
    return sorted(x for x in r.stdout.splitlines() if x)


def long_options(command: str) -> set[str]:
    r = subprocess.run([PY, "-m", "superd", command, "--help"], capture_output=True, text=True,
                       timeout=30, cwd=REPO)
    return set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", r.stdout))


def test_bash_completes_commands_and_every_option_of_each():
    assert complete("superd ") == sorted(cli.COMMANDS)
    assert complete("superd st") == ["status", "stop"]
    assert complete("superd --") == ["--help", "--version"]
    for command in cli.COMMANDS:
        offered = set(complete(f"superd {command} --"))
        assert offered == long_options(command), command
    assert complete("superd import ") == ["inetd", "systemd", "tcprules", "xinetd"]
    assert complete("superd run --daemon --p") == ["--pidfile"]


def test_bash_completes_files_where_a_file_goes(tmp_path):
    (tmp_path / "tables").mkdir()
    for name in ("edge.yaml", "edge.yml.bak", "inetd.conf"):
        (tmp_path / "tables" / name).write_text("")
    assert complete("superd run -c tables/ed", cwd=tmp_path) == \
        ["tables/edge.yaml", "tables/edge.yml.bak"]
    assert complete("superd check --config tables/e", cwd=tmp_path) == \
        ["tables/edge.yaml", "tables/edge.yml.bak"]
    assert complete("superd import inetd tables/i", cwd=tmp_path) == ["tables/inetd.conf"]
    assert complete("superd run --daemon --pidfile tab", cwd=tmp_path) == ["tables"]
    # several files (import systemd UNIT.socket UNIT.service): files after the first too
    assert complete("superd import systemd tables/inetd.conf ", cwd=tmp_path) == ["tables"]


def test_bash_completes_the_running_daemons_service_names(superd, tmp_path):
    d = superd({"echo": {"listen": f"127.0.0.1:{free_port()}", "internal": "echo"},
                "echo-u": {"listen": f"127.0.0.1:{free_port()}", "protocol": "udp",
                           "internal": "echo"},
                "git": {"listen": f"127.0.0.1:{free_port()}", "exec": ["/bin/cat"]}})
    assert complete(f"superd status -c {d.table} ") == ["echo", "echo-u", "git"]
    assert complete(f"superd status --config {d.table} --json e") == ["echo", "echo-u"]
    # No daemon behind that table: nothing to offer, and no error on the terminal.
    other = tmp_path / "other.yaml"
    other.write_text(f"settings: {{control_socket: {tmp_path}/none.sock}}\n")
    assert complete(f"superd status -c {other} ") == []


def test_status_shows_only_the_services_named(superd):
    d = superd({"a": {"listen": f"127.0.0.1:{free_port()}", "internal": "echo"},
                "b": {"listen": f"127.0.0.1:{free_port()}", "internal": "echo"},
                "c": {"listen": f"127.0.0.1:{free_port()}", "internal": "echo"}})

    def status(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "superd", "status", "-c", str(d.table), *args],
                              capture_output=True, text=True, timeout=30, cwd=REPO,
                              env=lib.daemon_env())
    r = status("--json", "c", "a")
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["services"]) == ["a", "c"]
    r = status("b")
    assert r.returncode == 0
    lines = r.stdout.splitlines()
    rows = lines[next(i for i, x in enumerate(lines) if x.startswith("SERVICE")) + 1:]
    assert [line.split()[0] for line in rows] == ["b"]
    r = status("a", "nosuch")
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "superd: no such service: nosuch\n")


def test_zsh_completion_parses_and_knows_every_command_and_option():
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.fail("zsh is not installed (bash .ci/setup --test installs it)")
    r = subprocess.run([zsh, "-n", str(ZSH)], capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stderr) == (0, "")
    text = ZSH.read_text()
    assert text.startswith("#compdef superd\n")
    for command in cli.COMMANDS:
        assert re.search(rf"\b{command}\\:\"", text), f"zsh: command {command}"
        for option in long_options(command):
            assert option in text, f"zsh: {command} {option}"
    assert "status $config --json" in text
