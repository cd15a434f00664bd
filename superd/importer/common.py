"""What both importers produce, and how it becomes a commented YAML table.

A `Translation` keeps the order of the input: each item is an `Entry` (one superd service) or a
`Remark` (comment lines standing alone: the user's own comments, an entry that cannot be carried
over, a line that only sets something for the lines after it). The YAML is written by hand, not
with yaml.dump, because the whole point of the output is the comment next to what it explains,
and PyYAML cannot write comments. `render()` also says which output lines belong to which entry
or defaults key, so a problem found by the validator can be pinned on the right thing.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

import yaml

from superd.fields import NAME
from superd.sockopts import KEYS as SOCKET_KEYS

# The order keys are written in, so every imported service reads the same way.
KEY_ORDER = (
    "listen", "protocol", "wait", "exec", "program", "internal", "user", "group", "umask",
    "nice", "cwd", "env", "passenv", "rlimits", "stderr", "instances", "on_limit", "per_source",
    "rate", "timeout", "only_from", "no_access", "log_on_success", "log_on_failure",
    "backlog", *SOCKET_KEYS, "disabled",
)
REAL_DAEMON_DIR = "/usr/sbin"  # where Debian's tcpd looks for a daemon named without a path
EVERYONE = ["0.0.0.0/0", "::/0"]


@dataclass
class Entry:
    """One service of the output, with the notes that explain it."""

    base: str  # the name it would like; made unique by `assign_names`
    suffix: str  # what tells it apart from an entry with the same base (udp, tcp6...)
    source: str  # FILE:LINE of the input
    header: list[str]  # the input text it came from, shown above it
    comments: list[str] = field(default_factory=list)  # the user's comments just above it
    inner: list[str] = field(default_factory=list)  # the user's comments inside it
    keys: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # carried over, but behaves differently
    dropped: list[str] = field(default_factory=list)  # could not be carried over
    name: str = ""
    unloadable: str = ""  # why the service would not load on this machine
    file: str = ""  # the input file it came from (for `--split`)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def drop(self, where: str, what: str, why: str) -> None:
        self.dropped.append(f"{where}: {what} -- {why}")


@dataclass
class Remark:
    """Comment lines standing on their own among the services."""

    lines: list[str]
    left_out: str = ""  # "FILE:LINE: reason" of an input line not carried over
    service: bool = False  # ...and that line was a service (an entry of its own)
    file: str = ""  # the input file it came from (for `--split`)


@dataclass
class Translation:
    """A whole imported configuration, ready to render."""

    kind: str
    file: str
    header: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    defaults_notes: list[str] = field(default_factory=list)
    defaults_dropped: list[str] = field(default_factory=list)
    items: list[Entry | Remark] = field(default_factory=list)

    @property
    def entries(self) -> list[Entry]:
        return [i for i in self.items if isinstance(i, Entry)]


def not_carried(where: str, reason: str, original: list[str], service: bool = True) -> Remark:
    """A whole input entry superd cannot run (or another line that means something to the
    peer: `service=False`), kept as comments with its reason."""
    lines = [f"not carried over: {where}: {reason}"]
    lines += [f"  {line}" for line in original]
    return Remark(lines, left_out=f"{where}: {reason}", service=service)


# What inetd and xinetd give a handler as fd 2, and what superd's default would change.
STDERR_HEADER = [
    "Every program keeps the connection as its fd 2, as under inetd and xinetd",
    "(`stderr: socket`). With `stderr: log`, superd's default, its error messages go to",
    "syslog instead and its client no longer sees them (cvs pserver, for one, sends its",
    "refusals on stderr: under `log` its client sees only the end of the connection).",
]


def keep_socket_stderr(t: Translation) -> None:
    """inetd and xinetd dup the socket to fd 2 of every program they start: so does the
    import, so nothing a client used to read is lost (the header says what `log` changes)."""
    for e in t.entries:
        if "exec" in e.keys:
            e.keys["stderr"] = "socket"


# ------------------------------------------------------------------------------------------
# values


_PLAIN = re.compile(r"[A-Za-z0-9_/.-][A-Za-z0-9_./+@%=-]*")


def scalar(value: Any) -> str:
    """A YAML scalar that reads back as exactly `value`, in block and in flow context."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text):
        try:
            if yaml.safe_load(f"[{text}]") == [text] and yaml.safe_load(f"k: {text}") == {
                    "k": text}:
                return text
        except yaml.YAMLError:
            pass
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a YAML double-quoted one


def value_text(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{scalar(k)}: {scalar(v)}" for k, v in value.items()) + "}"
    return scalar(value)


def comment(text: str) -> str:
    """One comment line's text: control characters would end the comment early."""
    return re.sub(r"[\x00-\x1f\x7f]", " ", text.expandtabs(8))


# ------------------------------------------------------------------------------------------
# names, ports, addresses


def safe_name(text: str) -> str:
    """Make `text` a valid service name (letters, digits, '.', '_', '-')."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name if NAME.fullmatch(name) else "service"


def assign_names(entries: list[Entry]) -> None:
    """Unique names in input order: the first gets its base, later ones base-suffix[-N]."""
    taken: set[str] = set()
    for e in entries:
        base = safe_name(e.base)
        candidates = [base]
        if e.suffix:
            candidates.append(safe_name(f"{base}-{e.suffix}"))
        candidates += [f"{candidates[-1][:58]}-{n}" for n in range(2, 1000)]
        e.name = next(c for c in candidates if c not in taken)
        taken.add(e.name)


def port_of(service: str, transport: str) -> int | None:
    """A port number, or a service name looked up in /etc/services as the inetds do."""
    if service.isdigit():
        return int(service) if 0 < int(service) < 65536 else None
    try:
        return socket.getservbyname(service, transport)
    except OSError:
        return None


def listen_text(host: str, port: int) -> str:
    """superd's listen form for one address: PORT (every address), A:P, or [A]:P."""
    if host == "*":
        return str(port)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve(host: str, family: int) -> list[str]:
    """Addresses of a host name for one family, as the inetds resolve them when they start."""
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0]).split("%")[0]
        if addr not in out:
            out.append(addr)
    return out


def unwrap_tcpd(argv: list[str]) -> tuple[list[str], str]:
    """tcpd runs argv[0] (a path, or a name under /usr/sbin) with the same argv.

    Returns (argv, program) for running the daemon directly.
    """
    real = argv[0]
    return argv, real if real.startswith("/") else os.path.join(REAL_DAEMON_DIR, real)


def wrap_tcpd(entry: Entry, tcpd: str, program: str) -> None:
    """tcpd left out of argv: superd runs the daemon and checks hosts.allow/hosts.deny
    itself (tcp_wrappers: true uses argv[0]'s base name, as tcpd does)."""
    entry.keys["tcp_wrappers"] = True
    entry.note(f"{tcpd} (TCP wrappers) left out: superd runs {program} itself and applies "
               "/etc/hosts.allow and /etc/hosts.deny (tcp_wrappers), as tcpd did")


def set_exec(entry: Entry, argv: list[str], program: str) -> None:
    """exec is the argv the program sees, exactly; program only when argv[0] is not its path."""
    entry.keys["exec"] = list(argv)
    if argv[0] != program:
        entry.keys["program"] = program


# ------------------------------------------------------------------------------------------
# rendering


@dataclass
class Span:
    """Output lines [first, last] (1-based) and what they belong to."""

    first: int
    last: int
    target: Entry | tuple[str, str]


def render(t: Translation) -> tuple[str, list[Span]]:
    """The YAML text, and which lines belong to which service or defaults/settings key."""
    out: list[str] = [f"# {comment(h)}" if h else "#" for h in t.header]
    spans: list[Span] = []
    if t.settings:
        out.append("settings:")
        for key, value in t.settings.items():
            spans.append(Span(len(out) + 1, len(out) + 1, ("settings", key)))
            out.append(f"  {key}: {value_text(value)}")
    if t.defaults or t.defaults_notes or t.defaults_dropped:
        out.append("defaults:" if t.defaults else "# defaults:")
        out += [f"  # note: {comment(n)}" for n in t.defaults_notes]
        out += [f"  # not carried over: {comment(d)}" for d in t.defaults_dropped]
        for key, value in t.defaults.items():
            spans.append(Span(len(out) + 1, len(out) + 1, ("defaults", key)))
            out.append(f"  {key}: {value_text(value)}")
    out.append("services:")
    for item in t.items:
        if isinstance(item, Remark):  # the user's own comments stay as they were
            out += [f"  {comment(line)}" if line.startswith("#") else f"  # {comment(line)}"
                    for line in item.lines]
            continue
        out += [f"  {comment(c)}" for c in item.comments]
        out += [f"  # {item.source}: {comment(h)}" for h in item.header[:1]]
        out += [f"  #   {comment(h)}" for h in item.header[1:]]
        body = _service_lines(item)
        if item.unloadable:
            out.append(f"  # not carried over: {item.source}: would not load here: "
                       f"{comment(item.unloadable)}")
            out.append("  # (to use it once that is fixed, delete the first '#' of the lines "
                       "below)")
            out += ["  #" + line[2:] for line in body]
        else:
            spans.append(Span(len(out) + 1, len(out) + len(body), item))
            out += body
    return "\n".join(out) + "\n", spans


def _service_lines(e: Entry) -> list[str]:
    lines = [f"  {scalar(e.name)}:"]  # quoted when YAML would read it as a number
    lines += [f"    {comment(c)}" for c in e.inner]
    lines += [f"    # note: {comment(n)}" for n in e.notes]
    lines += [f"    # not carried over: {comment(d)}" for d in e.dropped]
    order = {k: i for i, k in enumerate(KEY_ORDER)}
    for key in sorted(e.keys, key=lambda k: order.get(k, len(order))):
        lines.append(f"    {key}: {value_text(e.keys[key])}")
    return lines
