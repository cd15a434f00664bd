"""`superd import tcprules FILE`: tcprules(1) source as a superd `rules:` list.

tcprules source: one `ADDRESS:INSTRUCTION` a line. ADDRESS is an IPv4 address, a prefix
(`10.0.`), a range in the last octet (`1.2.3.37-53`), `=host.name`, `=.domain`, `=` (any
host with a name), `user@...`, or empty (every client); INSTRUCTION is `allow` or `deny`,
then `,VAR="value"` assignments (any character after `=` delimits the value). tcpserver
does not read the lines in order: it takes the most specific rule (user@ip, ip, =host,
the longest prefix, the longest .domain, =, the empty one). superd takes the first rule that
matches, so the rules are written in that order. What superd cannot carry over (user@
rules, `=`, removing a variable with `,VAR`) is kept as a comment saying why.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml

from superd.fields import Context
from superd.fields_policy import rules as parse_rules
from superd.importer.common import comment, value_text

RANGE = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3})-(\d{1,3})")


@dataclass
class Line:
    where: str
    text: str
    rank: tuple[int, int]  # tcpserver's order: kind, then longest first
    allow: bool
    hosts: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _instruction(text: str) -> tuple[bool, dict[str, str], list[str]] | str:
    """(allow, variables, notes) or why the instruction is not one."""
    kind, rest = (text.split(",", 1) + [""])[:2] if "," in text else (text, "")
    if kind not in ("allow", "deny"):
        return f"{kind!r} is neither allow nor deny"
    env: dict[str, str] = {}
    notes: list[str] = []
    i = 0
    while i < len(rest):
        eq = rest.find("=", i)
        comma = rest.find(",", i)
        if eq < 0 or (0 <= comma < eq):
            name = rest[i:comma if comma >= 0 else len(rest)]
            notes.append(f",{name} (removing a variable): superd's env only adds")
            i = len(rest) if comma < 0 else comma + 1
            continue
        name = rest[i:eq]
        if eq + 1 >= len(rest):
            env[name] = ""
            break
        quote = rest[eq + 1]
        end = rest.find(quote, eq + 2)
        if end < 0:
            return f"the value of {name} has no closing {quote}"
        env[name] = rest[eq + 2:end]
        i = end + 1
        if i < len(rest) and rest[i] == ",":
            i += 1
    return kind == "allow", env, notes


def _address(key: str) -> tuple[tuple[int, int], list[str]] | str:
    """(rank, hosts) for superd, or why the address cannot be carried over."""
    if "@" in key:
        return "user@ rules need the ident answer (TCPREMOTEINFO): superd's rules match hosts"
    if key == "":
        return (7, 0), ["all"]
    if key == "=":
        return "= (any client with a name): superd's rules have no such pattern"
    if key.startswith("=."):
        return (5, -len(key)), [key[1:]]
    if key.startswith("="):
        return (2, 0), [key[1:]]
    m = RANGE.fullmatch(key)
    if m:
        first = ipaddress.IPv4Address(m[1])
        last = first + (int(m[2]) - int(str(first).rsplit(".", 1)[1]))
        if int(m[2]) > 255 or last < first:
            return f"{key}: not a range of addresses"
        return (1, 0), [str(n) for n in ipaddress.summarize_address_range(first, last)]
    if key.endswith("."):
        parts = key[:-1].split(".")
        try:
            net = ipaddress.IPv4Network(".".join(parts + ["0"] * (4 - len(parts)))
                                        + f"/{8 * len(parts)}")
        except ValueError:
            return f"{key}: not an address prefix"
        return (4, -len(parts)), [str(net)]
    try:
        return (1, 0), [str(ipaddress.ip_address(key))]
    except ValueError:
        return f"{key}: not an address, prefix, range or =name"


def translate(path: str) -> tuple[list[Line], list[str]]:
    """The rules in superd's order, and comments for what is not carried over."""
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()
    out: list[Line] = []
    dropped: list[str] = []
    short = os.path.basename(path)
    for number, raw in enumerate(lines, 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{short}:{number}"
        key, sep, instruction = text.partition(":")
        got = _instruction(instruction) if sep else "no ':' between address and instruction"
        place = _address(key)
        if isinstance(got, str) or isinstance(place, str):
            dropped.append(f"{where}: {text} -- {got if isinstance(got, str) else place}")
            continue
        allow, env, notes = got
        if env and not allow:
            notes.append("the variables of a deny rule do nothing (nothing runs)")
        out.append(Line(where, text, place[0], allow, place[1], env, notes))
    out.sort(key=lambda line: line.rank)  # stable: equal ranks keep the file's order
    return out, dropped


def render(path: str, lines: list[Line], dropped: list[str]) -> str:
    text = [f"# rules imported from {path} by `superd import tcprules`.",
            "# Put them under the service that ran `tcpserver -x ...cdb`, as its `rules:`.",
            "# tcpserver takes the most specific rule; superd takes the first that matches,",
            "# so they are written most specific first. tcpserver's =host matches the name",
            "# its lookup gave the client; superd's host names match the name's addresses."]
    text += [f"# not carried over: {comment(d)}" for d in dropped]
    text.append("rules:")
    for line in lines:
        text.append(f"  # {line.where}: {comment(line.text)}")
        text += [f"  # note: {comment(n)}" for n in line.notes]
        text.append(f"  - {'allow' if line.allow else 'deny'}: {value_text(line.hosts)}")
        if line.env and line.allow:
            text.append(f"    env: {value_text(line.env)}")
    return "\n".join(text) + "\n"


def run_import(path: str, check: bool = False) -> int:
    """Print the rules on stdout; 0 when they are rules superd takes."""
    try:
        lines, dropped = translate(path)
    except OSError as e:
        print(f"superd import: {path}: cannot read: {e.strerror or e}", file=sys.stderr)
        return 1
    text = render(path, lines, dropped)
    sys.stdout.write(text)
    try:
        value: Any = yaml.safe_load(text)["rules"] or []
        parse_rules(value, Context(name="tcprules", table_dir="/"))
    except (ValueError, yaml.YAMLError) as e:
        print(f"superd import: the rules would not load: {e}", file=sys.stderr)
        return 1
    if check:
        print(f"{path}: {len(dropped)} thing(s) not carried over; the comments say why",
              file=sys.stderr)
        print(f"{path}: ok, {len(lines)} rules", file=sys.stderr)
    return 0
