"""superd/config.py load_table() and superd/fields.py: the service table, in process.

Each key, with values that load (and what they become) and values that do not (and the exact
line `superd check` prints: `FILE:LINE: services.NAME.KEY: message`). Then the table as a
whole: defaults, include, names given twice, addresses that clash. tests/test_check.py runs
the real `superd check`; these run in milliseconds, so every key's every rule can be here.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import resource
import socket
import textwrap

import pytest

from superd.config import Service, Settings, load_table
from superd.yamlsrc import TableError

NOBODY = pwd.getpwnam("nobody")


def write(path, text: str):
    path.write_text(textwrap.dedent(text))
    path.chmod(0o644)
    return path


def table(tmp_path, text: str, name: str = "superd.yaml"):
    return load_table(str(write(tmp_path / name, text)))


def problems(tmp_path, text: str, name: str = "superd.yaml") -> list[str]:
    """What `superd check` would print for this table, one line per problem."""
    with pytest.raises(TableError) as e:
        table(tmp_path, text, name)
    return [str(p) for p in e.value.problems]


def service_with(key: str, value: str, base: str = "exec: [/bin/cat]") -> str:
    """A one-service table with `key: value` on line 5, after `listen: 7` and `base` (a line
    for the same key is left out, a comment keeping the count)."""
    first = "# -" if key == "listen" or base.startswith("listen:") else "listen: 7"
    second = "# -" if base.split(":")[0] == key else base
    return f"services:\n  s:\n    {first}\n    {second}\n    {key}: {value}\n"


def one_service(tmp_path, key: str, value: str, **kw) -> Service:
    (svc,) = table(tmp_path, service_with(key, value, **kw)).services
    return svc


# -- every key: values that load -------------------------------------------------------------

GOOD = [
    ("protocol", "tcp", "protocol", "tcp"),
    ("wait", "false", "wait", False),
    ("program", "/bin/cat", "program", "/bin/cat"),
    ("nice", "-20", "nice", -20),
    ("nice", "19", "nice", 19),
    ("umask", "077", "umask", 0o77),  # YAML 1.1: a leading 0 is octal
    ("umask", '"027"', "umask", 0o27),  # a quoted one is read as octal too
    ("umask", "0", "umask", 0),
    ("cwd", "/tmp", "cwd", "/tmp"),
    ("env", "{A: 1, B: true, C: x y, D: 1.5}", "env",
     (("A", "1"), ("B", "true"), ("C", "x y"), ("D", "1.5"))),
    ("passenv", "[TZ, LANG]", "passenv", ("TZ", "LANG")),
    ("passenv", "TZ", "passenv", ("TZ",)),
    ("rlimits", "{nofile: 64, core: 0, cpu: unlimited}", "rlimits",
     (("nofile", 64, 64), ("core", 0, 0),
      ("cpu", resource.RLIM_INFINITY, resource.RLIM_INFINITY))),
    ("instances", "1", "instances", 1),
    ("instances", "unlimited", "instances", None),
    ("on_limit", "refuse", "on_limit", "refuse"),
    ("per_source", "4", "per_source", 4),
    ("per_source", "unlimited", "per_source", None),
    ("rate", "10/s", "rate", (10, 1.0)),
    ("rate", "30/sec", "rate", (30, 1.0)),
    ("rate", '" 5 / min "', "rate", (5, 60.0)),
    ("only_from", "[127.0.0.1, 10.0.0.0/8, '::1', '2001:db8::/32']", "only_from",
     (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"),
      ipaddress.ip_network("::1/128"), ipaddress.ip_network("2001:db8::/32"))),
    ("only_from", "10.1.2.3/8", "only_from", (ipaddress.ip_network("10.0.0.0/8"),)),
    ("no_access", "192.0.2.7", "no_access", (ipaddress.ip_network("192.0.2.7/32"),)),
    ("timeout", "0.5", "timeout", 0.5),
    ("timeout", "30", "timeout", 30.0),
    ("backlog", "1", "backlog", 1),
    ("backlog", "65535", "backlog", 65535),
    ("stderr", "socket", "stderr", "socket"),
    ("stderr", '"null"', "stderr", "null"),
    ("disabled", "true", "disabled", True),
    ("log_on_success", "[]", "log_on_success", frozenset()),
    ("log_on_success", "[pid, traffic]", "log_on_success", frozenset({"pid", "traffic"})),
    ("log_on_failure", "[attempt]", "log_on_failure", frozenset({"attempt"})),
    ("log_on_failure", "host", "log_on_failure", frozenset({"host"})),
]


@pytest.mark.parametrize("key, text, field, want", GOOD, ids=[f"{g[0]}={g[1]}" for g in GOOD])
def test_a_good_value_loads(tmp_path, key, text, field, want):
    assert getattr(one_service(tmp_path, key, text), field) == want


def test_defaults_of_a_service(tmp_path):
    svc = one_service(tmp_path, "disabled", "false")
    assert (svc.protocol, svc.wait, svc.instances, svc.on_limit, svc.per_source, svc.rate,
            svc.timeout, svc.backlog, svc.stderr, svc.cwd, svc.nice, svc.umask) == (
        "tcp", False, None, "queue", None, None, None, 128, "log", "/", 0, None)
    assert svc.log_on_success == {"pid", "host", "exit", "duration"}
    assert svc.log_on_failure == {"host"}
    assert (svc.user, svc.uid, svc.gid, svc.groups) == ("", None, None, None)
    assert svc.argv == ("/bin/cat",) and svc.program == "/bin/cat"


@pytest.mark.parametrize("text, want", [
    ("7", [(socket.AF_INET6, "::", 7, False)]),
    ('"127.0.0.1:7"', [(socket.AF_INET, "127.0.0.1", 7, False)]),
    ('"[::1]:7"', [(socket.AF_INET6, "::1", 7, True)]),
    ('"[::]:7"', [(socket.AF_INET6, "::", 7, True)]),
    ('[7, "127.0.0.2:8"]', [(socket.AF_INET6, "::", 7, False),
                            (socket.AF_INET, "127.0.0.2", 8, False)]),
])
def test_listen_addresses(tmp_path, text, want):
    """A bare port is dual stack (every address, IPv4 too); [V6]:PORT is IPv6 only."""
    svc = one_service(tmp_path, "listen", text, base="internal: echo")
    assert [(a.family, a.host, a.port, a.v6only) for a in svc.listen] == want


def test_a_unix_listener(tmp_path):
    (svc,) = table(tmp_path, f"""\
        services:
          s: {{protocol: unix, listen: {tmp_path}/s.sock, internal: echo}}
        """).services
    assert svc.listen[0].family == socket.AF_UNIX and svc.listen[0].path == f"{tmp_path}/s.sock"


def test_user_sets_uid_gid_and_groups_and_group_replaces_the_gid(tmp_path):
    svc = one_service(tmp_path, "user", "nobody")
    assert (svc.user, svc.uid, svc.gid) == ("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    assert svc.groups == tuple(os.getgrouplist("nobody", NOBODY.pw_gid))
    by_uid = one_service(tmp_path, "user", str(NOBODY.pw_uid))
    assert (by_uid.user, by_uid.uid) == ("nobody", NOBODY.pw_uid)
    grouped = one_service(tmp_path, "group", "0")
    assert (grouped.gid, grouped.groups) == (0, (0,))


def test_an_internal_service_ignores_wait_and_user(tmp_path):
    """SPEC §2: accepted and ignored; built-ins run in superd itself."""
    (svc,) = table(tmp_path, """\
        services:
          e:
            listen: 7
            internal: echo
            wait: true
            user: nobody
        """).services
    assert (svc.internal, svc.wait, svc.uid, svc.groups) == ("echo", False, None, None)


def test_a_python_handler_is_imported_at_load_in_a_child(tmp_path):
    """Imported to check it (in a child process: its top level runs there, not here), and
    marked by its source's hash; the function itself stays with the service's host."""
    marker = tmp_path / "imported-by"
    write(tmp_path / "handler.py", "import os\n"
          f"open({str(marker)!r}, 'w').write(str(os.getpid()))\n"
          "def handle(sock, env):\n    return 3\n")
    svc = one_service(tmp_path, "python", "handler.py:handle", base="listen: 8")
    assert svc.python == "handler.py:handle" and svc.function is None
    assert len(svc.python_source) == 64
    assert marker.read_text() != str(os.getpid()), "the module ran in the loading process"


# -- every key: values that do not load, and what superd check says ---------------------------

BAD = [
    ("protocol", "sctp",
     "expected one of tcp, udp, unix, unix-dgram, unix-seqpacket, vsock, not 'sctp'"),
    ("wait", "maybe", "expected true or false, not 'maybe'"),
    ("wait", "1", "expected true or false, not 1"),
    ("program", "bin/cat", "expected an absolute path, not 'bin/cat'"),
    ("internal", "ping", "expected one of echo, discard, chargen, daytime, time, not 'ping'"),
    ("python", "nocolon", "expected module:function or FILE.py:function"),
    ("python", "a:b:c", "expected module:function or FILE.py:function"),
    ("python", "'mod:'", "expected module:function or FILE.py:function"),
    ("python", "superd_no_such_module_x:f",
     "cannot import superd_no_such_module_x: ModuleNotFoundError: No module named "
     "'superd_no_such_module_x'"),
    ("python", "os:no_such_function", "os has no function 'no_such_function'"),
    ("python", "os:sep", "os has no function 'sep'"),
    ("user", "superd_no_such_user", "no such user 'superd_no_such_user'"),
    ("user", "99999999999999999999", "no such user 99999999999999999999"),
    ("group", "superd_no_such_group", "no such group 'superd_no_such_group'"),
    ("umask", "01000", "512 is out of range (0 to 511)"),
    ("umask", '"0899"', "expected a whole number, not '0899'"),
    ("umask", "-1", "-1 is out of range (0 to 511)"),
    ("nice", "20", "20 is out of range (-20 to 19)"),
    ("nice", "-21", "-21 is out of range (-20 to 19)"),
    ("nice", "high", "expected a whole number, not 'high'"),
    ("nice", "1.5", "expected a whole number, not 1.5"),
    ("cwd", "srv", "expected an absolute path, not 'srv'"),
    ("cwd", "/superd/no/such/dir", "/superd/no/such/dir: no such directory"),
    ("env", "[A]", "expected a mapping of NAME: value"),
    ("env", "{1A: x}", "1A: expected NAME: value with a plain value"),
    ("env", "{A: [1]}", "A: expected NAME: value with a plain value"),
    ("env", "{A: null}", "A: expected NAME: value with a plain value"),
    ("passenv", "[1BAD]", "'1BAD' is not a variable name"),
    ("passenv", "{A: b}", "expected a list of variable names"),
    ("passenv", "['']", "expected a list of variable names"),
    ("rlimits", "{stak: 1}", "unknown limit 'stak' (expected nofile, nproc, as, cpu, core, "
                              "fsize, data, stack, rss, memlock, msgqueue, nice, rtprio, rttime, "
                              "sigpending, locks)"),
    ("rlimits", "{nofile: -1}", "-1 is out of range (0 to 4611686018427387904)"),
    ("rlimits", "{nofile: lots}", "expected a whole number, not 'lots'"),
    ("rlimits", "[nofile]", "expected a mapping of nofile, nproc, as, cpu, core, fsize, data, "
                            "stack, rss, memlock, msgqueue, nice, rtprio, rttime, sigpending, "
                            "locks"),
    ("instances", "0", "0 is out of range (1 to 1000000)"),
    ("instances", "many", "expected a whole number, not 'many'"),
    ("instances", "true", "expected a whole number, not True"),
    ("on_limit", "drop", "expected one of queue, refuse, not 'drop'"),
    ("per_source", "-1", "-1 is out of range (1 to 1000000)"),
    ("rate", "10", "expected N/s or N/min, not 10"),
    ("rate", "0/s", "expected N/s or N/min, not '0/s'"),
    ("rate", "5/hour", "expected N/s or N/min, not '5/hour'"),
    ("rate", "1000001/s", "expected N/s or N/min, not '1000001/s'"),
    ("only_from", "[10.0.0.0/33]",
     "'10.0.0.0/33' is not an IP address, a CIDR, a host name or a .domain"),
    ("only_from", "[host_name!]",
     "'host_name!' is not an IP address, a CIDR, a host name or a .domain"),
    ("only_from", "['']", "expected a list of addresses, CIDRs, host names or .domains"),
    ("only_from", "5", "expected a list of addresses, CIDRs, host names or .domains"),
    ("no_access", "[300.1.1.1]",
     "'300.1.1.1' is not an IP address, a CIDR, a host name or a .domain"),
    ("timeout", "0", "expected a number of seconds greater than 0, not 0"),
    ("timeout", "-1", "expected a number of seconds greater than 0, not -1"),
    ("timeout", "true", "expected a number of seconds greater than 0, not True"),
    ("timeout", ".inf", "expected a number of seconds greater than 0, not inf"),
    ("timeout", "soon", "expected a number of seconds greater than 0, not 'soon'"),
    ("backlog", "0", "0 is out of range (1 to 65535)"),
    ("backlog", "65536", "65536 is out of range (1 to 65535)"),
    ("backlog", "[1, 2]", "expected a whole number, not [1, 2]"),
    ("stderr", "file", "expected one of log, socket, null, not 'file'"),
    ("disabled", '"yes"', "expected true or false, not 'yes'"),
    ("log_on_success", "[pid, attempt]", "expected one of pid, host, exit, duration, traffic, "
                                         "userid, not 'attempt'"),
    ("log_on_success", "5", "expected a list of pid, host, exit, duration, traffic, userid"),
    ("log_on_failure", "[attempt, pid]", "expected one of host, attempt, userid, not 'pid'"),
    ("colour", "blue", "unknown key"),
]


@pytest.mark.parametrize("key, text, message", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_a_bad_value_is_named_by_file_line_and_key(tmp_path, key, text, message):
    assert problems(tmp_path, service_with(key, text)) == [
        f"{tmp_path}/superd.yaml:5: services.s.{key}: {message}"]


def test_stderr_null_as_documented_loads(tmp_path):
    assert one_service(tmp_path, "stderr", "null").stderr == "null"


@pytest.mark.parametrize("key, text", [("user", "true"), ("group", "false"), ("group", "yes")])
def test_a_boolean_is_not_a_user_or_group(tmp_path, key, text):
    (line,) = problems(tmp_path, service_with(key, text))
    assert line.startswith(f"{tmp_path}/superd.yaml:5: services.s.{key}: no such ")


BAD_LISTEN = [
    ("0", "port '0' is not a number from 1 to 65535"),
    ("65536", "port '65536' is not a number from 1 to 65535"),
    ('"127.0.0.1:99999"', "port '99999' is not a number from 1 to 65535"),
    ('"127.0.0.1:"', "port '' is not a number from 1 to 65535"),
    ('"::1:7"', "'::1' is not an IPv4 address (write IPv6 as [ADDR]:PORT)"),
    ('"10.0.0.300:7"', "'10.0.0.300' is not an IPv4 address (write IPv6 as [ADDR]:PORT)"),
    ('"[::g]:7"', "'::g' is not an IPv6 address"),
    ('":7"', "expected PORT, HOST:PORT or [V6]:PORT, not ':7'"),
    ("7.5", "expected PORT, HOST:PORT or [V6]:PORT, not 7.5"),
    ("true", "expected PORT, HOST:PORT or [V6]:PORT, not True"),
    ("/run/x.sock", "a unix socket needs protocol unix, unix-dgram or unix-seqpacket, not tcp"),
    ("[]", "expected at least one address"),
    ('[7, "1.2.3:1"]', "entry 2: '1.2.3' is not an IPv4 address (write IPv6 as [ADDR]:PORT)"),
]


@pytest.mark.parametrize("text, message", BAD_LISTEN, ids=[b[0] for b in BAD_LISTEN])
def test_a_bad_listen_address(tmp_path, text, message):
    assert problems(tmp_path, service_with("listen", text, base="internal: echo")) == [
        f"{tmp_path}/superd.yaml:5: services.s.listen: {message}"]


def test_a_unix_protocol_needs_a_path(tmp_path):
    assert problems(tmp_path, service_with("protocol", "unix-dgram", base="internal: echo")) == [
        f"{tmp_path}/superd.yaml:3: services.s.listen: protocol unix-dgram needs an absolute "
        "socket path or an abstract @name, not 7"]


BAD_EXEC = [
    ("/bin/cat", "exec", "expected an argv list, e.g. [/usr/bin/cat]"),
    ("[]", "exec", "expected an argv list, e.g. [/usr/bin/cat]"),
    ("[/bin/cat, [x]]", "exec", "every argument must be a string"),
    ("[/bin/cat, true]", "exec", "every argument must be a string"),
    ("[cat, -u]", "exec", "'cat' is not an absolute path (or give program)"),
    ("[/superd/no/such/prog]", "exec", "/superd/no/such/prog: no such executable file"),
]


@pytest.mark.parametrize("text, key, message", BAD_EXEC, ids=[b[0] for b in BAD_EXEC])
def test_a_bad_exec(tmp_path, text, key, message):
    assert problems(tmp_path, service_with("exec", text, base="listen: 7")) == [
        f"{tmp_path}/superd.yaml:5: services.s.{key}: {message}"]


def test_a_file_that_is_not_executable_is_no_program(tmp_path):
    write(tmp_path / "prog", "#!/bin/sh\n")
    assert problems(tmp_path, service_with("exec", f"[{tmp_path}/prog]", base="listen: 7")) == [
        f"{tmp_path}/superd.yaml:5: services.s.exec: {tmp_path}/prog: no such executable file"]


def test_a_missing_program_is_blamed_on_program(tmp_path):
    assert problems(tmp_path, service_with("program", "/superd/no/such", base="exec: [x]")) == [
        f"{tmp_path}/superd.yaml:5: services.s.program: /superd/no/such: no such executable "
        "file"]


@pytest.mark.parametrize("lines, where, message", [
    (["exec: [/bin/cat]", "internal: echo"], "4: services.s.internal",
     "give exactly one of exec, internal, python, redirect or sensor"),
    (["listen: 7", "exec: [/bin/cat]", "internal: echo"], "5: services.s.internal",
     "give exactly one of exec, internal, python, redirect or sensor"),
    (["listen: 7", "internal: echo", "program: /bin/cat"], "5: services.s.program",
     "program goes with exec"),
    (["listen: 7", "protocol: udp", "exec: [/bin/cat]"], "4: services.s.protocol",
     "protocol udp with wait: false is only for internal services; use wait: true"),
    (["listen: 7", "protocol: udp", "wait: false", "exec: [/bin/cat]"], "5: services.s.wait",
     "protocol udp with wait: false is only for internal services; use wait: true"),
    (["listen: 7", "wait: true", "exec: [/bin/cat]", "only_from: 127.0.0.1"],
     "6: services.s.only_from", "only_from cannot apply to a wait: true stream service: its "
     "handler accepts the connections, superd never sees them"),
    (["listen: 7", "wait: true", "exec: [/bin/cat]", "per_source: 2"],
     "6: services.s.per_source", "per_source cannot apply to a wait: true stream service: "
     "its handler accepts the connections, superd never sees them"),
], ids=["two-kinds", "two-kinds-2", "program-alone", "udp-nowait", "udp-wait-false", "wait-acl",
        "wait-per-source"])
def test_rules_across_keys_blame_one_key(tmp_path, lines, where, message):
    text = "services:\n  s:\n" + "".join(f"    {x}\n" for x in lines)
    assert problems(tmp_path, text) == [f"{tmp_path}/superd.yaml:{where}: {message}"]


def test_a_wait_datagram_service_may_have_access_rules(tmp_path):
    """superd reads each datagram's source itself, so only_from applies there."""
    (svc,) = table(tmp_path, """\
        services:
          s: {listen: 7, protocol: udp, wait: true, exec: [/bin/cat], only_from: 127.0.0.1}
        """).services
    assert svc.wait and svc.only_from == (ipaddress.ip_network("127.0.0.1/32"),)


@pytest.mark.parametrize("text, where, message", [
    ("services:\n  'bad name!': {listen: 7, internal: echo}\n", "2: services.bad name!",
     "a service name is letters, digits, '.', '_' and '-'"),
    ("services:\n  s: {listen: 7}\n", "2: services.s",
     "give exactly one of exec, internal, python, redirect or sensor"),
    ("services:\n  s: 5\n", "2: services.s", "expected a mapping of service keys"),
    ("services:\n  s:\n    listen: 7\n    listen: 8\n    internal: echo\n",
     "4: services.s.listen", "given twice"),
    ("services: [a]\n", "1: services", "expected a mapping"),
])
def test_bad_service_entries(tmp_path, text, where, message):
    assert problems(tmp_path, text) == [f"{tmp_path}/superd.yaml:{where}: {message}"]


def test_every_problem_is_reported_in_file_order(tmp_path):
    lines = problems(tmp_path, """\
        services:
          b:
            listen: 0
            internal: echo
          a:
            listen: 7
            internal: echo
            backlog: 0
            stderr: file
        """)
    f = f"{tmp_path}/superd.yaml"
    assert lines == [f"{f}:3: services.b.listen: port '0' is not a number from 1 to 65535",
                     f"{f}:8: services.a.backlog: 0 is out of range (1 to 65535)",
                     f"{f}:9: services.a.stderr: expected one of log, socket, null, not 'file'"]


# -- settings --------------------------------------------------------------------------------


def test_settings_defaults(tmp_path):
    assert table(tmp_path, "services: {}\n").settings == Settings()
    assert Settings() == Settings("/dev/log", "daemon", "superd", "/run/superd/control.sock",
                                  1000, 5.0)


def test_settings_that_load(tmp_path):
    got = table(tmp_path, f"""\
        settings:
          syslog: {{address: {tmp_path}/log, facility: local3, ident: inetd}}
          control_socket: {tmp_path}/ctl
          max_children: 50
          shutdown_grace: 0.5
        """).settings
    assert got == Settings(f"{tmp_path}/log", "local3", "inetd", f"{tmp_path}/ctl", 50, 0.5)


@pytest.mark.parametrize("text, value", [
    ("yes", "yes"), ("no", "no"), ("'no'", "no"), ("auto", "auto"), ("true", "yes")])
def test_cgroups_setting(tmp_path, text, value):
    """YAML reads a bare yes or no as a boolean: both spellings mean the same."""
    assert table(tmp_path, f"settings:\n  cgroups: {text}\n").settings.cgroups == value


@pytest.mark.parametrize("text, where, message", [
    ("colour: blue", "settings.colour",
     "unknown key (expected syslog, control_socket, max_children, shutdown_grace, stop, "
     "drain_timeout, read_timeout, max_sessions, idle_timeout, max_buffered, cgroups)"),
    ("cgroups: maybe", "settings.cgroups", "expected one of auto, yes, no, not 'maybe'"),
    ("stop: later", "settings.stop", "expected one of terminate, drain, leave, not 'later'"),
    ("control_socket: ctl.sock", "settings.control_socket",
     "expected an absolute path, not 'ctl.sock'"),
    ("max_children: 0", "settings.max_children", "0 is out of range (1 to 1000000)"),
    ("shutdown_grace: 0", "settings.shutdown_grace",
     "expected a number of seconds greater than 0, not 0"),
    ("syslog: /dev/log", "settings.syslog", "expected a mapping of address, facility, ident"),
    ("syslog: {facility: local9}", "settings.syslog.facility", "unknown facility 'local9'"),
    ("syslog: {address: dev/log}", "settings.syslog.address",
     "expected the absolute path of a unix socket"),
    ("syslog: {port: 514}", "settings.syslog.port",
     "expected address, facility or ident, as a string"),
    ("syslog: {ident: ''}", "settings.syslog.ident",
     "expected address, facility or ident, as a string"),
])
def test_bad_settings(tmp_path, text, where, message):
    assert problems(tmp_path, f"settings:\n  {text}\n") == [
        f"{tmp_path}/superd.yaml:2: {where}: {message}"]


# -- the table as a whole --------------------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("- a\n", "1: the table must be a mapping (settings, services...)"),
    ("servces: {}\n", "1: servces: unknown key (expected settings, defaults, include, services)"),
    ("settings: [1]\n", "1: settings: expected a mapping"),
])
def test_bad_top_level(tmp_path, text, message):
    assert problems(tmp_path, text) == [f"{tmp_path}/superd.yaml:{message}"]


def test_an_empty_table_loads_with_no_service(tmp_path):
    assert table(tmp_path, "").services == ()


def test_defaults_apply_to_every_service_and_a_service_overrides_them(tmp_path):
    t = table(tmp_path, """\
        defaults:
          instances: 5
          log_on_success: []
        services:
          a: {listen: 7, internal: echo}
          b: {listen: 8, internal: echo, instances: 2}
        """)
    a, b = t.services
    assert (a.instances, b.instances) == (5, 2)
    assert a.log_on_success == b.log_on_success == frozenset()


@pytest.mark.parametrize("key", ["listen", "protocol", "exec", "program", "internal", "python",
                                 "colour"])
def test_defaults_may_not_say_what_a_service_is(tmp_path, key):
    lines = problems(tmp_path, f"defaults:\n  {key}: x\nservices: {{}}\n")
    assert lines == [f"{tmp_path}/superd.yaml:2: defaults.{key}: not a key defaults may set"]


def test_a_bad_default_is_blamed_on_the_defaults_line(tmp_path):
    lines = problems(tmp_path, """\
        defaults:
          backlog: 0
        services:
          a: {listen: 7, internal: echo}
        """)
    assert lines == [f"{tmp_path}/superd.yaml:2: defaults.backlog: 0 is out of range "
                     "(1 to 65535)"]


def test_a_bad_default_is_blamed_on_the_main_file_for_an_included_service(tmp_path):
    write(tmp_path / "b.yaml", "services:\n  b: {listen: 8, internal: echo}\n")
    assert problems(tmp_path, "defaults: {backlog: 0}\ninclude: [b.yaml]\n") == [
        f"{tmp_path}/superd.yaml:1: defaults.backlog: 0 is out of range (1 to 65535)"]


def test_a_bad_default_is_reported_once(tmp_path):
    lines = problems(tmp_path, """\
        defaults:
          backlog: 0
        services:
          a: {listen: 7, internal: echo}
          b: {listen: 8, internal: echo}
          c: {listen: 9, internal: echo}
        """)
    assert len(lines) == 1, lines


def test_include_adds_the_services_of_each_file_it_matches(tmp_path):
    (tmp_path / "conf.d").mkdir()
    write(tmp_path / "conf.d" / "a.yaml", "services:\n  a: {listen: 7, internal: echo}\n")
    write(tmp_path / "conf.d" / "b.yaml", "services:\n  b: {listen: 8, internal: echo}\n"
                                          "include: [../more.yaml]\n")
    write(tmp_path / "more.yaml", "services:\n  c: {listen: 9, internal: echo}\n")
    t = table(tmp_path, """\
        defaults: {backlog: 9}
        include: conf.d/*.yaml
        services:
          main: {listen: 10, internal: echo}
        """)
    assert [s.name for s in t.services] == ["main", "a", "b", "c"]
    assert {s.backlog for s in t.services} == {9}, "defaults hold in included files too"
    assert t.services[3].where == f"{tmp_path}/more.yaml:2"


def test_a_glob_that_matches_nothing_is_no_error_but_a_missing_file_is(tmp_path):
    assert table(tmp_path, "include: [conf.d/*.yaml]\n").services == ()
    assert problems(tmp_path, "include: [gone.yaml]\n") == [
        f"{tmp_path}/superd.yaml:1: include[0]: {tmp_path}/gone.yaml: no such file"]


@pytest.mark.parametrize("text, where, message", [
    ("include: 5\n", "1: include", "expected a list of file globs"),
    ("include: [5]\n", "1: include[0]", "expected a file glob"),
])
def test_bad_include(tmp_path, text, where, message):
    assert problems(tmp_path, text) == [f"{tmp_path}/superd.yaml:{where}: {message}"]


def test_an_include_loop_is_named(tmp_path):
    write(tmp_path / "b.yaml", "include: [superd.yaml]\n")
    assert problems(tmp_path, "include: [b.yaml]\n") == [
        f"{tmp_path}/b.yaml:1: include[0]: include loop: {tmp_path}/superd.yaml includes a "
        "file that includes it"]


def test_an_included_file_holds_services_and_includes_only(tmp_path):
    write(tmp_path / "b.yaml", "settings: {max_children: 5}\nservices: {}\n")
    assert problems(tmp_path, "include: [b.yaml]\n") == [
        f"{tmp_path}/b.yaml:1: settings: an included file may only hold services and include"]


def test_an_included_file_is_a_mapping(tmp_path):
    write(tmp_path / "c.yaml", "- 1\n")
    assert problems(tmp_path, "include: [c.yaml]\n") == [
        f"{tmp_path}/c.yaml:1: an included file must be a mapping"]


def test_a_service_defined_twice_names_the_first(tmp_path):
    write(tmp_path / "b.yaml", "services:\n  echo: {listen: 8, internal: echo}\n")
    assert problems(tmp_path, """\
        include: [b.yaml]
        services:
          echo: {listen: 7, internal: echo}
        """) == [f"{tmp_path}/b.yaml:2: services.echo: service defined twice (first at "
                 f"{tmp_path}/superd.yaml:3)"]


# -- addresses that clash --------------------------------------------------------------------


def two(first: str, second: str, protocol: str = "tcp") -> str:
    """Services a and b; b's listen is on line 5."""
    return f"""\
services:
  a: {{listen: {first}, internal: echo, protocol: {protocol}}}
  b:
    internal: echo
    listen: {second}
    protocol: {protocol}
"""


@pytest.mark.parametrize("first, second, what", [
    ("7", "7", "the same address"),
    ('"127.0.0.1:7"', '"127.0.0.1:7"', "the same address"),
    ('"0.0.0.0:7"', '"127.0.0.1:7"', "an overlapping address"),
    ('"127.0.0.1:7"', '"0.0.0.0:7"', "an overlapping address"),
    ("7", '"127.0.0.1:7"', "an overlapping address"),  # dual stack takes IPv4 too
    ("7", '"[::1]:7"', "an overlapping address"),
    ('"[::]:7"', '"[::1]:7"', "an overlapping address"),
])
def test_two_services_on_one_address_are_refused(tmp_path, first, second, what):
    lines = problems(tmp_path, two(first, second))
    assert lines == [f"{tmp_path}/superd.yaml:5: services.b.listen[0]: {second.strip(chr(34))} "
                     f"is {what} as services.a ({first.strip(chr(34))}, "
                     f"{tmp_path}/superd.yaml:2)"]


@pytest.mark.parametrize("first, second", [
    ('"127.0.0.1:7"', '"127.0.0.2:7"'),
    ('"[::]:7"', '"127.0.0.1:7"'),  # [::] is IPv6 only
    ('"[::]:7"', '"0.0.0.0:7"'),
    ("7", "8"),
])
def test_addresses_that_do_not_clash(tmp_path, first, second):
    assert len(table(tmp_path, two(first, second)).services) == 2


def test_tcp_and_udp_share_a_port_and_a_disabled_service_clashes_with_nothing(tmp_path):
    t = table(tmp_path, """\
        services:
          t: {listen: 7, internal: echo}
          u: {listen: 7, internal: echo, protocol: udp}
          off: {listen: 7, internal: echo, disabled: true}
        """)
    assert [s.name for s in t.enabled] == ["t", "u"]


def test_the_clash_names_the_list_entry(tmp_path):
    lines = problems(tmp_path, two("[8, 7]", "[9, 7]"))
    assert lines == [f"{tmp_path}/superd.yaml:5: services.b.listen[1]: 7 is the same address "
                     f"as services.a (7, {tmp_path}/superd.yaml:2)"]


def test_one_unix_path_for_two_services_is_refused(tmp_path):
    lines = problems(tmp_path, two(f"{tmp_path}/s.sock", f"{tmp_path}/s.sock", "unix"))
    assert lines == [f"{tmp_path}/superd.yaml:5: services.b.listen[0]: {tmp_path}/s.sock is "
                     f"the same address as services.a ({tmp_path}/s.sock, "
                     f"{tmp_path}/superd.yaml:2)"]


def test_a_unix_stream_and_a_unix_datagram_service_cannot_share_a_path(tmp_path):
    path = f"{tmp_path}/s.sock"
    lines = problems(tmp_path, f"""\
        services:
          a: {{listen: {path}, protocol: unix, internal: echo}}
          b: {{listen: {path}, protocol: unix-dgram, internal: echo}}
        """)
    assert len(lines) == 1 and "services.b.listen" in lines[0], lines


@pytest.mark.parametrize("entry, message", [
    ("listen: 7", "give exactly one of exec, internal, python, redirect or sensor"),
], ids=["no-kind"])
def test_a_problem_with_a_whole_service_names_the_line_of_its_name(tmp_path, entry, message):
    assert problems(tmp_path, f"services:\n  s:\n    {entry}\n") == [
        f"{tmp_path}/superd.yaml:2: services.s: {message}"]


def test_a_services_place_is_the_line_of_its_name(tmp_path):
    (svc,) = table(tmp_path, "services:\n  s:\n    listen: 7\n    internal: echo\n").services
    assert svc.where == f"{tmp_path}/superd.yaml:2"


def test_host_names_from_defaults_are_never_dropped_where_they_cannot_be_looked_up(tmp_path):
    """Dropping a name from a UDP or wait service's no_access (or a names-only only_from) would
    let the hosts in that the table keeps out: that service is refused instead."""
    for key in ("no_access", "only_from"):
        got = problems(tmp_path, f"""\
            defaults:
              {key}: [127.0.0.9, bad.example.com]
            services:
              t: {{listen: "127.0.0.1:7", internal: echo}}
              u: {{listen: "127.0.0.1:7", protocol: udp, internal: echo}}
            """)
        assert len(got) == 1 and "services.u: " + key in got[0] \
            and "from defaults names hosts" in got[0], got


def test_userid_from_defaults_applies_where_ident_can_ask(tmp_path):
    t = table(tmp_path, """\
        defaults:
          log_on_success: [pid, userid]
        services:
          t: {listen: "127.0.0.1:7", exec: [/bin/cat]}
          u: {listen: "127.0.0.1:7", protocol: udp, internal: echo}
          w: {listen: "127.0.0.1:8", wait: true, exec: [/bin/cat]}
          quiet: {listen: "127.0.0.1:9", exec: [/bin/cat], ident: false}
        """)
    by = {s.name: s for s in t.services}
    assert "userid" in by["t"].log_on_success and by["t"].ident == "on"
    for name in ("u", "w", "quiet"):
        assert "userid" not in by[name].log_on_success and "pid" in by[name].log_on_success
    got = problems(tmp_path, """\
        services:
          quiet: {listen: "127.0.0.1:9", exec: [/bin/cat], ident: false,
                  log_on_success: [userid]}
        """)
    assert len(got) == 1 and "services.quiet.log_on_success" in got[0] \
        and "userid needs ident" in got[0], got


def test_the_shipped_tables_load_without_a_problem():
    """config/superd.yaml is the README's first command: every service in it must run.
    (Its `defaults: instances` once failed every UDP internal service, which has none.)"""
    here = os.path.join(os.path.dirname(__file__), "..", "..", "config")
    for name in ("superd.yaml", "system.yaml"):
        t = load_table(os.path.join(here, name))
        assert not t.problems and not t.failed, (name, [str(p) for p in t.problems])
    t = load_table(os.path.join(here, "superd.yaml"))
    by = {s.name: s for s in t.services}
    assert by["echo"].instances == 50 and by["echo-u"].instances is None
