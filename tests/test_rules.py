"""`rules:` (issue 14, item 6) and `superd import tcprules`.

The imported rules are held against the real tcprules/tcprulescheck (ucspi-tcp): for each
client address, the rule tcprulescheck says tcpserver would apply must be what a running
superd does for a real client from that address (refused, or served with those variables).
Rules with names use a dnsmasq the test starts.
"""

from __future__ import annotations

import subprocess

import pytest
import yaml
from access_lib import check, dnsmasq, names_etc, refused, served, start_private
from superd_testlib import PY, REPO, free_port

SHOW = ["/bin/sh", "-c", 'echo "R=[${RELAYCLIENT-unset}] B=[${RBLSMTPD-unset}]"']
TCP_RULES = """# a qmail-style tcp.smtp
127.0.0.1:allow,RELAYCLIENT=""
127.0.0.9:deny
127.0.0.37-53:allow,RELAYCLIENT="range"
127.0.:allow,RBLSMTPD="-local"
127.1.2.:deny
:allow,RBLSMTPD='-"quoted"'
"""
CLIENTS = ["127.0.0.1", "127.0.0.9", "127.0.0.40", "127.0.0.54", "127.0.3.4", "127.1.2.3",
           "127.1.3.3", "127.2.0.1"]


def tcprulescheck(cdb, ip: str) -> tuple[bool, dict[str, str]]:
    out = subprocess.run(["tcprulescheck", str(cdb)], env={"TCPREMOTEIP": ip},
                         capture_output=True, text=True, timeout=10, check=True).stdout
    env = dict(line[len("set environment variable "):].split("=", 1)
               for line in out.splitlines() if line.startswith("set environment variable "))
    return "allow connection" in out, env


def imported(path) -> list:
    r = subprocess.run([PY, "-m", "superd", "import", "tcprules", str(path)], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)["rules"]


def test_imported_rules_do_what_tcprules_says(superd, tmp_path):
    source = tmp_path / "tcp.smtp"
    source.write_text(TCP_RULES)
    cdb = tmp_path / "tcp.cdb"
    with open(source) as f:
        subprocess.run(["tcprules", str(cdb), str(tmp_path / "tcp.tmp")], stdin=f, check=True,
                       timeout=10)
    port = free_port()
    d = superd({"smtp": {"listen": f"0.0.0.0:{port}", "exec": SHOW,
                         "rules": imported(source)}})
    for ip in CLIENTS:
        allowed, env = tcprulescheck(cdb, ip)
        if not allowed:
            refused(d, "smtp", ip, port, "rules")
            continue
        want = (f"R=[{env.get('RELAYCLIENT', 'unset')}] "
                f"B=[{env.get('RBLSMTPD', 'unset')}]\n").encode()
        assert served(ip, port) == want, f"{ip}: tcprulescheck says {env}"


@pytest.fixture
def dns(tmp_path):
    server = dnsmasq(tmp_path, {"mx.example.test": ["127.0.0.2"], "a.spam.test": ["127.0.0.3"]})
    yield server
    server.stop()


def test_rules_with_names_first_match_wins(new_daemon, dns, tmp_path):
    port = free_port()
    d = start_private(new_daemon, {"smtp": {"listen": str(port), "exec": SHOW, "rules": [
        {"allow": ["mx.example.test"], "env": {"RELAYCLIENT": "mx"}},
        {"deny": [".spam.test"]},
        {"allow": ["127.0.0.0/8"], "env": {"RBLSMTPD": ""}},
        {"deny": ["all"]},
    ]}}, names_etc(tmp_path / "etc", dns.ip))
    assert served("127.0.0.2", port) == b"R=[mx] B=[unset]\n"
    refused(d, "smtp", "127.0.0.3", port, "rules")
    assert served("127.0.0.4", port) == b"R=[unset] B=[]\n"
    refused(d, "smtp", "::1", port, "rules", host="::1")


def test_bad_rules_name_the_rule(tmp_path):
    table = tmp_path / "t.yaml"
    r = check(table, "services:\n  s:\n    listen: 7\n    internal: echo\n    rules:\n"
                     "      - {allow: [10.0.0.0/8]}\n      - {deny: [10.9.0.0/16], env: {A: 1}}\n")
    assert r.returncode == 1
    assert f"{table}:6: services.s.rules: rule 2: env goes with allow" in r.stdout


def test_a_rules_variable_wins_over_the_services_env_on_every_spawn_path(superd, tmp_path):
    """The service's env says RELAYCLIENT=service, the rule that lets the client in says
    RELAYCLIENT=rule: every handler sees the name once, with the rule's value, whether it is
    exec'd at once (vfork), forked first (nice) or a python handler."""
    handler = tmp_path / "show.py"
    handler.write_text("import os\ndef handle(sock, env):\n"
                       "    sock.sendall(('RELAYCLIENT=' + os.environ['RELAYCLIENT'] + '\\n'"
                       " + 'RELAYCLIENT=' + env['RELAYCLIENT'] + '\\n').encode())\n")
    common = {"env": {"RELAYCLIENT": "service"},
              "rules": [{"allow": "127.0.0.1", "env": {"RELAYCLIENT": "rule"}}]}
    ports = {name: free_port() for name in ("fast", "forked", "py")}
    superd({"fast": {"listen": f"127.0.0.1:{ports['fast']}", "exec": ["/usr/bin/env"],
                     **common},
            "forked": {"listen": f"127.0.0.1:{ports['forked']}", "exec": ["/usr/bin/env"],
                       "nice": 1, **common},
            "py": {"listen": f"127.0.0.1:{ports['py']}", "python": f"{handler}:handle",
                   **common}})
    for name, port in ports.items():
        lines = served("127.0.0.1", port).decode().splitlines()
        got = [x for x in lines if x.startswith("RELAYCLIENT=")]
        want = ["RELAYCLIENT=rule"] * (2 if name == "py" else 1)
        assert got == want, f"{name}: {got}"


def test_import_tcprules_refuses_split(tmp_path):
    """--split writes a table layout; tcprules has none to write: refused, nothing written."""
    source = tmp_path / "tcp.smtp"
    source.write_text(TCP_RULES)
    out = tmp_path / "out"
    r = subprocess.run([PY, "-m", "superd", "import", "tcprules", str(source), "--split",
                        str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert "--split is for tables" in r.stderr and r.stdout == "" and not out.exists()
