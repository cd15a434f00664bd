"""/etc/hosts.allow and /etc/hosts.deny read as libwrap reads them (hosts_access(5)).

A logical line is `daemon_list : client_list [ : option : option ... ]`; a backslash before
the newline joins the next line; a line whose first character is `#` is a comment; a line
longer than 2047 characters is skipped, as libwrap skips it (and `problems` says so); a last
line without its newline counts (Debian's libwrap takes it too). `:` inside `[...]` does not
separate fields (IPv6 addresses), `\\:` inside an option is a colon. A pattern `/FILE` in a
list names a file of more patterns, separated by white space.

Files are read when they change: `Table.current()` looks at the file's inode, time and size
no more than once a second (a stat of a local file), so an edit applies at once, as it does
for tcpd, without reading the file per connection. Only regular files are read, opened
non-blocking (superd/safefile.py): a FIFO there cannot hang the loop.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from superd.safefile import read_regular

BUFLEN = 2048
CHECK_EVERY = 1.0
MAX_FILE = 1 << 20
SEPARATORS = re.compile(r"[, \t\r\n]+")
T = TypeVar("T")


@dataclass(frozen=True)
class Rule:
    """One logical line: where it is, its two lists, its options (None: no third field)."""

    where: str
    daemons: tuple[str, ...]
    clients: tuple[str, ...]
    options: tuple[tuple[str, str], ...] | None


@dataclass(frozen=True)
class Contents:
    rules: tuple[Rule, ...]
    problems: tuple[str, ...]  # lines libwrap would warn about and skip


def split_at(text: str, delimiter: str) -> tuple[str, str | None]:
    """libwrap's split_at: the first `delimiter` outside [brackets]; (text, None) if none."""
    depth = 0
    for i, c in enumerate(text):
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
        elif c == delimiter and depth == 0:
            return text[:i], text[i + 1:]
    return text, None


def tokens(text: str) -> tuple[str, ...]:
    return tuple(t for t in SEPARATORS.split(text) if t)


def options(text: str) -> tuple[tuple[str, str], ...]:
    """`key value : key = value : ...` with `\\:` for a colon inside a value."""
    out = []
    for field in re.split(r"(?<!\\):", text):
        field = field.replace("\\:", ":").strip()
        if not field:
            continue
        m = re.match(r"([^=\s]*)\s*(?:=\s*)?(.*)$", field, re.S)
        key, value = (m.group(1), m.group(2).strip()) if m else (field, "")
        out.append((key.lower(), value))
    return tuple(out)


def parse(text: str, name: str) -> Contents:
    rules: list[Rule] = []
    problems: list[str] = []
    lines = text.split("\n")
    number = 0
    while number < len(lines):
        start = number + 1
        line = lines[number]
        number += 1
        while line.endswith("\\") and number < len(lines):
            line = line[:-1] + lines[number]
            number += 1
        if len(line) >= BUFLEN - 1:
            problems.append(f"{name}:{start}: missing newline or line too long")
            continue
        if line.startswith("#") or not line.strip(" \t\r\n"):
            continue
        daemons, rest = split_at(line, ":")
        if rest is None:
            problems.append(f"{name}:{start}: missing \":\" separator")
            continue
        clients, opts = split_at(rest, ":")
        rules.append(Rule(f"{name}:{start}", tokens(daemons), tokens(clients),
                          None if opts is None else options(opts)))
    return Contents(tuple(rules), tuple(problems))


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Table(Generic[T]):
    """One file, parsed by `reader(text, path)`, read again when it changed."""

    def __init__(self, path: str, reader: Callable[[str, str], T],
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.reader, self.clock = path, reader, clock
        self.checked = -CHECK_EVERY
        self.stamp: tuple[int, int, int] | None = (-1, -1, -1)
        self.contents: T = reader("", path)
        self.unreadable = ""  # why it could not be read (a missing file is just empty)

    def current(self) -> tuple[T, bool]:
        """(parsed contents, whether they are new since the last call)."""
        now = self.clock()
        if now - self.checked < CHECK_EVERY:
            return self.contents, False
        self.checked = now
        stamp = _stamp(self.path)
        if stamp == self.stamp:
            return self.contents, False
        self.stamp = stamp
        self.unreadable = ""
        try:
            text = read_regular(self.path, MAX_FILE).decode("utf-8", "replace")
        except OSError as e:
            text = ""
            if e.errno != errno.ENOENT:
                self.unreadable = e.strerror or str(e)
        self.contents = self.reader(text, self.path)
        return self.contents, True


def pattern_file(text: str, name: str) -> tuple[str, ...]:
    """A `/FILE` pattern's file: white-space separated patterns (no comments, as libwrap)."""
    return tuple(text.split())
