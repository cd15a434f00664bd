"""What superd reads and imports: only what root (or superd's own user) controls.

- Every file superd reads or imports (the table, included files, `FILE.py` and
  `module:function` handlers, the modules those import while loading) and every directory
  above it is refused when anyone else could change it, as sshd's StrictModes does; a sticky
  directory such as /tmp is fine for files of superd's user there. (issue 16, finding 7)
- A swap by another user between the check and the read cannot win.
- A handler module that raises anything while loading, sys.exit() included, is a table error
  of that service; a running superd keeps its table. `superd status|reload|stop` import no
  handler at all. (issue 16, finding 6)
- YAML bombs are refused fast and in little memory.

Most of these need root (to chown files and to act as nobody); they are skipped otherwise.
"""

from __future__ import annotations

import ctypes
import importlib.util
import marshal
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import reliability_lib as rl
import superd_testlib as lib
from superd_testlib import PY, REPO, daemon_env, free_port, tcp_exchange

from superd.config import load_table  # imported here: a child run as nobody cannot read them
from superd.yamlsrc import TableError

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
HANDLER = "def handle(sock, env):\n    sock.sendall(b'hi\\n')\n    return 0\n"


def superd_cli(*args: str, env: dict[str, str] | None = None, user=None,
               timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "superd", *args], cwd=REPO, env=daemon_env(env),
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=rl.as_user(user) if user else None)


def check(table: Path, **kw) -> subprocess.CompletedProcess:
    return superd_cli("check", "-c", str(table), **kw)


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def table_with(folder: Path, services: dict[str, str]) -> Path:
    """A table in `folder` with one python service per entry (name: handler spec)."""
    lines = ["services:"]
    for name, spec in services.items():
        lines += [f"  {name}:", f'    listen: "127.0.0.1:{free_port()}"', f'    python: "{spec}"']
    return write(folder / "superd.yaml", "\n".join(lines) + "\n")


def nobody_owns(path: Path, mode: int | None = None) -> None:
    pw = rl.nobody()
    os.chown(path, pw.pw_uid, pw.pw_gid, follow_symlinks=False)
    if mode is not None:
        path.chmod(mode)


def loosen(path: Path, how: str) -> None:
    if how == "group-writable":
        path.chmod(path.stat().st_mode & 0o7777 | 0o020)
    elif how == "world-writable":
        path.chmod(path.stat().st_mode & 0o7777 | 0o002)
    elif how == "owned-by-nobody":
        nobody_owns(path)


def refused(r: subprocess.CompletedProcess, culprit: Path | str) -> bool:
    out = r.stdout + r.stderr
    return r.returncode == 1 and "Traceback" not in out and bool(
        re.search(re.escape(str(culprit)) + r"\b.*(writable by someone other than|another user's)",
                  out))


HOWS = ["group-writable", "world-writable", "owned-by-nobody"]
MARKER_MODULE = ("import os\nopen({marker!r}, 'a').write(f'{{os.getpid()}} {{os.getsid(0)}}\\n')\n"
                 + HANDLER)


# --------------------------------------------------------------------------------------------
# finding 7: every file and directory on the way


@needs_root
@pytest.mark.parametrize("how", HOWS)
def test_module_function_handler_file_is_checked(tmp_path, how):
    """`module:function`: the module file superd imports as root is checked like FILE.py."""
    marker = tmp_path / "imported"
    module = write(tmp_path / "conf" / "hmod.py", MARKER_MODULE.format(marker=str(marker)))
    table = table_with(tmp_path / "conf", {"py": "hmod:handle"})
    assert check(table).returncode == 0
    marker.unlink()
    loosen(module, how)
    r = check(table)
    assert refused(r, module), f"a {how} module was imported as root:\n{r.stdout}{r.stderr}"
    assert not marker.exists(), "the module ran before it was refused"


@needs_root
@pytest.mark.parametrize("which", ["package-init", "imported-helper", "pycache"])
def test_what_a_handler_imports_while_loading_is_checked(tmp_path, which):
    marker = tmp_path / "ran"
    conf = tmp_path / "conf"
    write(conf / "pkg" / "__init__.py", "")
    write(conf / "pkg" / "sub.py", "import helper\n" + HANDLER)
    helper = write(conf / "helper.py", f"open({str(marker)!r}, 'a').write('helper\\n')\n")
    table = table_with(conf, {"py": "pkg.sub:handle"})
    assert check(table).returncode == 0
    marker.unlink()
    if which == "pycache":
        # A bytecode cache beside the module is never read (it is one more file to trust):
        # an evil one, owned by nobody, changes nothing.
        cache = conf / "__pycache__"
        cache.mkdir(exist_ok=True)
        evil = compile(f"open({str(marker)!r}, 'a').write('evil\\n')\n", str(helper), "exec")
        src = helper.stat()  # a header that matches the source: Python's import would use it
        data = (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little")
                + int(src.st_mtime).to_bytes(4, "little")
                + (src.st_size & 0xFFFFFFFF).to_bytes(4, "little") + marshal.dumps(evil))
        pyc = write(cache / f"helper.{sys.implementation.cache_tag}.pyc", "")
        pyc.write_bytes(data)
        nobody_owns(pyc, 0o666)
        r = check(table)
        assert r.returncode == 0, r.stdout + r.stderr
        assert marker.read_text() == "helper\n", "the bytecode cache was run instead"
        return
    culprit = conf / "pkg" / "__init__.py" if which == "package-init" else helper
    loosen(culprit, "world-writable")
    r = check(table)
    assert refused(r, culprit), r.stdout + r.stderr
    assert not marker.exists() or which == "package-init" and marker.read_text() == ""


@needs_root
@pytest.mark.parametrize("where", ["table-folder", "above-the-table", "handler-folder"])
@pytest.mark.parametrize("how", HOWS)
def test_directories_on_the_way_are_checked(tmp_path, where, how):
    top = tmp_path / "top"
    conf = top / "conf"
    write(conf / "handlers" / "h.py", HANDLER)
    table = table_with(conf, {"py": "handlers/h.py:handle"})
    assert check(table).returncode == 0
    folder = {"table-folder": conf, "above-the-table": top,
              "handler-folder": conf / "handlers"}[where]
    loosen(folder, how)
    r = check(table)
    assert refused(r, folder), f"{how} {where} accepted:\n{r.stdout}{r.stderr}"


@needs_root
def test_sticky_directory_like_tmp(tmp_path):
    """A root-owned sticky directory others may write to (as /tmp): root's files there are
    fine, another user's are not, nor a sticky directory of another user's."""
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    write(sticky / "h.py", HANDLER)
    table = table_with(sticky, {"py": "h.py:handle"})
    r = check(table)
    assert r.returncode == 0, r.stdout + r.stderr

    nobody_owns(sticky / "h.py")
    assert refused(check(table), sticky / "h.py")
    os.chown(sticky / "h.py", 0, 0)

    # a symlink planted there by nobody is another user's entry in a sticky folder
    write(tmp_path / "safe.py", HANDLER)
    link = sticky / "link.py"
    link.symlink_to(tmp_path / "safe.py")
    nobody_owns(link)
    table = table_with(sticky, {"py": "link.py:handle"})
    r = check(table)
    assert r.returncode == 1 and re.search(re.escape(str(link)) + r".*another user's", r.stdout)

    os.unlink(link)
    table = table_with(sticky, {"py": "h.py:handle"})
    nobody_owns(sticky, 0o1777)
    assert refused(check(table), sticky)


@needs_root
def test_symlinks_are_followed_only_through_safe_places(tmp_path):
    """A table symlinked from /etc/superd to where an admin keeps it loads; one whose real
    place others may write to does not, whatever the link's own folder."""
    real = write(tmp_path / "real" / "superd.yaml",
                 f'services:\n  e: {{listen: "127.0.0.1:{free_port()}", internal: echo}}\n')
    link = tmp_path / "etc" / "superd.yaml"
    link.parent.mkdir()
    link.symlink_to(real)
    r = check(link)
    assert r.returncode == 0, r.stdout + r.stderr
    loosen(real.parent, "owned-by-nobody")
    assert refused(check(link), real.parent)


RENAME_EXCHANGE = 2


def _swap_forever(folder: str, a: str, b: str, seconds: float) -> int:
    """As nobody: swap two names in `folder` atomically (renameat2 RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    swaps, end = 0, time.monotonic() + seconds
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    while time.monotonic() < end:
        if libc.renameat2(fd, a.encode(), fd, b.encode(), RENAME_EXCHANGE) == 0:
            swaps += 1
    os.close(fd)
    return swaps


@needs_root
def test_a_swap_by_another_user_never_wins(tmp_path):
    """nobody owns the handler's folder and swaps root's good handler with an evil one as
    fast as it can, while superd loads the table again and again: never once does the evil
    one run (the folder itself is refused: whoever may rename there decides what is read)."""
    import multiprocessing

    folder = rl.world_dir("superd-swap-")
    try:
        marker = tmp_path / "evil-ran"
        write(folder / "h.py", HANDLER)
        write(folder / "evil.py", f"open({str(marker)!r}, 'a').write('x')\n" + HANDLER)
        nobody_owns(folder / "evil.py")
        nobody_owns(folder, 0o755)
        table = write(tmp_path / "superd.yaml",
                      f'services:\n  py: {{listen: "127.0.0.1:{free_port()}", '
                      f'python: "{folder}/h.py:handle"}}\n')
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1, initializer=rl.as_user(rl.nobody())) as pool:
            swapper = pool.apply_async(_swap_forever, (str(folder), "h.py", "evil.py", 4.0))
            results = []
            end = time.monotonic() + 3.0
            while time.monotonic() < end and len(results) < 20 and not marker.exists():
                results.append(check(table))
            assert swapper.get(10) > 0, "the swapper did not run"
        assert not marker.exists(), f"the evil handler ran as root (load {len(results)})"
        for r in results:
            assert refused(r, folder), r.stdout + r.stderr
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _problems(table: str) -> list[str]:
    """load_table as `superd check` runs it: the problems found (in a child, as nobody)."""
    try:
        load_table(table)
    except TableError as e:
        return [str(p) for p in e.problems]
    return []


@needs_root
def test_as_another_user_the_check_is_about_that_user_and_root(tmp_path):
    """superd run by nobody trusts nobody's files and root's, not a third user's, and still
    refuses what nobody's group or others could write. (Forked, not exec'd: the test's
    interpreter lives where nobody cannot go.)"""
    folder = rl.world_dir("superd-asuser-")
    try:
        conf = folder / "conf"
        conf.mkdir()
        write(conf / "mine.py", HANDLER)
        write(conf / "roots.py", HANDLER)
        table = table_with(conf, {"a": "mine.py:handle", "b": "roots.py:handle"})
        for p in (conf, conf / "mine.py", table):
            nobody_owns(p)
        nobody = rl.nobody()
        assert rl.run_as(nobody, _problems, str(table)) == []
        (conf / "mine.py").chmod(0o664)
        problems = rl.run_as(nobody, _problems, str(table))
        assert any(re.search(re.escape(str(conf / "mine.py")) + r".*writable by someone other "
                             rf"than root and uid {nobody.pw_uid}", p) for p in problems), problems
        (conf / "mine.py").chmod(0o644)
        os.chown(conf / "roots.py", 1, 1)  # daemon: neither nobody nor root
        problems = rl.run_as(nobody, _problems, str(table))
        assert any(str(conf / "roots.py") in p and "owner uid 1" in p for p in problems), problems
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# finding 6: a handler that exits (or raises anything) while it loads


EXITS = {
    "sys.exit": "import sys\nsys.exit(3)\n",
    "argparse": "import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n",
    "KeyboardInterrupt": "raise KeyboardInterrupt\n",
    "GeneratorExit": "raise GeneratorExit('bye')\n",
    "BaseException": "class Odd(BaseException):\n    pass\nraise Odd('odd')\n",
}


@pytest.mark.parametrize("kind", ["FILE.py", "module"])
@pytest.mark.parametrize("how", list(EXITS))
def test_handler_that_exits_while_loading_is_a_table_error(tmp_path, kind, how):
    write(tmp_path / "bye.py", EXITS[how] + HANDLER)
    spec = "bye.py:handle" if kind == "FILE.py" else "bye:handle"
    table = table_with(tmp_path, {"good": "ok.py:handle", "bad": spec})
    write(tmp_path / "ok.py", HANDLER)
    r = check(table)
    lines = (r.stdout + r.stderr).splitlines()
    assert r.returncode == 1, f"exit {r.returncode}: {lines}"
    assert any(re.match(rf"{re.escape(str(table))}:\d+: services\.bad\.python: cannot import "
                        r"bye(\.py)?: \S", x) for x in lines), lines
    assert not [x for x in lines if "services.good" in x or "Traceback" in x], lines


def test_reload_with_a_handler_that_exits_while_loading_keeps_running(superd):
    port, bad = free_port(), free_port()
    d = superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    write(d.workdir / "bye.py", "import sys\nsys.exit(0)\n" + HANDLER)
    d.write_table({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo"},
                   "bye": {"listen": f"127.0.0.1:{bad}", "python": "bye.py:handle"}})
    d.reload()  # RELOADING=1, then READY=1: echo goes on, bye waits with the reason
    d.wait_log(r"^bye: not started: services\.bye\.python: cannot import bye\.py: .*sys\.exit")
    assert d.proc.poll() is None, "superd exited on a handler's sys.exit()"
    assert tcp_exchange("127.0.0.1", port, b"still\n", expect_len=6) == b"still\n"
    assert lib.connection_refused("127.0.0.1", bad)


def test_status_reload_stop_import_no_handler(new_daemon, tmp_path):
    """The control commands read settings.control_socket and nothing else: a handler module
    that would exit (or do anything) when imported is never imported by them."""
    marker = tmp_path / "imported-by"
    port = free_port()
    source = MARKER_MODULE.format(marker=str(marker)).replace(
        HANDLER, "import sys\nif os.environ.get('EXIT_AT_IMPORT'):\n    sys.exit(4)\n" + HANDLER)
    d = new_daemon()
    write(d.workdir / "hmod.py", source)
    d.start({"py": {"listen": f"127.0.0.1:{port}", "python": "hmod:handle"}})
    assert tcp_exchange("127.0.0.1", port, b"") == b"hi\n"
    env = {"EXIT_AT_IMPORT": "1"}
    for command in ("status", "reload", "stop"):
        r = superd_cli(command, "-c", str(d.table), env=env)
        assert r.returncode == 0, f"superd {command}: exit {r.returncode} {r.stderr}"
    assert d.proc.wait(15) == 0
    # superd's descendants import it (the child that checks it at load, the service's python
    # host): all in superd's session, which the commands, run from here, are not in
    who = {tuple(map(int, line.split())) for line in marker.read_text().splitlines()}
    assert all(sid == d.pid for _, sid in who), f"imported by (pid, sid) {who}, superd {d.pid}"


# --------------------------------------------------------------------------------------------
# YAML bombs: refused fast, in little memory


def _bombs(tmp_path: Path) -> dict[str, Path]:
    laughs = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for i, name in enumerate("bcdefghij"):
        laughs.append(f"{name}: &{name} [" + ", ".join([f"*{'abcdefghij'[i]}"] * 10) + "]")
    return {
        "billion-laughs": write(tmp_path / "laughs.yaml", "\n".join(laughs) + "\nservices: {}\n"),
        "flat-million": write(tmp_path / "flat.yaml",
                              "services: {}\nx: [" + "0," * 500_000 + "0]\n"),
        "deep": write(tmp_path / "deep.yaml", "x: " + "[" * 5000 + "]" * 5000 + "\n"),
        "too-big": write(tmp_path / "big.yaml", "# " + "x" * (2 << 20) + "\n"),
    }


MEASURE = """
import resource, subprocess, sys, time
start = time.monotonic()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True, timeout=60)
took = time.monotonic() - start
print(r.returncode, round(took, 3), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(r.stdout + r.stderr)
"""


@pytest.mark.parametrize("bomb", ["billion-laughs", "flat-million", "deep", "too-big"])
def test_yaml_bombs_are_refused_fast_in_little_memory(tmp_path, bomb):
    """`superd check` (run under a parent of its own, to learn its peak memory)."""
    table = _bombs(tmp_path)[bomb]
    r = subprocess.run([PY, "-c", MEASURE, PY, "-m", "superd", "check", "-c", str(table)],
                       cwd=REPO, env=daemon_env(), capture_output=True, text=True, timeout=90)
    head, _, text = r.stdout.partition("\n")
    code, took, peak_kb = head.split()
    assert code == "1" and str(table) in text and "Traceback" not in text, r.stdout + r.stderr
    assert float(took) < 5, f"{bomb}: {took}s to refuse"
    assert int(peak_kb) < 150_000, f"{bomb}: {int(peak_kb) // 1024} MB to refuse"
