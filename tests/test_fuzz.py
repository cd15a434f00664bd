"""Hostile input: the table loader, and every internal service on the wire.

The loader (`superd.config.load_table`, and `superd check` for the cases that could hang or
eat memory) is fed random tables, mutated YAML, random include graphs and a list of known
nasty files (alias bombs, deep nesting, huge numbers, wrong types, unicode, include loops,
missing and unreadable includes, a FIFO). For every input it must either load or raise
TableError whose problems each print as one line `FILE:LINE: ...` (or `FILE: ...`), encodable
as UTF-8; never another exception, never a hang (a hard time bound per input), never a
memory blow-up (a hard address-space bound per input).

Then random bytes at echo, discard, chargen, daytime and time over TCP and UDP: each answers
as its RFC says whatever it is sent, and the daemon neither dies nor leaks.

CI runs modest example counts, derandomized (reproducible). The long version (SUPERD_LONG=1)
runs many more examples with fresh randomness:

    SUPERD_LONG=1 .venv/bin/python -m pytest -p no:cacheprovider tests/test_fuzz.py
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import reliability_lib as rl
import superd_testlib as lib
import yaml
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from superd.config import load_table
from superd.yamlsrc import TableError

LONG = rl.LONG


def fuzz_settings(short: int, long: int) -> settings:
    # CI: no shrinking (a failure is reported as found, in seconds rather than minutes)
    phases = list(Phase) if LONG else [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(max_examples=long if LONG else short, deadline=timedelta(seconds=5),
                    derandomize=not LONG, database=None, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


TIME_BOUND = 10.0  # seconds for one table, however hostile (a 4 MB benign one takes ~2 s)
MEMORY_BOUND = 384 << 20  # address space for `superd check` of one table
INPROCESS_HEADROOM = 384 << 20  # address space the in-process loader may add


# --------------------------------------------------------------------------------------------
# running the loader under bounds


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"the loader ran for more than {TIME_BOUND}s")


@contextlib.contextmanager
def bounded():
    """A hard time bound (SIGALRM) and a hard memory bound (RLIMIT_AS) for in-process loads."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = int(rl.proc_status(os.getpid())["VmSize"].split()[0]) * 1024
    limit = vm + INPROCESS_HEADROOM
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    old = signal.signal(signal.SIGALRM, _alarm)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    signal.setitimer(signal.ITIMER_REAL, TIME_BOUND)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old)


OUTSIDE_FILES = ["/dev/zero", "/dev/null", "/etc/passwd"]  # includes some tests point at


def problem_re(files: list[str], folder: str | None = None) -> re.Pattern:
    """FILE is one of `files`, or any path under `folder` ("/": any absolute path, for tables
    whose random includes can reach anywhere)."""
    names = [re.escape(f) for f in files + OUTSIDE_FILES]
    if folder:
        names.append(re.escape(folder) + r"[^:\n]*")
    return re.compile(r"^(?:" + "|".join(names) + r")(?::\d+)?: ")


def check_problems(problems: list, files: list[str], folder: str | None) -> None:
    """Every problem is one line `FILE[:LINE]: ...`, printable as UTF-8."""
    assert problems, "TableError without any problem"
    rx = problem_re(files, folder)
    for p in problems:
        text = str(p)
        assert "\n" not in text and "\r" not in text, f"a problem on several lines: {text!r}"
        assert rx.match(text), f"not FILE:LINE: ...: {text!r}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise AssertionError(f"a problem `superd check` cannot print ({e}): {text!r}") from None


def load_bounded(path: Path, folder: Path | str | None = None) -> object:
    """load_table(path) in-process under bounds; the Table, or the list of problems."""
    try:
        with bounded():
            return load_table(str(path))
    except TableError as e:
        check_problems(e.problems, [str(path)], str(folder or path.parent))
        return e.problems
    except Hang as e:
        raise AssertionError(f"{path}: {e}") from None
    except MemoryError:
        raise AssertionError(f"{path}: the loader needed more than "
                             f"{INPROCESS_HEADROOM >> 20} MB") from None


def check_cli(path: Path, *, timeout: float = TIME_BOUND,
              memory: int = MEMORY_BOUND) -> tuple[int, str]:
    """`superd check -c PATH` with a time and an address-space bound: (exit code, stdout)."""
    def limits():
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    t0 = time.monotonic()
    try:
        r = subprocess.run([lib.PY, "-m", "superd", "check", "-c", str(path)], cwd=lib.REPO,
                           capture_output=True, timeout=timeout, preexec_fn=limits,
                           env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`superd check` did not finish within {timeout}s on {path}") \
            from None
    took = time.monotonic() - t0
    out = r.stdout.decode("utf-8", "replace")
    err = r.stderr.decode("utf-8", "replace")
    assert "Traceback" not in out + err and "Error" not in err, (
        f"`superd check` crashed after {took:.1f}s (exit {r.returncode}):\n{err[-3000:]}")
    assert r.returncode in (0, 1), (r.returncode, out, err)
    if r.returncode == 0:
        assert re.fullmatch(re.escape(str(path)) + r": ok, \d+ services\n", out), out
    else:
        rx = problem_re([str(path)], str(path.parent))
        lines = out.splitlines()
        assert lines, f"exit 1 and nothing said: {err!r}"
        for line in lines:
            assert rx.match(line), f"not FILE:LINE: ...: {line!r}\n--- all ---\n{out[:3000]}"
    return r.returncode, out


@pytest.fixture(scope="module")
def fuzzdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def fresh(fuzzdir: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=fuzzdir))


# --------------------------------------------------------------------------------------------
# strategies


SERVICE_KEYS = ["listen", "protocol", "wait", "exec", "program", "internal", "user", "group",
                "umask", "nice", "cwd", "env", "passenv", "rlimits", "instances", "on_limit",
                "per_source", "rate", "only_from", "no_access", "timeout", "backlog", "stderr",
                "disabled", "log_on_success", "log_on_failure"]  # `python` imports: left out
WORDS = ["tcp", "udp", "unix", "unix-dgram", "echo", "discard", "chargen", "daytime", "time",
         "unlimited", "queue", "refuse", "log", "socket", "null", "nobody", "root", "daemon",
         "127.0.0.1:7", "[::1]:7", "7", "0.0.0.0:7", "[::]:7", "/run/x.sock", "/bin/cat",
         "/nonexistent", "5/s", "10/min", "0/s", "022", "0999", "0.0.0.0/0", "::/0",
         "10.0.0.0/33", "/tmp", "", " ", "\t", "~", "yes", "no", "on", "off", "pid", "host",
         "exit", "duration", "traffic", "attempt", "nofile", "as", "cpu", "core", "fsize",
         "nproc", "PATH", "HOME", "1e3", "0x10", "-1", "65536", "\0", "\ud800", "\u202e",
         "\U0001f600", "é", "ß", "\x85", "\u2028"]
NUMBERS = [0, -1, 1, 7, 65535, 65536, 2**31, 2**63, -2**63, 10**30, 10**400, -10**400,
           0.5, 1e300, float("inf"), float("-inf"), float("nan")]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.sampled_from(NUMBERS),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(st.characters(blacklist_categories=()), max_size=30),
    st.sampled_from(WORDS),
)
names = st.one_of(st.sampled_from(SERVICE_KEYS), st.sampled_from(WORDS),
                  st.text(st.characters(blacklist_categories=()), max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12)
services = st.dictionaries(
    st.one_of(st.sampled_from(["echo", "a", "b-1", "x.y", "off", "123"]), names),
    st.one_of(
        st.dictionaries(st.sampled_from(SERVICE_KEYS) | names, values, max_size=8),
        st.fixed_dictionaries({"listen": st.sampled_from(["127.0.0.1:7", "7", "[::1]:7"]),
                               "internal": st.sampled_from(["echo", "time"])},
                              optional={k: values for k in SERVICE_KEYS
                                        if k not in ("listen", "internal")}),
        values),
    max_size=5)
tables = st.one_of(
    st.fixed_dictionaries({"services": services},
                          optional={"settings": st.dictionaries(
                              st.sampled_from(["syslog", "control_socket", "max_children",
                                               "shutdown_grace"]) | names, values,
                              max_size=4),
                              "defaults": st.dictionaries(st.sampled_from(SERVICE_KEYS) | names,
                                                          values, max_size=4),
                              "include": values}),
    values)


def dump(doc: object, unicode: bool, flow: bool | None) -> str:
    return yaml.safe_dump(doc, allow_unicode=unicode, default_flow_style=flow, sort_keys=False)


# --------------------------------------------------------------------------------------------
# the loader: random tables


@fuzz_settings(200, 5000)
@given(doc=tables, unicode=st.booleans(), flow=st.sampled_from([None, False, True]))
def test_loader_random_tables(fuzzdir, doc, unicode, flow):
    try:
        text = dump(doc, unicode, flow)
    except (yaml.YAMLError, UnicodeEncodeError, ValueError):
        assume(False)
    folder = fresh(fuzzdir)
    path = folder / "superd.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    load_bounded(path, "/")
    shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------
# the loader: mutated YAML


CORPUS = [
    (lib.REPO / "config" / "superd.yaml").read_text(),
    """\
settings:
  syslog: {address: /dev/log, facility: daemon, ident: superd}
  control_socket: /run/superd/control.sock
  max_children: 1000
  shutdown_grace: 5
defaults: &defaults
  instances: 64
  per_source: 4
include: [conf.d/*.yaml, other.yaml]
services:
  echo:    {listen: "127.0.0.1:7", internal: echo}
  echo-u:  {listen: "127.0.0.1:7", protocol: udp, internal: echo}
  git:
    listen: ["0.0.0.0:9418", "[::]:9418"]
    exec: [/bin/cat, daemon, --inetd]
    user: nobody
    per_source: 4
    env: {A: 1, B: "two"}
    rlimits: {nofile: 64, core: 0, as: unlimited}
    only_from: [127.0.0.1, "::1", 10.0.0.0/8]
    no_access: [10.1.0.0/16]
    log_on_success: [pid, host, exit, duration, traffic]
  tftp:
    listen: "0.0.0.0:69"
    protocol: udp
    wait: true
    exec: [in.tftpd, -s, /srv/tftp]
    program: /bin/cat
    timeout: 2.5
    rate: 10/s
""",
    """\
x-common: &c {instances: 2, timeout: 5}
services:
  a: {listen: 7001, internal: daytime}
  b:
    listen: /tmp/superd-fuzz.sock
    protocol: unix
    exec: [/bin/cat]
    umask: 022
    nice: 5
    cwd: /tmp
    stderr: socket
    disabled: false
  c: !!map {listen: "[::1]:7003", internal: time}
""",
]
TOKENS = [b"&a ", b"*a", b"<<: *a\n", b"!!binary ", b"!!python/object/apply:os.system [id]",
          b"!!set ", b"!!str ", b"? ", b"- ", b": ", b"{", b"}", b"[", b"]", b",", b"'", b'"',
          b"#", b"|", b">", b"%YAML 1.1\n", b"---\n", b"...\n", b"\t", b"\x00", b"\xef\xbb\xbf",
          b"\xff\xfe", b"\xc3", b"\n", b"    ", b"9" * 5000, b"0x" + b"f" * 5000, b"1e999",
          b"\\ud800", b'"\\ud800"', b"\xe2\x80\xae", b"include: [superd.yaml]\n",
          b"include: ['*']\n", b"include: [missing.yaml]\n"]
mutation = st.tuples(st.sampled_from(["insert", "delete", "replace", "dup-line", "swap-lines",
                                      "indent"]),
                     st.floats(0, 1), st.floats(0, 1),
                     st.one_of(st.sampled_from(TOKENS), st.binary(max_size=16)))


def mutate(data: bytes, ops) -> bytes:
    for kind, x, y, payload in ops:
        n = len(data)
        i = int(x * n)
        j = min(n, i + int(y * 40))
        if kind == "insert":
            data = data[:i] + payload + data[i:]
        elif kind == "delete":
            data = data[:i] + data[j:]
        elif kind == "replace":
            data = data[:i] + payload + data[j:]
        else:
            lines = data.split(b"\n")
            a = int(x * len(lines)) % max(1, len(lines))
            b = int(y * len(lines)) % max(1, len(lines))
            if kind == "dup-line":
                lines.insert(a, lines[a])
            elif kind == "swap-lines":
                lines[a], lines[b] = lines[b], lines[a]
            else:
                lines[a] = b"  " * int(y * 5) + lines[a].lstrip(b" ")
            data = b"\n".join(lines)
    return data


@fuzz_settings(300, 10000)
@given(base=st.sampled_from(range(len(CORPUS))), ops=st.lists(mutation, min_size=1, max_size=6))
def test_loader_mutated_yaml(fuzzdir, base, ops):
    folder = fresh(fuzzdir)
    (folder / "conf.d").mkdir()
    (folder / "conf.d" / "x.yaml").write_text("services:\n  inc: {listen: 7009, "
                                              "internal: echo}\n")
    (folder / "other.yaml").write_text("include: [superd.yaml]\n")
    path = folder / "superd.yaml"
    path.write_bytes(mutate(CORPUS[base].encode(), ops))
    load_bounded(path, "/")
    shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------
# the loader: include graphs


SPECIAL_INCLUDES = ["missing.yaml", "dir", "dir/*", "loop-link", "binary.bin", "notmap.yaml",
                    "writable.yaml", "*.yaml", "f?.yaml", "../*", "", "/etc/passwd",
                    "/dev/null", "empty.yaml", "[", "**", "f0.yaml/x"]


def make_specials(folder: Path) -> None:
    (folder / "dir").mkdir()
    os.symlink("loop-link", folder / "loop-link")
    (folder / "binary.bin").write_bytes(b"\xff\xfe\x00garbage\x80\x81")
    (folder / "notmap.yaml").write_text("- a\n- b\n")
    (folder / "empty.yaml").write_text("")
    (folder / "writable.yaml").write_text("services: {}\n")
    (folder / "writable.yaml").chmod(0o666)


@fuzz_settings(150, 3000)
@given(graph=st.lists(st.tuples(st.lists(st.one_of(st.integers(0, 4),
                                                    st.sampled_from(SPECIAL_INCLUDES)),
                                          max_size=4),
                                 st.sampled_from(["echo", "dup", "bad", "none"]),
                                 st.booleans()),
                       min_size=1, max_size=5))
def test_loader_include_graphs(fuzzdir, graph):
    folder = fresh(fuzzdir)
    make_specials(folder)
    for k, (includes, service, as_string) in enumerate(graph):
        inc = [f"f{x}.yaml" if isinstance(x, int) else x for x in includes]
        doc: dict = {}
        if inc:
            doc["include"] = inc[0] if as_string and len(inc) == 1 else inc
        if service == "echo":
            doc["services"] = {f"s{k}": {"listen": f"127.0.0.1:{7100 + k}", "internal": "echo"}}
        elif service == "dup":
            doc["services"] = {"same": {"listen": f"127.0.0.1:{7200 + k}", "internal": "echo"}}
        elif service == "bad":
            doc["services"] = {f"s{k}": {"listen": "nowhere", "internal": "nothing"}}
        (folder / f"f{k}.yaml").write_text(yaml.safe_dump(doc))
    load_bounded(folder / "f0.yaml", fuzzdir)  # "../*" reaches the neighbours
    shutil.rmtree(folder)


# --------------------------------------------------------------------------------------------
# the loader: known nasty files, through `superd check` (time and memory bounded)


def billion_laughs(kind: str) -> str:
    if kind == "list":
        lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
        lines += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    else:
        lines = ["a0: &a0 {k: lol}"]
        lines += [f"a{i}: &a{i} {{" + ", ".join(f"k{j}: *a{i - 1}" for j in range(9)) + "}"
                  for i in range(1, 10)]
    return "services:\n  x:\n" + "".join(f"    {x}\n" for x in lines)


def every_key_wrong() -> str:
    wrongs = ["[1, 2]", "{a: b}", "true", "null", "9" * 50, "-1", '""', "!!binary aGk=",
              "2001-12-14", ".nan", "\"\\u202e\"", "[[[]]]"]
    out = ["settings:"]
    for k in ("syslog", "control_socket", "max_children", "shutdown_grace"):
        out.append(f"  {k}: {wrongs[len(out) % len(wrongs)]}")
    out.append("services:")
    for i, w in enumerate(wrongs):
        out.append(f"  s{i}:")
        for k in SERVICE_KEYS:
            out.append(f"    {k}: {w}")
    return "\n".join(out) + "\n"


N4 = 4 * 1024 * 1024 - 64  # just under the loader's size limit
NASTY = {
    "alias-bomb-lists": lambda: billion_laughs("list"),
    "alias-bomb-maps": lambda: billion_laughs("map"),
    "alias-self-reference": lambda: "services: &s\n  a: *s\n",
    "alias-recursive-list": lambda: "services:\n  x: &l [*l, *l]\n",
    "deep-flow-nesting": lambda: "services: " + "[" * 200000 + "]" * 200000 + "\n",
    "deep-flow-maps": lambda: "services: " + "{a: " * 50000 + "1" + "}" * 50000 + "\n",
    "deep-block-nesting": lambda: "services:\n" + "".join(
        " " * (i + 1) + f"k{i}:\n" for i in range(2800)),
    "huge-decimal": lambda: ('services:\n  a: {listen: "127.0.0.1:7", internal: echo, '
                             f'instances: {"9" * 6000}}}\n'),
    "huge-hex": lambda: ('services:\n  a: {listen: "127.0.0.1:7", internal: echo, '
                         f'backlog: 0x{"f" * 40000}}}\n'),
    "huge-port": lambda: f'services:\n  a: {{listen: "127.0.0.1:{"9" * 4000}", internal: echo}}\n',
    "huge-float": lambda: 'services:\n  a: {listen: 7, internal: echo, timeout: 1e99999}\n',
    "huge-string": lambda: 'services:\n  a: {listen: 7, internal: "' + "x" * (N4 - 60) + '"}\n',
    "huge-key": lambda: "services:\n  " + "k" * (N4 - 30) + ": 1\n",
    "many-values": lambda: "services: [" + ",".join(["0"] * (N4 // 2 - 8)) + "]\n",
    "many-services": lambda: "services:\n" + "".join(
        f"  s{i}: {{listen: \"127.0.0.1:{1024 + i % 60000}\", internal: echo}}\n"
        for i in range(20000)),
    "over-size-limit": lambda: "# " + "x" * (N4 + 200) + "\n",
    "every-key-wrong": every_key_wrong,
    "wrong-top-level": lambda: "- just\n- a list\n",
    "unicode-names": lambda: ("services:\n  \u0435cho: {listen: 7, internal: echo}\n"
                              "  \U0001f600: {listen: 8, internal: echo}\n"
                              "  \"a\\u202eb\": {listen: 9, internal: echo}\n"
                              "  \"\\0\": {listen: 10, internal: echo}\n"),
    "lone-surrogates": lambda: ('include: ["\\ud800.yaml"]\nservices:\n'
                                '  "\\udc00x": {listen: "127.0.0.1:7", internal: "\\ud800"}\n'),
    "nul-in-values": lambda: ('services:\n  a: {listen: "127.0.0.1:7", exec: ["/bin/cat\\0"]}\n'
                              '  b: {listen: 8, exec: [/bin/cat], cwd: "/tmp\\0"}\n'),
    "python-tags": lambda: ('services:\n  a: {listen: 7, internal: '
                            '!!python/object/apply:os.system ["echo pwned"]}\n'),
    "binary-and-set-tags": lambda: ("services:\n  a: {listen: !!binary aGVsbG8=, internal: echo}\n"
                                    "  b: !!set {listen, internal}\n"),
    "merge-keys": lambda: ("defaults: &d {instances: 2}\nservices:\n"
                           "  a: {<<: *d, listen: 7, internal: echo}\n"),
    "duplicate-keys": lambda: "services:\n  a: {listen: 7, internal: echo}\n  a: {listen: 8}\n",
    "complex-keys": lambda: "services:\n  ? [a, b]\n  : {listen: 7, internal: echo}\n",
    "two-documents": lambda: "services: {}\n---\nservices: {}\n",
    "tabs": lambda: "services:\n\ta: {listen: 7, internal: echo}\n",
    "not-utf8": lambda: b"services:\n  a: {listen: 7, internal: \xff\xfe}\n",
    "bom-utf16": lambda: "services: {}\n".encode("utf-16"),
    "only-nul-bytes": lambda: b"\0" * 1000,
    "include-self": lambda: "include: [superd.yaml]\nservices: {}\n",
    "include-glob-self": lambda: "include: ['*']\nservices: {}\n",
    "include-missing": lambda: "include: [missing.yaml, also/missing/*.yaml]\n",
    "include-directory": lambda: "include: [sub]\n",
    "include-symlink-loop": lambda: "include: [loop-link]\n",
    "include-loop": lambda: "include: [b.yaml]\nservices: {a: {listen: 7, internal: echo}}\n",
    "include-binary": lambda: "include: [garbage.bin]\n",
    "include-dev-zero": lambda: "include: [/dev/zero]\n",
}


def nasty_folder(base: Path, name: str) -> Path:
    folder = base / name
    folder.mkdir()
    (folder / "sub").mkdir()
    os.symlink("loop-link", folder / "loop-link")
    (folder / "b.yaml").write_text("include: [superd.yaml]\nservices: {b: {listen: 8, "
                                   "internal: echo}}\n")
    (folder / "garbage.bin").write_bytes(os.urandom(3000))
    return folder


@pytest.mark.parametrize("name", list(NASTY))
def test_loader_nasty_file(fuzzdir, name):
    """Each nasty table: `superd check` answers (exit 0, or exit 1 with FILE:LINE lines) within
    TIME_BOUND seconds and MEMORY_BOUND bytes of address space, without a traceback."""
    folder = nasty_folder(fuzzdir, name)
    path = folder / "superd.yaml"
    content = NASTY[name]()
    path.write_bytes(content if isinstance(content, bytes) else
                     content.encode("utf-8", "surrogatepass"))
    rc, out = check_cli(path)
    if name != "many-services":  # every other one has at least one mistake
        assert rc == 1, f"{name}: accepted:\n{out}"
    if name.startswith("alias-bomb"):
        assert re.search(r"alias|values", out), out
    if name == "include-loop" or name.startswith("include-self") or name == "include-glob-self":
        assert "loop" in out, out


def test_loader_include_fifo_does_not_hang(fuzzdir):
    """An include that is a FIFO (or any file that never ends) must not hang the loader."""
    folder = nasty_folder(fuzzdir, "fifo")
    os.mkfifo(folder / "pipe.yaml")
    path = folder / "superd.yaml"
    path.write_text("include: [pipe.yaml]\nservices: {a: {listen: 7, internal: echo}}\n")
    rc, out = check_cli(path)
    assert rc == 1 and "pipe.yaml" in out, out


def _load_problems(path: str) -> list[str] | str:
    """In a child running as another user: the problems, or 'ok'."""
    try:
        load_table(path)
    except TableError as e:
        return [str(p) for p in e.problems]
    return "ok"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to load a table as nobody")
def test_loader_unreadable_include():
    """Loaded by a user who cannot read an include (or enter its folder): a FILE problem, not
    a traceback. (Root reads everything, so the loader runs as nobody here.)"""
    folder = rl.world_dir("superd-fuzz-")
    try:
        (folder / "secret.yaml").write_text("services: {s: {listen: 7, internal: echo}}\n")
        (folder / "secret.yaml").chmod(0)
        closed = folder / "closed"
        closed.mkdir(mode=0o700)
        (closed / "t.yaml").write_text("services: {}\n")
        for name, include, culprit in (("a.yaml", "secret.yaml", "secret.yaml"),
                                       ("b.yaml", "closed/t.yaml", "closed/t.yaml")):
            path = folder / name
            path.write_text(f"include: [{include}]\nservices: {{a: {{listen: 8, "
                            "internal: echo}}\n")
            path.chmod(0o644)
            problems = rl.run_as(rl.nobody(), _load_problems, str(path))
            assert problems != "ok"
            check_problems(problems, [str(path)], str(folder))
            assert any(culprit in p for p in problems), problems
    finally:
        shutil.rmtree(folder)


def test_alias_bomb_refused_cheaply(fuzzdir):
    """The classic billion laughs is refused within 2 s and 128 MB of address space."""
    folder = nasty_folder(fuzzdir, "bomb-cheap")
    path = folder / "superd.yaml"
    path.write_text(billion_laughs("list"))
    rc, out = check_cli(path, timeout=5, memory=256 << 20)
    assert rc == 1 and "alias" in out, out


# --------------------------------------------------------------------------------------------
# random bytes at every internal service


INTERNALS = ["echo", "discard", "chargen", "daytime", "time"]


@pytest.fixture(scope="module")
def internals(module_daemon):
    ports = {name: lib.free_port() for name in INTERNALS}
    services = {}
    for name, port in ports.items():
        services[name] = {"listen": f"127.0.0.1:{port}", "internal": name}
        services[f"{name}-u"] = {"listen": f"127.0.0.1:{port}", "protocol": "udp",
                                 "internal": name}
    d = module_daemon(services)
    baseline = rl.settled_snapshot(d)
    discard_client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    discard_client.bind(("127.0.0.1", 0))
    state = {"d": d, "ports": ports, "baseline": baseline, "discard": discard_client,
             "resets": 0, "tcp": 0, "udp": 0}
    yield state
    discard_client.close()


SPECIAL_PAYLOADS = [b"", b"\r\n", b"\r\n" * 5000, b"\xff\xf4\xff\xfd\x06" * 100,
                    b"\x00" * 65536, b"GET / HTTP/1.0\r\n\r\n", bytes(range(256)) * 64,
                    b"\n" * 70000]


def big(low: int, high: int) -> st.SearchStrategy[bytes]:
    """Large payloads, cheap to generate: a random pattern repeated and cut."""
    return st.builds(lambda seed, n: (seed * (n // len(seed) + 1))[:n],
                     st.binary(min_size=1, max_size=256), st.integers(low, high))


payloads = st.one_of(st.binary(max_size=2000), big(60000, 140000),
                     st.sampled_from(SPECIAL_PAYLOADS))


@fuzz_settings(300, 5000)
@given(service=st.sampled_from(INTERNALS), payload=payloads, split=st.integers(1, 7))
def test_random_bytes_tcp(internals, service, payload, split):
    port = internals["ports"][service]
    internals["tcp"] += 1
    with lib.connect("127.0.0.1", port, 15) as s:
        if service == "chargen":
            s.sendall(payload[:4096])  # chargen ignores its input and keeps sending
            got = lib.recv_exact(s, 1 + len(payload) % 9000, 15)
            assert rl.chargen_ok(got), got[:100]
            return
        got = b""
        try:
            step = max(1, len(payload) // split)
            for i in range(0, len(payload), step):
                s.sendall(payload[i:i + step])
            s.shutdown(socket.SHUT_WR)
        except OSError as e:  # EPIPE, ECONNRESET, ENOTCONN
            # daytime and time answer and close at once; more input meets a closed socket
            assert service in ("daytime", "time"), f"{service}: {e!r}"
        try:
            got = lib.recv_until_eof(s, 15, limit=1 << 20)
        except ConnectionResetError:
            assert service in ("daytime", "time") and payload, service
            internals["resets"] += 1
            return
    if service == "echo":
        assert got == payload, f"echo: sent {len(payload)} bytes, got {len(got)}"
    elif service == "discard":
        assert got == b""
    elif service == "daytime":
        assert rl.DAYTIME_RE.match(got), got
    else:
        assert rl.time_ok(got), got


@fuzz_settings(300, 5000)
@given(service=st.sampled_from(INTERNALS),
       payload=st.one_of(st.binary(max_size=1500), big(8000, 65507),
                         st.sampled_from([b"", b"\0" * 65507, b"\n"])))
def test_random_datagrams_udp(internals, service, payload):
    port = internals["ports"][service]
    internals["udp"] += 1
    if service == "discard":
        internals["discard"].sendto(payload, ("127.0.0.1", port))
        return
    r = lib.udp_request("127.0.0.1", port, payload, timeout=5)
    assert r is not None, f"{service}-u: no answer to {len(payload)} bytes"
    got, sender = r
    assert sender[1] == port
    if service == "echo":
        assert got == payload
    elif service == "chargen":
        assert rl.chargen_slice_ok(got), got[:100]
    elif service == "daytime":
        assert rl.DAYTIME_RE.match(got), got
    else:
        assert rl.time_ok(got), got


def test_internals_survived_the_fuzz(internals):
    """After all that: discard answered nothing, the daemon lives, fds are back."""
    d = internals["d"]
    rl.assert_alive(d)
    ok = lib.udp_request("127.0.0.1", internals["ports"]["echo"], b"last")
    assert ok is not None and ok[0] == b"last"
    s = internals["discard"]
    s.setblocking(False)
    with pytest.raises(BlockingIOError):
        s.recvfrom(65536)
    rl.wait_quiet(d)
    rl.wait_fds_back(d, internals["baseline"])
    assert not [x for x in d.lines() if "Traceback" in x or x.startswith("FAIL")]
    print(f"\nFIGURES fuzz-wire: {internals['tcp']} TCP connections, {internals['udp']} "
          f"datagrams, {internals['resets']} resets after daytime/time answered")
