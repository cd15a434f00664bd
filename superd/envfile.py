"""`env_file`: variables from files, as systemd's EnvironmentFile= reads them.

`NAME=value` lines; blank lines and lines starting with `#` or `;` are skipped; a value may be
'single-quoted' (taken as is), "double-quoted" (backslash escapes) or bare (a backslash escapes
the next character, trailing blanks go); a backslash at the end of a line continues it. The
files are read when the table is loaded (and on every reload), so `superd check` reports a
missing or malformed file. A path with a leading `-` may be missing.
"""

from __future__ import annotations

import errno
import re

from superd.fields import ENV_NAME
from superd.safefile import read_regular

MAX_FILE = 1 << 20


def read(spec: str) -> list[tuple[str, str]]:
    """The variables of `spec` (a path, `-path` for optional); ValueError saying what is wrong."""
    optional = spec.startswith("-")
    path = spec[1:] if optional else spec
    if not path.startswith("/"):
        raise ValueError(f"{spec!r}: expected an absolute path (with - in front if optional)")
    try:
        data = read_regular(path, MAX_FILE + 1)
    except OSError as e:
        if optional and e.errno == errno.ENOENT:
            return []
        raise ValueError(f"{path}: {e.strerror}") from None
    if len(data) > MAX_FILE:
        raise ValueError(f"{path}: larger than {MAX_FILE} bytes")
    return parse(data.decode("utf-8", "replace"), path)


def parse(text: str, path: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    i, line = 0, 1
    while i < len(text):
        start_line = line
        m = re.compile(r"[ \t]*").match(text, i)
        i = m.end() if m else i
        if i >= len(text):
            break
        if text[i] in "#;\n":
            end = text.find("\n", i)
            i, line = (len(text), line) if end < 0 else (end + 1, line + 1)
            continue
        eq = text.find("=", i)
        nl = text.find("\n", i)
        if eq < 0 or (0 <= nl < eq):
            raise ValueError(f"{path}:{start_line}: expected NAME=value")
        name = text[i:eq].strip()
        if not ENV_NAME.fullmatch(name):
            raise ValueError(f"{path}:{start_line}: {name!r} is not a variable name")
        value, i, line = _value(text, eq + 1, line, path)
        out.append((name, value))
    return out


def _value(text: str, i: int, line: int, path: str) -> tuple[str, int, int]:
    """The value starting at `i`: (value, index after its line, line number after it)."""
    while i < len(text) and text[i] in " \t":
        i += 1
    out: list[str] = []
    quote = ""
    pending_blank = ""
    while i < len(text):
        c = text[i]
        if quote and c == quote:
            quote = ""
        elif c == "\\" and quote != "'":
            nxt = text[i + 1] if i + 1 < len(text) else ""
            if nxt == "\n":
                line += 1  # a continued line
            elif nxt:
                out.append(pending_blank + nxt)
                pending_blank = ""
            i += 2
            continue
        elif quote:  # inside quotes: taken as it is, newlines too
            out.append(c)
            line += c == "\n"
        elif c == "\n":
            return "".join(out), i + 1, line + 1
        elif c in "'\"":
            out.append(pending_blank)
            pending_blank = ""
            quote = c
        elif c in " \t":
            pending_blank += c
        else:
            out.append(pending_blank + c)
            pending_blank = ""
        i += 1
    if quote:
        raise ValueError(f"{path}:{line}: a {quote} quote is not closed")
    return "".join(out), i, line
