"""The service table: YAML in, frozen records out, every mistake named by file and line.

`load_table()` is the only entry point. It reads the main file and its includes (yamlsrc), applies
`defaults`, checks every field of every service with the parsers in `fields`, then checks the
table as a whole (one handler kind per service, no two services on one address). Problems are
collected, not raised one by one, so `superd check` can list them all (SPEC §1).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
import socket
from collections.abc import Callable
from typing import Any

from superd import caps, fields, fields_policy
from superd.fields_policy import FACILITIES
from superd.listeners import PROTOCOLS, Address
from superd.records import Failed, Service, ServiceLog, Settings, Table
from superd.values import Missing
from superd.yamlsrc import Document, Path, Problem, TableError, load

DEFAULT_TABLE = "/etc/superd/superd.yaml"
__all__ = ["FACILITIES", "Failed", "Service", "ServiceLog", "Settings", "Table", "load_table",
           "table_path"]


# Service keys that `defaults:` may not set: they say what a service *is*, not how it runs.
NOT_DEFAULTABLE = {"listen", "protocol", "exec", "program", "internal", "python", "redirect",
                   "sensor"}
# Every service key: fields.py's, and issue 14's from fields_policy.py (which also replaces
# the parsers of listen, only_from and no_access with ones that take host names).
SERVICE_KEYS = {**fields.SERVICE_KEYS, **fields_policy.KEYS}


def table_path(option: str | None) -> str:
    """`-c FILE`, else $SUPERD_CONFIG, else the system table (SPEC §1)."""
    return option or os.environ.get("SUPERD_CONFIG") or DEFAULT_TABLE


def load_table(path: str) -> Table:
    """Load and validate the whole table; raise TableError listing every problem (what
    `superd check` and the importer want: a table is good only when all of it is)."""
    table = read_table(path)
    if table.problems:
        raise TableError(list(table.problems))
    return table


def read_table(path: str, previous: Settings | None = None) -> Table:
    """Load the table as far as it loads: each service that has problems is left out (in
    `failed`, with them), each bad setting keeps its `previous` value (or its default), and
    every problem is in `problems`. Only a main file that cannot be read, is not YAML or is
    not a mapping raises TableError: then nothing can be served from it."""
    path = os.path.abspath(path)
    main = load(path)
    problems: list[Problem] = []
    top = main.value if main.value is not None else {}
    if not isinstance(top, dict):
        raise TableError([main.problem((), "the table must be a mapping (settings, services...)")])
    for key in top:
        if key not in ("settings", "defaults", "include", "services"):
            problems.append(main.problem((key,), "unknown key (expected settings, defaults, "
                                                  "include, services)"))
    settings = _settings(main, problems, previous)
    defaults = _mapping(main, ("defaults",), problems)
    for key in list(defaults):
        if key in NOT_DEFAULTABLE or key not in SERVICE_KEYS:
            problems.append(main.problem(("defaults", key), "not a key defaults may set"))
            del defaults[key]
    entries: list[tuple[Document, str]] = []
    files = [path]
    broken: list[str] = []
    _collect(main, [path], entries, files, problems, broken)
    services: list[tuple[Service, Document]] = []
    failed: list[Failed] = []
    seen: dict[str, Service] = {}
    for doc, name in entries:
        if name in seen or any(f.name == name for f in failed):
            first = seen[name].where if name in seen else "above"
            problems.append(doc.problem(("services", name),
                                        f"service defined twice (first at {first})"))
            continue
        svc, mine = _service(doc, name, defaults, main)
        problems += mine
        if svc is None:
            failed.append(_failed(doc, name, defaults, main, mine))
            continue
        seen[name] = svc
        services.append((svc, doc))
    for svc, clash in _check_addresses(services):
        problems.append(clash)
        services = [(s, d) for s, d in services if s is not svc]
        failed.append(Failed(svc.name, svc.where, (clash,), svc.disabled, _as_is(svc)))
    for svc, why in _check_identities(services):
        problems.append(why)
        services = [(s, d) for s, d in services if s is not svc]
        failed.append(Failed(svc.name, svc.where, (why,), svc.disabled, _as_is(svc)))
    services = _with_sensors(services)
    order = {f: i for i, f in enumerate(files)}
    unique = sorted(dict.fromkeys(problems), key=lambda p: (order.get(p.file, -1), p.line or 0))
    return Table(path, settings, tuple(svc for svc, _ in services), tuple(failed),
                 tuple(unique), tuple(broken))


def _as_is(svc: Service) -> Callable[[], Service | list[Problem]]:
    """A retry for a service refused for its address only: the record stays good."""
    return functools.partial(_same, svc)


def _same(svc: Service) -> Service:
    return svc


def _failed(doc: Document, name: str, defaults: dict[str, Any], main: Document,
            problems: list[Problem]) -> Failed:
    """A service that did not load, with a way to try it again (its program or user may
    appear later) from what was read, not from the file as it may be by then. The retry is
    plain data (a partial of a module function): the table is read in a child process
    (superd/reader.py) and sent to superd pickled, retries included."""
    raw = doc.value["services"][name]
    disabled = isinstance(raw, dict) and raw.get("disabled") is True
    return Failed(name, f"{doc.file}:{doc.line(('services', name))}", tuple(problems),
                  disabled, functools.partial(_load_again, doc, name, defaults, main))


def _load_again(doc: Document, name: str, defaults: dict[str, Any],
                main: Document) -> Service | list[Problem]:
    svc, again = _service(doc, name, defaults, main)
    if svc is None:
        return again
    refused = _check_identities([(svc, doc)])  # its user may have appeared meanwhile
    return [p for _, p in refused] if refused else svc


def _with_sensors(services: list[tuple[Service, Document]]) -> list[tuple[Service, Document]]:
    """With a sensor in the table, every service superd accepts for refuses who it caught."""
    if not any(svc.sensor and not svc.disabled for svc, _ in services):
        return services
    return [(dataclasses.replace(svc, sensor_bans=True) if svc.stream and not svc.wait
             else svc, doc) for svc, doc in services]


def _collect(doc: Document, stack: list[str], entries: list[tuple[Document, str]],
             files: list[str], problems: list[Problem], broken: list[str]) -> None:
    """Gather (document, service name) pairs from `doc` and, depth first, its includes."""
    for name in _mapping(doc, ("services",), problems):
        entries.append((doc, name))
    includes = doc.value.get("include", []) if isinstance(doc.value, dict) else []
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list):
        problems.append(doc.problem(("include",), "expected a list of file globs"))
        return
    base = os.path.dirname(doc.file)
    for i, pattern in enumerate(includes):
        if not isinstance(pattern, str):
            problems.append(doc.problem(("include", i), "expected a file glob"))
            continue
        full = os.path.join(base, pattern)
        matches = sorted(glob.glob(full))
        if not matches and not glob.has_magic(pattern):
            problems.append(doc.problem(("include", i), f"{full}: no such file"))
        for file in matches:
            real = os.path.realpath(file)
            if real in stack:
                problems.append(doc.problem(("include", i), f"include loop: {file} includes "
                                            "a file that includes it"))
                continue
            try:
                sub = load(real)
            except TableError as e:
                problems.extend(e.problems)
                broken.append(real)
                continue
            if sub.value is None:
                continue
            if not isinstance(sub.value, dict):
                problems.append(sub.problem((), "an included file must be a mapping"))
                broken.append(real)
                continue
            for key in sub.value:
                if key not in ("services", "include"):
                    problems.append(sub.problem((key,), "an included file may only hold "
                                                "services and include"))
            files.append(real)
            _collect(sub, stack + [real], entries, files, problems, broken)


def _mapping(doc: Document, path: Path, problems: list[Problem]) -> dict[str, Any]:
    value: Any = doc.value
    for part in path:
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(doc.problem(path, "expected a mapping"))
        return {}
    return value


SETTINGS_KEYS: dict[str, Callable[[Any], Any]] = {
    "control_socket": fields.abs_path,
    "max_children": fields.count,
    "shutdown_grace": fields.seconds,
    "stop": lambda v: fields._choice(("terminate", "drain", "leave"), v),
    "drain_timeout": fields.seconds,
    "read_timeout": fields.seconds,
    "max_sessions": lambda v: None if v == "auto" else fields.count(v),
    "idle_timeout": lambda v: 0.0 if v in (0, "never") else fields.seconds(v),
    "max_buffered": fields.size,
    "cgroups": lambda v: fields._choice(  # (YAML reads a bare yes or no as a boolean)
        ("auto", "yes", "no"), "yes" if v is True else "no" if v is False else v),
}


def _settings(doc: Document, problems: list[Problem], previous: Settings | None) -> Settings:
    """The settings; a bad one keeps its previous value (or its default)."""
    raw = _mapping(doc, ("settings",), problems)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path: Path = ("settings", key)
        try:
            if key == "syslog":
                out.update(_syslog(doc, value, problems))
            elif key in SETTINGS_KEYS:
                out[key] = SETTINGS_KEYS[key](value)
            else:
                problems.append(doc.problem(path, "unknown key (expected syslog, "
                                            f"{', '.join(SETTINGS_KEYS)})"))
        except ValueError as e:
            problems.append(doc.problem(path, str(e)))
            if previous is not None and key in SETTINGS_KEYS:
                out[key] = getattr(previous, key)
    return Settings(**out)


def _syslog(doc: Document, value: Any, problems: list[Problem]) -> dict[str, str]:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of address, facility, ident")
    out = {}
    for key, v in value.items():
        path: Path = ("settings", "syslog", key)
        if key not in ("address", "facility", "ident") or not isinstance(v, str) or not v:
            problems.append(doc.problem(path, "expected address, facility or ident, as a string"))
        elif key == "facility" and v not in FACILITIES:
            problems.append(doc.problem(path, f"unknown facility {v!r}"))
        elif key == "address" and not v.startswith("/"):
            problems.append(doc.problem(path, "expected the absolute path of a unix socket"))
        else:
            out[f"syslog_{key}"] = v
    return out


def _service(doc: Document, name: str, defaults: dict[str, Any],
             main: Document) -> tuple[Service | None, list[Problem]]:
    """Validate one service entry: the record, or None and its problems."""
    problems: list[Problem] = []
    base: Path = ("services", name)
    raw = doc.value["services"][name]
    if not fields.NAME.fullmatch(name):
        problems.append(doc.problem(base, "a service name is letters, digits, '.', '_' and '-'"))
        return None, problems
    if not isinstance(raw, dict):
        problems.append(doc.problem(base, "expected a mapping of service keys"))
        return None, problems
    merged = {k: (main, ("defaults", k), v)
              for k, v in defaults.items() if k not in NOT_DEFAULTABLE}
    merged.update({k: (doc, base + (k,), v) for k, v in raw.items()})
    protocol = raw.get("protocol", "tcp")
    ctx = fields.Context(name=name, table_dir=os.path.dirname(doc.file),
                         protocol=protocol if isinstance(protocol, str) and protocol in PROTOCOLS
                         else "tcp", written=frozenset(raw))
    values: dict[str, Any] = {}
    for key, (src, path, value) in merged.items():
        parser = SERVICE_KEYS.get(key)
        if parser is None:
            problems.append(src.problem(path, "unknown key"))
            continue
        try:
            values.update(parser(value, ctx))
        except ValueError as e:
            problems.append(src.problem(path, str(e), isinstance(e, Missing)))
    if problems:
        return None, problems
    try:
        values = fields.whole_service(fields_policy.whole(values, ctx), ctx)
    except (fields.FieldError, fields.MissingField) as e:
        blame = next((k for k in e.keys if k in raw), None)
        problems.append(doc.problem(base + ((blame,) if blame else ()), str(e),
                                    isinstance(e, Missing)))
        return None, problems
    return Service(name=name, file=doc.file, line=doc.line(base), **values), problems


def _check_identities(services: list[tuple[Service, Document]]) -> list[tuple[Service, Problem]]:
    """Services whose user or group superd cannot switch to (it runs as another user,
    without cap_setuid/cap_setgid): refused at load, with the capability named, rather than
    failing each connection with a bare "Operation not permitted". Not transient: superd's
    own capabilities do not change while it runs."""
    out = []
    for svc, doc in services:
        why = caps.switch_needs(svc.uid, svc.gid, svc.groups)
        if why is not None and not svc.disabled:
            raw = doc.value["services"][svc.name]
            key = next((k for k in ("user", "group", "groups") if k in raw), None)
            out.append((svc, doc.problem(("services", svc.name) + ((key,) if key else ()),
                                         why)))
    return out


def _check_addresses(services: list[tuple[Service, Document]]) -> list[tuple[Service, Problem]]:
    """Two enabled services may not share an address of the same socket type, nor a unix
    path of any type (a path names one socket). The later of two is the one refused.

    Addresses can only clash on the same port (or unix path), so they are grouped by it: the
    check stays linear for tables of thousands of services.
    """
    taken: dict[tuple[object, ...], list[tuple[Service, Address]]] = {}
    clashes: list[tuple[Service, Problem]] = []
    for svc, doc in services:
        if svc.disabled:
            continue
        kind = socket.SOCK_STREAM if svc.stream else socket.SOCK_DGRAM
        mine: list[tuple[tuple[object, ...], Address]] = []
        for i, addr in enumerate(svc.listen):
            group_key: tuple[object, ...] = ("path", addr.path) if addr.path else (kind, addr.port)
            other = next(((o, a) for o, a in taken.get(group_key, ()) if addr.overlaps(a)),
                         None)
            if other is not None:
                what = "the same address" if addr == other[1] else "an overlapping address"
                clashes.append((svc, doc.problem(
                    ("services", svc.name, "listen", i),
                    f"{addr} is {what} as services.{other[0].name} ({other[1]}, "
                    f"{other[0].where})")))
                break
            mine.append((group_key, addr))
        else:
            for group_key, addr in mine:
                taken.setdefault(group_key, []).append((svc, addr))
    return clashes
