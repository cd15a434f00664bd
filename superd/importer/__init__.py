"""`superd import inetd|xinetd|systemd FILE... [--check] [--split DIR]`: an existing inetd,
xinetd or systemd socket-activated setup as a superd table.
(`superd import tcprules FILE` writes a `rules:` list instead: superd/importer/tcprules.py.)

The YAML goes to stdout, every line of it explained: each service shows the input it came from,
`note:` comments say where superd behaves differently, `not carried over:` comments keep what
superd cannot do together with the reason. Nothing is dropped silently (docs/migrating.md).

SPEC §1 promises exit 0 when the result loads, so the result is loaded here with the very
`load_table()` that `superd check` runs, from a temporary directory (every path the importer
writes is absolute, so where the file sits does not change what it means). A service that would
not load *on this machine* (program or user missing here, two services on one address...) is
written commented out with the validator's reason instead of breaking the whole table; its lines
come back by deleting one '#' each. Exit 1 only when the input cannot be read or the table still
would not load.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Callable

from superd.config import Table, load_table
from superd.importer import inetd, split, systemd, tcprules, xinetd
from superd.importer.common import (
    Entry,
    Remark,
    Translation,
    assign_names,
    keep_socket_stderr,
    render,
    value_text,
)
from superd.yamlsrc import Problem, TableError

TRANSLATORS: dict[str, Callable[..., Translation]] = {
    "inetd": inetd.translate, "xinetd": xinetd.translate, "systemd": systemd.translate}


def run_import(kind: str, files: list[str], check: bool = False, flavour: str | None = None,
               split_dir: str | None = None) -> int:
    """Print the translated table on stdout (or write it into `split_dir` as a conf.d/
    layout); report on stderr; 0 when the result loads."""
    if kind == "tcprules":  # rules for a service's `rules:`, not a table
        if len(files) != 1 or split_dir is not None:
            print("superd import tcprules: give one file" if split_dir is None else
                  "superd import tcprules: --split is for tables; the rules go to stdout",
                  file=sys.stderr)
            return 2
        return tcprules.run_import(files[0], check)
    try:
        t = _translate(kind, files, flavour)
    except OSError as e:
        print(f"superd import: {e.filename or files[0]}: cannot read: {e.strerror or e}",
              file=sys.stderr)
        return 1
    t.header += ["It was checked with superd's own validator. All paths in it are absolute, so",
                 "it may be saved anywhere."]
    text, table, problems = settle(t)
    if table is None:
        sys.stdout.write(text)
        for p in problems:
            print(f"superd import: the result would not load: {p}", file=sys.stderr)
        return 1
    if split_dir is not None:
        try:
            written, table = split.write(t, split_dir, os.path.basename(files[0]))
        except (OSError, TableError) as e:
            print(f"superd import: --split {split_dir}: {_why(e)}", file=sys.stderr)
            return 1
        print(f"superd import: wrote {', '.join(written)}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    left = report(t)
    if check:
        dropped, noted = counts(t)
        if dropped or noted:
            print(f"{files[0]}: {dropped} thing(s) not carried over, {noted} carried over with a "
                  "note; the comments in the output say why", file=sys.stderr)
        print(f"{files[0]}: ok, {len(table.services)} services"
              + (f"; {left} left out (named above)" if left else ""), file=sys.stderr)
    return 0


def _translate(kind: str, files: list[str], flavour: str | None) -> Translation:
    t = TRANSLATORS[kind](*files, **({"flavour": flavour} if kind == "inetd" else {}))
    assign_names(t.entries)
    if kind in ("inetd", "xinetd"):
        keep_socket_stderr(t)
    return t


def _why(e: Exception) -> str:
    if isinstance(e, TableError):
        return "; ".join(str(p) for p in e.problems)
    return f"{getattr(e, 'filename', '') or ''}: {getattr(e, 'strerror', '') or e}".lstrip(": ")


def report(t: Translation) -> int:
    """Name on stderr every input entry left out (and every other input line not carried
    over), and every service commented out because it would not load here; how many services
    are missing from the table."""
    left = 0
    for item in t.items:
        if isinstance(item, Remark) and item.left_out:
            what = "left out" if item.service else "not carried over"
            print(f"superd import: {what}: {item.left_out}", file=sys.stderr)
            left += item.service
        elif isinstance(item, Entry) and item.unloadable:
            print(f"superd import: {item.source}: {item.name} is commented out, it would not "
                  f"load here: {item.unloadable}", file=sys.stderr)
            left += 1
    return left


def translate(kind: str, file: str, flavour: str | None = None) -> tuple[Translation, str,
                                                                         Table | None]:
    """For tests and tools: the settled translation, its text and the loaded table."""
    t = _translate(kind, [file], flavour)
    text, table, _ = settle(t)
    return t, text, table


def counts(t: Translation) -> tuple[int, int]:
    """(not carried over, carried over with a note): every comment of either kind."""
    dropped = (sum(1 for i in t.items if isinstance(i, Remark) and i.left_out)
               + len(t.defaults_dropped)
               + sum(len(e.dropped) + bool(e.unloadable) for e in t.entries))
    noted = sum(len(e.notes) for e in t.entries) + sum(
        1 for n in t.defaults_notes if not n.startswith("from "))
    return dropped, noted


def settle(t: Translation) -> tuple[str, Table | None, list[Problem]]:
    """Render and load until the table loads, commenting out what would not load here.

    Each round comments out at least one service or defaults key, so the rounds are bounded by
    their number.
    """
    with tempfile.TemporaryDirectory(prefix="superd-import-") as tmp:
        path = os.path.join(tmp, "imported.yaml")
        problems: list[Problem] = []
        for _ in range(len(t.entries) + len(t.defaults) + len(t.settings) + 2):
            text, spans = render(t)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            try:
                return text, load_table(path), []
            except TableError as e:
                problems = e.problems
            except Exception as e:  # a validator bug must not look like an importer traceback
                return text, None, [Problem(path, None, "", f"the validator failed: "
                                                            f"{type(e).__name__}: {e}")]
            blamed: dict[int, tuple[Entry | tuple[str, str], list[str]]] = {}
            for p in problems:
                span = next((s for s in spans if p.file == path and p.line is not None
                             and s.first <= p.line <= s.last), None)
                if span is not None:
                    blamed.setdefault(id(span.target), (span.target, []))[1].append(
                        _reason(p, path, span.target))
            if not blamed:
                return text, None, problems
            for target, reasons in blamed.values():
                if isinstance(target, Entry):
                    target.unloadable = "; ".join(reasons)
                else:
                    section, key = target
                    holder = t.defaults if section == "defaults" else t.settings
                    value = holder.pop(key)
                    t.defaults_dropped.append(f"{section}.{key}: {value_text(value)} -- would "
                                              f"not load here: {'; '.join(reasons)}")
        return text, None, problems


def _reason(p: Problem, path: str, target: Entry | tuple[str, str]) -> str:
    """The validator's words, without the temporary file's name."""
    where = p.where
    if isinstance(target, Entry):
        prefix = f"services.{target.name}"
        if where.startswith(prefix):
            where = where[len(prefix):].lstrip(".")
    message = re.sub(rf",? ?{re.escape(path)}:\d+", "", p.message)
    return f"{where}: {message}" if where else message
