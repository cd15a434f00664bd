"""The man pages are the user contract (issue 15): complete, clean, installed where man looks.

- every key the parser accepts (superd/config.py SERVICE_KEYS, the settings of superd/config.py)
  and every value of a choice key has its entry in superd.yaml(5), with type, default and
  example; every command, option and exit code of the command line is in superd(8);
- the pages render with neither `mandoc -T lint` nor `groff -ww` saying anything;
- `pip install .` (and `pip install -e .`) puts them where `man superd` finds them;
- README.md and the docs link only to files inside the repository.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from superd_testlib import PY, REPO

from superd import cli, config, fields

MAN = REPO / "docs" / "man"
sys.path.insert(0, str(MAN))
import build_man  # noqa: E402

YAML5 = MAN / "superd.yaml.5.rst"
SUPERD8 = MAN / "superd.8.rst"
ENTRY_FIELDS = ("Type", "Default", "Example")


# --------------------------------------------------------------------------------------------
# reading the sources


def sections(path: Path) -> dict[str, str]:
    """Heading -> text under it (up to the next heading of any level)."""
    lines = path.read_text().splitlines()
    out: dict[str, list[str]] = {}
    current = ""
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and re.fullmatch(r"([=-])\1{2,}", lines[i + 1]) and line.strip() \
                and len(lines[i + 1]) >= len(line) and not re.fullmatch(r"[=-]+", line):
            current = line.strip()
            out[current] = []
            continue
        out.setdefault(current, []).append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def entries(text: str) -> dict[str, str]:
    """Definition-list entries whose term is one bold word: `**key**` -> its indented body."""
    out: dict[str, str] = {}
    name = None
    for line in text.splitlines():
        m = re.fullmatch(r"\*\*([\w.]+)\*\*", line)
        if m:
            name = m[1]
            out[name] = ""
        elif name is not None and (line.startswith("    ") or not line.strip()):
            out[name] += line + "\n"
        elif line.strip():
            name = None
    return out


def settings_keys() -> list[str]:
    """The keys `settings:` accepts, as written in a table: superd/config.py keeps each as a
    Settings field; the syslog map's keys are its `syslog_*` fields (config._syslog)."""
    out = []
    for f in dataclasses.fields(config.Settings):
        if f.name.startswith("syslog_"):
            out += ["syslog", f"syslog.{f.name.removeprefix('syslog_')}"]
        else:
            out.append(f.name)
    return list(dict.fromkeys(out))


def missing_entry_fields(body: str) -> list[str]:
    return [f for f in ENTRY_FIELDS if not re.search(rf"^    \| {f}: \S", body, re.M)]


# --------------------------------------------------------------------------------------------
# superd.yaml(5): the table


def entry_problems(what: str, section: str, accepted: list[str], source: str) -> list[str]:
    """What superd.yaml(5)'s `section` lacks (or has too many) against the keys the parser
    accepts, each said so that whoever adds a key knows what to write where."""
    documented = entries(sections(YAML5)[section])
    page = YAML5.relative_to(REPO)
    problems = []
    for key in accepted:
        if key not in documented:
            problems.append(f"{what} key {key!r} ({source}) has no entry in superd.yaml(5): "
                            f"add a line '**{key}**' under '{section}' in {page}")
            continue
        for f in missing_entry_fields(documented[key]):
            problems.append(f"{what} key {key!r}: its entry in superd.yaml(5) ({page}) has no "
                            f"'| {f}: ...' line")
    for key in sorted(documented.keys() - set(accepted)):
        problems.append(f"superd.yaml(5) documents a {what} key {key!r} that {source} does "
                        "not accept")
    return problems


def test_every_service_key_has_an_entry_with_type_default_and_example():
    problems = entry_problems("service", "Service keys", list(config.SERVICE_KEYS),
                              "superd/config.py SERVICE_KEYS")
    assert not problems, "\n".join(problems)


def test_every_settings_key_has_an_entry_with_type_default_and_example():
    problems = entry_problems("settings", "SETTINGS", settings_keys(),
                              "superd/config.py Settings")
    assert not problems, "\n".join(problems)


def test_every_value_of_a_choice_key_is_named_in_its_entry():
    service = entries(sections(YAML5)["Service keys"])
    settings = entries(sections(YAML5)["SETTINGS"])
    choices = [
        ("Service keys", "protocol", tuple(fields.PROTOCOLS)),
        ("Service keys", "internal", fields.INTERNAL),
        ("Service keys", "rlimits", tuple(fields.RLIMITS)),
        ("Service keys", "log_on_success", fields.SUCCESS_FIELDS),
        ("Service keys", "log_on_failure", fields.FAILURE_FIELDS),
        ("SETTINGS", "syslog.facility",  # the page says "local0 to local7"
         tuple(f for f in config.FACILITIES if not re.fullmatch(r"local[1-6]", f))),
    ]
    problems = []
    for where, key, values in choices:
        body = (service if where == "Service keys" else settings).get(key, "")
        for value in values:
            if f"**{value}**" not in body:
                problems.append(f"superd.yaml(5), {where}, **{key}**: the value {value!r} the "
                                f"parser accepts is not named as **{value}**")
    assert not problems, "\n".join(problems)


def test_top_level_keys_and_listen_forms_have_their_sections():
    heads = sections(YAML5)
    for head in ("SETTINGS", "DEFAULTS", "INCLUDE", "SERVICES", "Listen forms", "Service keys"):
        assert head in heads, f"superd.yaml(5) has no section {head!r}"
    for key in config.NOT_DEFAULTABLE:
        assert f"**{key}**" in heads["DEFAULTS"], \
            f"superd.yaml(5) DEFAULTS does not say that defaults may not set {key!r}"


# --------------------------------------------------------------------------------------------
# superd(8): the command line


def _help(*args: str) -> str:
    r = subprocess.run([PY, "-m", "superd", *args, "--help"], capture_output=True, text=True,
                       timeout=30, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_every_command_option_and_exit_code_is_in_superd_8():
    text = SUPERD8.read_text()
    heads = sections(SUPERD8)
    problems = []
    for command in cli.COMMANDS:
        if not re.search(rf"^\*\*{command}[*\s]", heads["COMMANDS"], re.M):
            problems.append(f"command {command!r} (superd/cli.py) has no entry under COMMANDS "
                            f"in superd(8) ({SUPERD8.relative_to(REPO)})")
        for option in set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", _help(command))):
            if f"**{option}**" not in heads["OPTIONS"]:
                problems.append(f"option {option} of `superd {command}` is not under OPTIONS "
                                f"in superd(8) ({SUPERD8.relative_to(REPO)})")
    if "**--version**" not in heads["OPTIONS"]:
        problems.append("superd(8) OPTIONS lacks **--version**")
    for code in (0, 1, 2, cli.EX_SOFTWARE):
        if not re.search(rf"^\*\*{code}\*\*$", heads["EXIT STATUS"], re.M):
            problems.append(f"exit status {code} is not under EXIT STATUS in superd(8)")
    for name in ("SIGHUP", "SIGTERM", "SIGINT"):
        if f"**{name}**" not in heads["SIGNALS"]:
            problems.append(f"signal {name} is not under SIGNALS in superd(8)")
    for var in ("SUPERD_CONFIG", "NOTIFY_SOCKET", "LISTEN_FDS", "WATCHDOG_USEC"):
        if f"**{var}**" not in heads["ENVIRONMENT"]:
            problems.append(f"environment variable {var} is not under ENVIRONMENT in superd(8)")
    for path in (config.DEFAULT_TABLE, config.Settings().control_socket):
        if f"*{path}*" not in heads["FILES"]:
            problems.append(f"{path} is not under FILES in superd(8)")
    assert "superd.yaml**\\(5)" in text and "superd-handler**\\(7)" in text
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------------------------
# rendering


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (bash .ci/setup --test installs it)")
    return path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    mandir = tmp_path_factory.mktemp("man")
    return {page.name: page for _, page in build_man.build_all(mandir, "0.0-test")}


def test_the_three_pages_are_built(rendered):
    assert sorted(rendered) == ["superd-handler.7", "superd.8", "superd.yaml.5"]


def test_pages_render_without_a_warning(rendered):
    mandoc, groff = _tool("mandoc"), _tool("groff")
    for name, page in sorted(rendered.items()):
        r = subprocess.run([mandoc, "-T", "lint", "-W", "warning", str(page)],
                           capture_output=True, text=True, timeout=30)
        assert (r.returncode, r.stdout + r.stderr) == (0, ""), f"mandoc on {name}"
        r = subprocess.run([groff, "-ww", "-z", "-man", str(page)], capture_output=True,
                           text=True, timeout=30)
        assert (r.returncode, r.stdout + r.stderr) == (0, ""), f"groff -ww on {name}"


def plain_text(page: Path) -> str:
    """The page as a reader sees it (mandoc does not hyphenate; col -b drops the bold)."""
    out = subprocess.run([_tool("mandoc"), "-T", "utf8", "-O", "width=400", str(page)],
                         capture_output=True, timeout=30, check=True).stdout
    return subprocess.run(["col", "-b"], input=out, capture_output=True, timeout=30,
                          check=True).stdout.decode()


def test_rendered_table_page_shows_every_key(rendered):
    text = plain_text(rendered["superd.yaml.5"])
    missing = [k for k in [*config.SERVICE_KEYS, *settings_keys()]
               if not re.search(rf"^\s+{re.escape(k)}\b", text, re.M)]
    assert not missing, f"keys not shown as an entry by `man superd.yaml`: {missing}"
    assert re.search(r"^\s+Default: 128$", text, re.M), "backlog's default as shown"


# --------------------------------------------------------------------------------------------
# installed where man looks


def _project_copy(dest: Path) -> Path:
    """What a build needs, copied, so that building leaves the checkout alone."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("superd", "docs/man"):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _man(venv: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": f"{venv}/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "MANWIDTH": "200",
           "MANPAGER": "cat", "PAGER": "cat", "HOME": str(venv)}
    return subprocess.run([_tool("man"), *args], capture_output=True, text=True, timeout=60,
                          env=env)


@pytest.mark.parametrize("editable", [False, True], ids=["pip install .", "pip install -e ."])
def test_man_superd_works_after_pip_install(tmp_path, editable):
    src = _project_copy(tmp_path / "src")
    venv, wheels = tmp_path / "venv", tmp_path / "wheels"
    wheels.mkdir()
    # The wheel pip would build (the same PEP 517/660 hook, run with the checkout venv's
    # setuptools and docutils, so no index is needed), installed into a venv of its own.
    build = "build_editable" if editable else "build_wheel"
    r = subprocess.run([PY, "-c", f"from setuptools import build_meta as b; "
                        f"print(b.{build}({str(wheels)!r}))"], cwd=src, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    wheel = wheels / r.stdout.split()[-1]
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    r = subprocess.run([PY, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                        "-q", "--no-deps", str(wheel)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    assert r.returncode == 0, r.stdout + r.stderr
    for page, section in (("superd", "8"), ("superd.yaml", "5"), ("superd-handler", "7")):
        where = _man(venv, "-w", page)
        assert where.returncode == 0, f"man -w {page}: {where.stderr}"
        assert where.stdout.strip() == f"{venv}/share/man/man{section}/{page}.{section}"
    # systemd/README.md's venv install: /usr/local/bin/superd and the pages linked into
    # /usr/local/share/man, found through /usr/local/bin on PATH (here a stand-in prefix).
    local = tmp_path / "local"
    (local / "bin").mkdir(parents=True)
    (local / "bin" / "superd").symlink_to(venv / "bin" / "superd")
    assert _man(local, "-w", "superd.yaml").returncode != 0, "not found before the links"
    for page in (venv / "share" / "man").glob("man*/*"):
        (local / "share" / "man" / page.parent.name).mkdir(parents=True, exist_ok=True)
        (local / "share" / "man" / page.parent.name / page.name).symlink_to(page)
    where = _man(local, "-w", "superd.yaml")  # man-db shows the link's target
    assert where.stdout.strip() == f"{venv}/share/man/man5/superd.yaml.5", where.stderr
    shown = _man(venv, "superd.yaml")
    assert shown.returncode == 0 and "per_source" in shown.stdout, shown.stderr
    assert re.search(r"^\s+Type: whole number, 1 to 65535$", shown.stdout, re.M)
    assert "EXIT STATUS" in _man(venv, "superd").stdout


# --------------------------------------------------------------------------------------------
# links


LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\[[^\]]+\]:\s*(\S+)",
                  re.M)


def test_readme_and_docs_link_only_to_files_in_the_repository():
    tracked = subprocess.run(["git", "ls-files", "*.md", "*.rst"], cwd=REPO, capture_output=True,
                             text=True, timeout=30).stdout.split()
    docs = sorted({*tracked, "README.md", *(str(p.relative_to(REPO))
                                            for p in (REPO / "docs").rglob("*.md"))})
    problems = []
    for rel in docs:
        path = REPO / rel
        if not path.exists():
            continue
        text = path.read_text()
        for m in LINK.finditer(text):
            target = m[1] or m[2]
            line = text.count("\n", 0, m.start()) + 1
            if target.startswith("#"):
                continue
            if re.match(r"[a-z][a-z0-9+.-]*:", target):
                problems.append(f"{rel}:{line}: links outside the repository: {target}")
                continue
            dest = (path.parent / target.split("#")[0]).resolve()
            if not dest.is_relative_to(REPO.resolve()):
                problems.append(f"{rel}:{line}: links outside the repository: {target}")
            elif not dest.exists():
                problems.append(f"{rel}:{line}: links to a file that does not exist: {target}")
    assert not problems, "\n".join(problems)
