"""`superd import ... --split DIR`: the translation as a conf.d/ layout, one file per input file.

DIR/superd.yaml gets the settings, the defaults, `include: [conf.d/*.yaml]` and the services of
the main input file; DIR/conf.d/NAME.yaml gets the services (and the comments) of each other
input file: one per /etc/xinetd.d entry, one per file of an inetd.d directory. The whole is
loaded with superd's own loader before anything is put in DIR, and no existing file is
overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from superd.config import Table, load_table
from superd.importer.common import Entry, Remark, Translation, render, safe_name

MAIN = "superd.yaml"
CONF_D = "conf.d"


def source_of(item: Entry | Remark) -> str:
    if item.file:
        return item.file
    return item.source.rsplit(":", 1)[0] if isinstance(item, Entry) else ""


def groups(t: Translation) -> dict[str, list[Entry | Remark]]:
    """The items of each input file, in input order (a comment of its own goes with the file
    of the item before it)."""
    out: dict[str, list[Entry | Remark]] = {}
    current = ""
    for item in t.items:
        current = source_of(item) or current
        out.setdefault(current, []).append(item)
    return out


def texts(t: Translation, main_source: str) -> dict[str, str]:
    """{relative path: YAML text} of the layout."""
    by_file = groups(t)
    main = Translation(t.kind, t.file, header=list(t.header), settings=t.settings,
                       defaults=t.defaults, defaults_notes=t.defaults_notes,
                       defaults_dropped=t.defaults_dropped, items=by_file.pop(main_source, []))
    text, _ = render(main)
    head, sep, tail = text.partition("\nservices:\n")
    out = {MAIN: f"{head}\ninclude: [{CONF_D}/*.yaml]\nservices:\n{tail}" if sep else text}
    for source, items in by_file.items():
        name = safe_name(os.path.basename(source) or "imported")
        path = f"{CONF_D}/{name}.yaml"
        for n in range(2, 1000):
            if path not in out:
                break
            path = f"{CONF_D}/{name}-{n}.yaml"
        part = Translation(t.kind, t.file, header=[
            f"services from {source or t.file}, imported by `superd import {t.kind}`",
            f"(included by ../{MAIN}; see it for the defaults and the notes on the whole)."],
            items=items)
        out[path] = render(part)[0]
    return out


def write(t: Translation, directory: str, main_source: str) -> tuple[list[str], Table]:
    """Write the layout into `directory` (made if missing); the paths written and the table.

    OSError (FileExistsError naming the file) when a file is in the way; TableError when the
    layout would not load (nothing is written then).
    """
    layout = texts(t, main_source)
    for rel in layout:
        target = os.path.join(directory, rel)
        if os.path.lexists(target):
            raise FileExistsError(17, "exists already; superd import overwrites nothing", target)
    with tempfile.TemporaryDirectory(prefix="superd-split-") as tmp:
        for rel, text in layout.items():
            _write(os.path.join(tmp, rel), text)
        table = load_table(os.path.join(tmp, MAIN))
        written = []
        for rel in layout:
            target = os.path.join(directory, rel)
            os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
            shutil.copyfile(os.path.join(tmp, rel), target)
            os.chmod(target, 0o644)
            written.append(target)
    return written, table


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
