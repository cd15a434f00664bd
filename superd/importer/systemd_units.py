"""Reading systemd unit files as systemd does (systemd.syntax(7), systemd.exec(5)): sections,
`Key=value` lines joined across a trailing backslash, drop-ins, and the value syntaxes the
importer needs (booleans, time spans, sizes, command lines with quotes, specifiers and
$VARIABLES, environment assignments). Nothing is interpreted here; systemd.py maps.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

TRUE = {"1", "yes", "y", "true", "t", "on"}
FALSE = {"0", "no", "n", "false", "f", "off"}
SPAN_UNITS = {
    "us": 1e-6, "usec": 1e-6, "ms": 1e-3, "msec": 1e-3, "s": 1, "sec": 1, "second": 1,
    "seconds": 1, "m": 60, "min": 60, "minute": 60, "minutes": 60, "h": 3600, "hr": 3600,
    "hour": 3600, "hours": 3600, "d": 86400, "day": 86400, "days": 86400, "w": 604800,
    "week": 604800, "weeks": 604800}
SPAN = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)", re.I)
SIZE = re.compile(r"\s*(\d+)\s*([KMGT]?)B?\s*", re.I)
ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "s": " ",
           "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
# Specifiers that mean the same for every instance (systemd.unit(5), for the system manager).
FIXED_SPECIFIERS = {"%": "%", "t": "/run", "T": "/tmp", "V": "/var/tmp", "S": "/var/lib",
                    "C": "/var/cache", "L": "/var/log", "E": "/etc"}
VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\$")


@dataclass
class Setting:
    section: str
    key: str
    value: str
    where: str  # FILE:LINE


@dataclass
class Unit:
    path: str
    settings: list[Setting] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def values(self, section: str, key: str) -> list[Setting]:
        """Every assignment in order; an empty one resets the list (as systemd does)."""
        out: list[Setting] = []
        for s in self.settings:
            if s.section == section and s.key == key:
                out = [] if s.value == "" else out + [s]
        return out

    def last(self, section: str, key: str) -> Setting | None:
        found = [s for s in self.settings if s.section == section and s.key == key]
        return found[-1] if found else None


def read_unit(path: str) -> Unit:
    """The unit and its drop-ins (UNIT.d/*.conf, in name order); OSError for the unit."""
    unit = Unit(path)
    _read_into(unit, path)
    dropins = path + ".d"
    if os.path.isdir(dropins):
        for name in sorted(os.listdir(dropins)):
            if name.endswith(".conf"):
                _read_into(unit, os.path.join(dropins, name))
    return unit


def _read_into(unit: Unit, path: str) -> None:
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    short = os.path.basename(path)
    section = ""
    i = 0
    for _ in range(len(lines) + 1):  # every round takes at least one line
        if i >= len(lines):
            break
        number, text = i + 1, lines[i].strip()
        i += 1
        if not text or text[0] in "#;":
            if text:
                unit.comments.append(text)
            continue
        if text.startswith("[") and text.endswith("]"):
            section = text[1:-1]
            continue
        for _ in range(len(lines)):
            if not text.endswith("\\") or i >= len(lines):
                break
            text = text[:-1] + " " + lines[i].strip()
            i += 1
        key, eq, value = text.partition("=")
        if eq:
            unit.settings.append(Setting(section, key.strip(), value.strip(),
                                         f"{short}:{number}"))


def boolean(text: str) -> bool | None:
    low = text.strip().lower()
    return True if low in TRUE else False if low in FALSE else None


def timespan(text: str) -> float | None:
    """Seconds of a time span ("90", "1min 30s", "500ms"); None when it is not one."""
    text = text.strip()
    if not text:
        return None
    total, pos = 0.0, 0
    for _ in range(len(text) + 1):
        if pos >= len(text):
            return total
        m = SPAN.match(text, pos)
        if not m or m.end() == pos:
            return None
        unit = m[2] or "s"
        if unit not in SPAN_UNITS:
            return None
        total += float(m[1]) * SPAN_UNITS[unit]
        pos = m.end()
    return None


def size(text: str) -> int | None:
    m = SIZE.fullmatch(text)
    return int(m[1]) * (1 << (10 * " KMGT".index((m[2] or " ").upper()))) if m else None


def words(text: str) -> list[str] | None:
    """Split a command line or an assignment list: quotes group, backslashes escape (C style).
    None when a quote is not closed."""
    out: list[str] = []
    word: list[str] | None = None
    quote = ""
    i = 0
    for _ in range(len(text) + 1):
        if i >= len(text):
            break
        c = text[i]
        i += 1
        if c == "\\" and i < len(text):
            word = (word or []) + [ESCAPES.get(text[i], text[i])]
            i += 1
        elif quote:
            if c == quote:
                quote = ""
            else:
                word = (word or []) + [c]
        elif c in "\"'":
            quote, word = c, word or []
        elif c.isspace():
            if word is not None:
                out.append("".join(word))
            word = None
        else:
            word = (word or []) + [c]
    if quote:
        return None
    if word is not None:
        out.append("".join(word))
    return out


def specifiers(word: str, prefix: str) -> tuple[str, list[str]]:
    """Resolve the specifiers that are the same for every instance; (word, the others)."""
    out, unknown, i = [], [], 0
    for _ in range(len(word) + 1):
        if i >= len(word):
            break
        c = word[i]
        if c == "%" and i + 1 < len(word):
            spec = word[i + 1]
            if spec == "p":
                out.append(prefix)
            elif spec in FIXED_SPECIFIERS:
                out.append(FIXED_SPECIFIERS[spec])
            else:
                unknown.append(f"%{spec}")
                out.append(f"%{spec}")
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out), unknown


def expand(argv: list[str], env: dict[str, str]) -> tuple[list[str], list[str]]:
    """systemd's $VAR (a word of its own: split at whitespace) and ${VAR} (anywhere: one
    word); undefined ones become empty, as in systemd. (argv, the names used)."""
    out: list[str] = []
    used: list[str] = []
    for word in argv:
        m = re.fullmatch(r"\$([A-Za-z_][A-Za-z0-9_]*)", word)
        if m:
            used.append(m[1])
            out += env.get(m[1], "").split()
            continue

        def sub(m: re.Match[str]) -> str:
            if m[0] == "$$":
                return "$"
            used.append(m[1])
            return env.get(m[1], "")
        out.append(VAR.sub(sub, word))
    return out, used


def assignments(text: str) -> list[tuple[str, str]] | None:
    """Environment= "A=b" 'C=d e' ...; None when it does not parse."""
    got = words(text)
    if got is None:
        return None
    pairs = []
    for w in got:
        name, eq, value = w.partition("=")
        if not eq or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            return None
        pairs.append((name, value))
    return pairs


def environment_file(path: str) -> dict[str, str]:
    """KEY=VALUE lines (quotes taken off, # comments skipped), as EnvironmentFile= reads them;
    OSError when the file cannot be read."""
    out: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read().splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            name, eq, value = line.removeprefix("export ").partition("=")
            if eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
                got = words(value)
                out[name.strip()] = " ".join(got) if got else ""
    return out
