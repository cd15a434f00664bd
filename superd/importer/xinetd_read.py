"""Read xinetd.conf and what it includes into blocks of attribute lines, keeping every line.

xinetd's grammar: `service NAME` or `defaults`, then `{` and `}` each on a line of their own, and
between them `attribute = value...` (also `+=` and `-=`). `include FILE` and `includedir DIR`
stand outside blocks; includedir reads every file of DIR in C-locale order, skipping names that
contain '.' or end in '~', as xinetd does. Comments are lines whose first non-blank is '#'.
Nothing is interpreted here; xinetd.py decides what each attribute becomes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from superd.importer.common import Remark, not_carried

ATTR_LINE = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\+=|-=|=)\s*(.*?)\s*$")
MAX_DEPTH = 16  # include nesting; deeper is a loop or a mistake


@dataclass
class Attr:
    """One `name op values` line."""

    name: str
    op: str
    values: list[str]
    where: str
    text: str


@dataclass
class Block:
    """A `service NAME { ... }` or `defaults { ... }` entry."""

    kind: str  # "service" or "defaults"
    name: str
    where: str
    text: list[str]  # every line of it, as written
    comments: list[str] = field(default_factory=list)  # comments just above it
    attrs: list[Attr] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)  # why xinetd itself rejects it
    inner: list[str] = field(default_factory=list)  # comment lines inside it


class Reader:
    """Collects blocks and remarks, in reading order, from a file and its includes."""

    def __init__(self, main: str):
        self.base = os.path.dirname(os.path.abspath(main))
        self.items: list[Block | Remark] = []

    def short(self, path: str) -> str:
        rel = os.path.relpath(path, self.base)
        return path if rel.startswith("..") else rel

    def read(self, path: str, stack: tuple[str, ...] = ()) -> None:
        """Read one file (OSError for the main file propagates; for includes it is noted)."""
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        stack = stack + (os.path.realpath(path),)
        short = self.short(path)
        first = len(self.items)
        pending: list[str] = []
        i = 0
        for _ in range(len(lines) + 1):  # each round consumes at least one line
            if i >= len(lines):
                break
            line = lines[i].strip()
            where = f"{short}:{i + 1}"
            i += 1
            if not line:
                if pending:
                    self.items.append(Remark(pending[:]))
                    pending.clear()
                continue
            if line.startswith("#"):
                pending.append(line)
                continue
            words = line.split()
            if words[0] in ("include", "includedir") and len(words) >= 2:
                self._flush(pending)
                self._include(words[0], words[1], path, where, line, stack)
            elif words[0] == "service" and len(words) >= 2 or words == ["defaults"]:
                block = Block(words[0], words[1] if len(words) > 1 else "defaults", where,
                              [line], pending[:])
                pending.clear()
                if len(words) > 2:
                    block.broken.append(f"{where}: extra words after the service name")
                i = self._block(block, lines, i, short)
                self.items.append(block)
            else:
                self._flush(pending)
                self.items.append(not_carried(where, "not a service, defaults, include or "
                                                     "includedir line (xinetd skips it)", [line],
                                              service=False))
        self._flush(pending)
        for item in self.items[first:]:  # those of included files are theirs already
            if isinstance(item, Remark) and not item.file:
                item.file = short

    def _flush(self, pending: list[str]) -> None:
        if pending:
            self.items.append(Remark(pending[:]))
            pending.clear()

    def _block(self, block: Block, lines: list[str], i: int, short: str) -> int:
        """Read from the line after the header to the closing '}'; return the next index."""
        opened = False
        for _ in range(len(lines) + 1):
            if i >= len(lines):
                block.broken.append(f"{block.where}: the file ends before its closing '}}'")
                return i
            raw = lines[i]
            line = raw.strip()
            where = f"{short}:{i + 1}"
            i += 1
            if not line:
                continue
            block.text.append(raw.rstrip())
            if line.startswith("#"):
                block.inner.append(line)
                continue
            if line == "{" and not opened:
                opened = True
                continue
            if line == "}":
                return i
            if not opened:
                block.broken.append(f"{where}: xinetd needs '{{' on a line of its own after "
                                    f"the {block.kind} line")
                opened = True
            m = ATTR_LINE.fullmatch(raw)
            if m:
                values = m[3].split()
                block.attrs.append(Attr(m[1], m[2], values, where,
                                        " ".join([m[1], m[2]] + values)))
            else:
                block.broken.append(f"{where}: not an `attribute = value` line: {line}")
        return i

    def _include(self, kind: str, target: str, path: str, where: str, line: str,
                 stack: tuple[str, ...]) -> None:
        full = os.path.join(os.path.dirname(path), target)
        if kind == "include":
            files = [full]
        else:
            try:
                names = sorted(os.listdir(full), key=os.fsencode)
            except OSError as e:
                self.items.append(not_carried(where, f"cannot read {full}: {e.strerror}",
                                              [line], service=False))
                return
            skipped = [n for n in names if "." in n or n.endswith("~")]
            files = [os.path.join(full, n) for n in names if n not in skipped
                     and os.path.isfile(os.path.join(full, n))]
        lines = [f"{where}: {line}", "  the services below come from "
                 + (f"its {len(files)} file(s)" if kind == "includedir" else "it")]
        if kind == "includedir" and skipped:
            lines.append("  skipped as xinetd skips them (a '.' or a trailing '~' in the "
                         f"name): {', '.join(skipped)}")
        self.items.append(Remark(lines))
        for file in files:
            if os.path.realpath(file) in stack or len(stack) >= MAX_DEPTH:
                self.items.append(not_carried(where, f"{file} includes itself (a loop)", [line],
                                              service=False))
                continue
            try:
                self.read(file, stack)
            except OSError as e:
                self.items.append(not_carried(where, f"cannot read {file}: {e.strerror}",
                                              [line], service=False))
