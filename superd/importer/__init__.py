"""`superd import inetd|xinetd FILE [--check]`: an existing inetd or xinetd setup as a superd table.
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

from superd.config import Table, load_table
from superd.importer import inetd, tcprules, xinetd
from superd.importer.common import Entry, Remark, Translation, assign_names, render, value_text
from superd.yamlsrc import Problem, TableError

TRANSLATORS = {"inetd": inetd.translate, "xinetd": xinetd.translate}


def run_import(kind: str, file: str, check: bool = False) -> int:
    """Print the translated table on stdout; report on stderr; 0 when the result loads."""
    if kind == "tcprules":  # rules for a service's `rules:`, not a table
        return tcprules.run_import(file, check)
    try:
        t = TRANSLATORS[kind](file)
    except OSError as e:
        print(f"superd import: {file}: cannot read: {e.strerror or e}", file=sys.stderr)
        return 1
    assign_names(t.entries)
    t.header += ["It was checked with superd's own validator. All paths in it are absolute, so",
                 "it may be saved anywhere."]
    text, table, problems = settle(t)
    sys.stdout.write(text)
    for entry in t.entries:
        if entry.unloadable:
            print(f"superd import: {entry.source}: {entry.name} is commented out, it would not "
                  f"load here: {entry.unloadable}", file=sys.stderr)
    if table is None:
        for p in problems:
            print(f"superd import: the result would not load: {p}", file=sys.stderr)
        return 1
    if check:
        skipped = not_carried_count(t)
        if skipped:
            print(f"{file}: {skipped} thing(s) not carried over; the comments in the output "
                  "say why", file=sys.stderr)
        print(f"{file}: ok, {len(table.services)} services", file=sys.stderr)
    return 0


def translate(kind: str, file: str) -> tuple[Translation, str, Table | None]:
    """For tests and tools: the settled translation, its text and the loaded table."""
    t = TRANSLATORS[kind](file)
    assign_names(t.entries)
    text, table, _ = settle(t)
    return t, text, table


def not_carried_count(t: Translation) -> int:
    remarks = sum(1 for i in t.items if isinstance(i, Remark)
                  and i.lines and i.lines[0].startswith("not carried over"))
    return (remarks + len(t.defaults_dropped)
            + sum(len(e.dropped) + bool(e.unloadable) for e in t.entries))


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
