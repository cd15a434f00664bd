"""TCP wrappers: /etc/hosts.allow and /etc/hosts.deny as hosts_access(5) defines them.

Why superd reads the files itself instead of calling libwrap (hosts_ctl through ctypes):
libwrap was made for tcpd, a short-lived process per connection. Called inside superd it
would look names up with the blocking gethostbyaddr/gethostbyname and ident with a blocking
connect and read, in the loop or in a thread; and it carries out a matching rule's options in
the calling process: `spawn` forks a shell and waits for it, `setenv`, `umask`, `nice` and
`user` change superd itself, `twist` execs over it or, in a resident process, longjmps out.
Here the rules are matched as libwrap matches them (this module follows hosts_access.c of
Debian's tcp-wrappers 7.6.q, and a test holds it against the real libwrap.so.0), but every
name and user a pattern needs comes from the loop's own lookups (superd/lookups.py), asked
for only when a pattern gets to need it, exactly as libwrap does it lazily.

Matching: the first line of hosts.allow whose daemon list and client list match the
connection lets it in; otherwise the first matching line of hosts.deny refuses it; otherwise
it is let in. An unreadable hosts.deny refuses everyone. A lookup that fails (no answer in
time) refuses the connection (`dns`): a pattern that needed it might have refused it.
Options: `allow`, `deny`, `setenv NAME VALUE` (into the handler's environment, with the %
expansions), `keepalive`, `linger N`, and `severity`, `rfc931` (accepted, no effect). The
others (`spawn`, `twist`, `banners`, `nice`, `umask`, `user`...) run commands or change a
process: superd does not, so a connection matched by such a rule is refused, and the log says
which line, once per version of the file. NIS netgroups (`@group`) are not supported:
a rule that needs one refuses the connection too.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from superd import hostsfile, lookups
from superd.facts import CONNECTION_VARS, PARANOID, UNKNOWN
from superd.hostpatterns import Known
from superd.hostsfile import Contents, Rule, Table, split_at
from superd.log import Log
from superd.lookups import USER, Facts, Key, LookupStage, Sources
from superd.pipeline import Connection

ALLOW, DENY = "/etc/hosts.allow", "/etc/hosts.deny"
HARMLESS = ("severity", "rfc931")
OK_CHARS = set("1234567890!@%-_=+:,./abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TABLES: dict[str, Table[Contents]] = {}
_PATTERN_FILES: dict[str, Table[tuple[str, ...]]] = {}


class Need(Exception):
    """A pattern needs a fact that is not known yet."""

    def __init__(self, key: Key):
        super().__init__(key)
        self.key = key


class Failed(Exception):
    """A lookup a pattern needed failed."""


class Unsupported(Exception):
    """A pattern or option superd does not carry out."""


def table(path: str) -> Table[Contents]:
    if path not in _TABLES:
        _TABLES[path] = Table(path, hostsfile.parse)
    return _TABLES[path]


class Side:
    """One end of the connection: its address, and its name when a pattern asks."""

    def __init__(self, addr: str, facts: Known):
        self.addr, self.facts = addr, facts

    def name(self) -> str:
        key = lookups.name_of(self.addr)
        if key not in self.facts:
            raise Need(key)
        name = self.facts[key]
        if name is None:
            raise Failed()
        return str(name)

    def known_name(self) -> bool:
        return self.name() not in (UNKNOWN, PARANOID)


class Request:
    """What one connection is matched with: the daemon name, both ends, the user."""

    def __init__(self, daemon: str, client: str, server: str, facts: Known):
        self.daemon = daemon
        self.client, self.server = Side(client, facts), Side(server, facts)
        self.facts = facts

    def user(self) -> str:
        if USER not in self.facts:
            raise Need(USER)
        identity = self.facts[USER]
        return identity.user if identity is not None else UNKNOWN

    def server_match(self, tok: str) -> bool:
        part, host = split_at(tok[1:], "@")
        if host is None:
            return string_match(tok, self.daemon)
        return string_match(tok[0] + part, self.daemon) and self.host_match(host, self.server)

    def client_match(self, tok: str) -> bool:
        part, host = split_at(tok[1:], "@")
        if host is None:
            return self.host_match(tok, self.client)
        return self.host_match(host, self.client) and string_match(tok[0] + part, self.user())

    def host_match(self, tok: str, side: Side) -> bool:
        if tok.startswith("@"):
            raise Unsupported(f"NIS netgroup {tok}")
        if tok.startswith("/"):
            return any(self.host_match(t, side) for t in pattern_file(tok))
        upper = tok.upper()
        if upper == "KNOWN":
            return side.known_name()
        if upper == "LOCAL":
            return "." not in side.name() and side.known_name()
        net, mask = split_at(tok, "/")
        if mask is not None:
            return masked_match(net, mask, side.addr)
        if string_match(tok, side.addr):
            return True
        if not any(c not in "0123456789./" for c in tok) or ":" in tok or "[" in tok:
            return False  # an address pattern: it cannot match a name (no lookup for it)
        return string_match(tok, side.name())


def pattern_file(path: str) -> tuple[str, ...]:
    if path not in _PATTERN_FILES:
        _PATTERN_FILES[path] = Table(path, hostsfile.pattern_file)
    return _PATTERN_FILES[path].current()[0]


def list_match(tokens: tuple[str, ...], match: object) -> bool:
    """libwrap's list_match: the first match decides, unless an EXCEPT list after it
    matches too (which, recursively, may have exceptions of its own)."""
    for i, tok in enumerate(tokens):
        if tok.upper() == "EXCEPT":
            return False
        if match(tok):  # type: ignore[operator]
            rest = [j for j in range(i + 1, len(tokens)) if tokens[j].upper() == "EXCEPT"]
            return not rest or not list_match(tokens[rest[0] + 1:], match)
    return False


def string_match(tok: str, string: str) -> bool:
    if "*" in tok or "?" in tok:
        return wildcard(string, tok)
    if tok.startswith("."):
        return len(string) > len(tok) and string.lower().endswith(tok.lower())
    upper = tok.upper()
    if upper == "ALL":
        return True
    if upper == "KNOWN":
        return string.lower() != UNKNOWN
    if tok.endswith("."):
        return string.lower().startswith(tok.lower())
    if tok.startswith("[") and tok.endswith("]"):
        pat, addr = _v6(tok[1:-1]), _v6(string)
        return pat is not None and pat == addr
    return tok.lower() == string.lower()


def masked_match(net: str, mask: str, string: str) -> bool:
    """`a.b.c.d/m.m.m.m` or `a.b.c.d/len` (the address ANDed with the mask must be the net,
    as written), `[v6]/len` (both sides cut to the prefix)."""
    digits = mask[:len(mask) - len(mask.lstrip("0123456789"))]
    if net.startswith("[") and net.endswith("]"):
        pat, addr = _v6(net[1:-1]), _v6(string)
        if pat is None or addr is None or not digits or int(digits) > 128:
            return False
        shift = 128 - int(digits)
        return pat >> shift == addr >> shift
    net4, addr4 = _v4(net), _v4(string)
    if net4 is None or addr4 is None:
        return False
    if "." in mask:
        bits = _v4(mask)
        if bits is None:
            return False
    elif not digits or int(digits) > 32:
        return False
    else:  # a shift by 32 is a shift by 0 on x86: libwrap's /0 matches only 0.0.0.0 itself
        bits = (0xFFFFFFFF << (32 - int(digits))) & 0xFFFFFFFF if int(digits) else 0xFFFFFFFF
    return addr4 & bits == net4


def _v4(text: str) -> int | None:
    try:
        return int(ipaddress.IPv4Address(text))
    except ValueError:
        return None


def _v6(text: str) -> int | None:
    """An IPv6 address as a number; None for anything else, IPv4-mapped ones included (a
    client with one is matched by its IPv4 address)."""
    try:
        addr = ipaddress.IPv6Address(text)
    except ValueError:
        return None
    return None if addr.ipv4_mapped is not None else int(addr)


def wildcard(string: str, pattern: str) -> bool:
    """`*` and `?` (Tatu Ylonen's match_pattern, as Debian's libwrap uses it): no regex."""
    s, p = 0, 0
    star, mark = -1, 0
    while s < len(string):
        if p < len(pattern) and (pattern[p] == "?" or pattern[p] == string[s]):
            s, p = s + 1, p + 1
        elif p < len(pattern) and pattern[p] == "*":
            star, mark = p, s
            p += 1
        elif star >= 0:
            p, mark = star + 1, mark + 1
            s = mark
        else:
            return False
    return all(c == "*" for c in pattern[p:])


class TcpWrappers(LookupStage):
    """The hosts_access check of one daemon name (refused: `libwrap`, as xinetd says)."""

    name = "libwrap"

    def __init__(self, sources: Sources, timeout: float, daemon: str, log: Log,
                 allow: str = ALLOW, deny: str = DENY):
        super().__init__(sources, timeout)
        self.daemon, self.log = daemon, log
        self.tables = ((table(allow), True), (table(deny), False))
        self.warned: set[str] = set()

    def decide(self, conn: Connection, facts: Facts) -> str | None | list[Key]:
        local = conn.sock.getsockname()[0]
        request = Request(self.daemon, conn.peer, local[7:] if local.startswith("::ffff:")
                          else local, facts)
        try:
            return self.verdict(request, conn)
        except Need as e:
            return [e.key]
        except Failed:
            return "dns"

    def verdict(self, request: Request, conn: Connection | None) -> str | None:
        """None (let in) or the refusal reason; Need or Failed when a fact is missing."""
        for tab, allowing in self.tables:
            contents, new = tab.current()
            if new:
                for problem in contents.problems + ((f"{tab.path}: cannot read: "
                                                     f"{tab.unreadable}",)
                                                    if tab.unreadable else ()):
                    self.warn(f"tcp_wrappers: {problem}")
            if tab.unreadable:
                if allowing:
                    continue
                return "libwrap"
            for rule in contents.rules:
                try:
                    if (list_match(rule.daemons, request.server_match)
                            and list_match(rule.clients, request.client_match)):
                        return self._apply(rule, allowing, request, conn)
                except Unsupported as e:
                    self.warn(f"tcp_wrappers: {rule.where}: {e} is not supported by superd; "
                              "connections that get to this rule are refused")
                    return "libwrap"
        return None

    def _apply(self, rule: Rule, allowing: bool, request: Request,
               conn: Connection | None) -> str | None:
        verdict = allowing
        env: dict[str, str] = {}
        sockopts: list[tuple[int, int, bytes | int]] = []
        for key, value in rule.options or ():
            if key in ("allow", "deny"):
                verdict = key == "allow"
            elif key == "setenv":
                name, _, text = value.partition(" ")
                if not name or name in CONNECTION_VARS:
                    self.warn(f"tcp_wrappers: {rule.where}: setenv {name!r}: superd sets "
                              "that variable itself; ignored")
                    continue
                env[name] = expand(text.strip(), request)
            elif key == "keepalive":
                sockopts.append((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1))
            elif key == "linger" and value.isdigit():
                sockopts.append((socket.SOL_SOCKET, socket.SO_LINGER,
                                 struct.pack("ii", 1, int(value))))
            elif key not in HARMLESS:
                self.warn(f"tcp_wrappers: {rule.where}: option {key!r} is not supported by "
                          "superd (it runs no commands from hosts files and changes no "
                          "process): connections this rule matches are refused")
                return "libwrap"
        if not verdict:
            return "libwrap"
        if conn is None:
            return None
        for level, option, arg in sockopts:
            try:
                conn.sock.setsockopt(level, option, arg)
            except OSError:
                pass
        if env:
            conn.env = {**(conn.env or {}), **env}
        return None

    def warn(self, text: str) -> None:
        if text not in self.warned:
            self.warned.add(text)
            self.log.warning(text)


def expand(text: str, request: Request) -> str:
    """libwrap's %-expansions; characters a shell could take for syntax become `_`."""
    def hostinfo(side: Side) -> str:
        return side.name() if side.known_name() else side.addr

    def value(letter: str) -> str:
        if letter == "a":
            return request.client.addr
        if letter == "A":
            return request.server.addr
        if letter == "c":
            user = request.user()
            return (f"{user}@" if user != UNKNOWN else "") + hostinfo(request.client)
        if letter == "d":
            return request.daemon
        if letter in "hH":
            return hostinfo(request.client if letter == "h" else request.server)
        if letter in "nN":
            return (request.client if letter == "n" else request.server).name()
        if letter == "p":
            return str(os.getpid())
        if letter == "s":
            return f"{request.daemon}@{hostinfo(request.server)}"
        if letter == "u":
            return request.user()
        return ""

    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "%" and i + 1 < len(text):
            letter = text[i + 1]
            out.append("%" if letter == "%" else
                       "".join(c if c in OK_CHARS else "_" for c in value(letter)))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)
