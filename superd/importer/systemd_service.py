"""The [Service] side of `superd import systemd`: what runs, as whom, with what environment.

ExecStart= becomes `exec` (its `@` prefix gives argv[0] apart from the program), with the
specifiers that mean the same for every connection resolved and ${VAR}/$VAR expanded from
Environment= (and EnvironmentFile=, read now, at import, with a note), as systemd expands them
when it starts the service. User=, Group=, WorkingDirectory=, UMask=, Nice=, Limit*=,
RuntimeMaxSec=, PassEnvironment= and StandardError= have superd keys; the rest is kept as a
`not carried over:` comment with its reason (the sandboxing keys among them: superd does not
sandbox its handlers).
"""

from __future__ import annotations

import os
import re
import shutil

from superd.importer import systemd_units as units
from superd.importer.common import Entry, set_exec
from superd.importer.systemd_units import Unit

SEARCH = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
          "/usr/lib/systemd/system", "/lib/systemd/system")
STANDARD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LIMITS = {"LimitNOFILE": "nofile", "LimitNPROC": "nproc", "LimitAS": "as", "LimitCPU": "cpu",
          "LimitCORE": "core", "LimitFSIZE": "fsize"}
STDERR = {"inherit": "socket", "socket": "socket", "journal": "log", "syslog": "log",
          "kmsg": "log", "journal+console": "log", "syslog+console": "log",
          "kmsg+console": "log", "null": "null"}
SECTION_WHY = {
    "Unit": "unit ordering and conditions are systemd's: superd starts its services with "
            "itself",
    "Install": "superd's services are enabled by being in its table",
}
SANDBOX = re.compile(r"(Protect|Private|Restrict|Memory|Lock|NoNewPrivileges|Capability|"
                     r"AmbientCapabilities|SystemCall|ReadWrite|ReadOnly|Inaccessible|"
                     r"DevicePolicy|DeviceAllow|IPAddress|RootDirectory|RootImage|BindPaths|"
                     r"BindReadOnlyPaths|TemporaryFileSystem|Secure|KeyringMode|Personality|"
                     r"IOScheduling|CPU|Delegate|Slice|Tasks|IO|Limit)")
DROPPED = {
    "Type": "superd does not wait for a handler to be ready",
    "Restart": "superd starts a handler per connection (or per wake-up); it restarts none",
    "RemainAfterExit": "not for per-connection handlers",
    "KillMode": "superd signals a handler's process group",
    "KillSignal": "superd sends SIGTERM, then SIGKILL", "TimeoutStopSec": "see shutdown_grace",
    "SupplementaryGroups": "superd sets the supplementary groups of user",
    "UnsetEnvironment": "superd starts handlers with a clean environment already",
    "SyslogIdentifier": "superd logs a handler's stderr lines as SERVICE: line",
    "RuntimeDirectory": "superd makes no runtime directories",
    "RuntimeDirectoryMode": "superd makes no runtime directories",
}


def find(sock: Unit, socket_path: str, accept: bool) -> str:
    """The service unit a socket starts: Service=, else NAME@.service (Accept=yes) or
    NAME.service, next to the socket unit or in systemd's directories."""
    named = sock.last("Socket", "Service")
    base = re.sub(r"\.socket$", "", sock.name)
    name = named.value if named else f"{base}@.service" if accept else f"{base}.service"
    for directory in (os.path.dirname(os.path.abspath(socket_path)), *SEARCH):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(2, "no such service unit next to it or in systemd's directories",
                            name)


def service(e: Entry, svc: Unit, name: str, accept: bool) -> str | None:
    """Fill `e` from the [Service] section; a reason when the service cannot run."""
    e.header.append(f"{svc.name}: ExecStart=" + next(
        (s.value for s in svc.values("Service", "ExecStart")), ""))
    env, problem = _environment(e, svc)
    if problem:
        return problem
    problem = _exec(e, svc, name, env)
    if problem:
        return problem
    _who(e, svc)
    _io(e, svc, accept)
    _rest(e, svc)
    return None


def _environment(e: Entry, svc: Unit) -> tuple[dict[str, str], str | None]:
    env: dict[str, str] = {}
    for s in svc.values("Service", "EnvironmentFile"):
        path = s.value.removeprefix("-")
        try:
            found = units.environment_file(path)
        except OSError as err:
            if not s.value.startswith("-"):
                return env, f"EnvironmentFile={s.value}: cannot read it here ({err.strerror})"
            e.note(f"EnvironmentFile={s.value}: not here, and optional: its variables are "
                   "empty, as systemd would have them")
            continue
        env.update(found)
        e.note(f"EnvironmentFile={s.value}: read now, at import (superd reads no environment "
               "files; edit env: when it changes)")
    own: dict[str, str] = {}
    for s in svc.values("Service", "Environment"):
        pairs = units.assignments(s.value)
        if pairs is None:
            e.drop(s.where, f"Environment={s.value}", "not NAME=value words")
            continue
        own.update(pairs)
    env.update(own)
    if env:
        e.keys["env"] = env
    passed = [w for s in svc.values("Service", "PassEnvironment") for w in (s.value.split())]
    if passed:
        e.keys["passenv"] = passed
    return env, None


def _exec(e: Entry, svc: Unit, name: str, env: dict[str, str]) -> str | None:
    starts = svc.values("Service", "ExecStart")
    if len(starts) != 1:
        return ("no ExecStart=" if not starts else
                "several ExecStart= lines (Type=oneshot): superd runs one program")
    s = starts[0]
    text, prefixes = s.value, ""
    while text[:1] in "-@:+!":
        prefixes += text[0]
        text = text[1:]
    argv = units.words(text)
    if not argv:
        return f"ExecStart={s.value}: an unclosed quote"
    resolved = []
    for word in argv:
        word, unknown = units.specifiers(word, name)
        if unknown:
            return (f"ExecStart uses {', '.join(unknown)}, which systemd sets per unit "
                    "instance (per connection for Accept=yes): superd has no equivalent")
        resolved.append(word)
    argv, used = units.expand(resolved, env)
    if "@" in prefixes:
        program, argv = argv[0], argv[1:]
    else:
        program = argv[0]
    if not program.startswith("/"):
        found = shutil.which(program, path=STANDARD_PATH)
        if not found:
            return f"ExecStart: {program} is not in systemd's search path here"
        e.note(f"ExecStart: {program} found at {found} (systemd searches its fixed path)")
        program = found
    if not argv:
        return "ExecStart: @ needs a program and its argv[0]"
    set_exec(e, argv, program)
    for p in prefixes.replace("@", ""):
        e.drop(s.where, f"ExecStart={p}...", {
            "-": "superd logs every exit status; no unit fails",
            ":": "superd expands the variables at import; ':' turned that off",
        }.get(p, "superd runs a handler with the user and group it is given, no more"))
    return None


def _who(e: Entry, svc: Unit) -> None:
    user, group = svc.last("Service", "User"), svc.last("Service", "Group")
    if user:
        e.keys["user"] = int(user.value) if user.value.isdigit() else user.value
    if group:
        e.keys["group"] = int(group.value) if group.value.isdigit() else group.value
    dynamic = svc.last("Service", "DynamicUser")
    if dynamic and units.boolean(dynamic.value) and not user:
        e.keys["disabled"] = True
        e.note("DynamicUser=yes ran it as a fresh unprivileged user; superd would run it as "
               "root: kept disabled until you give it a user")
    elif dynamic:
        e.drop(dynamic.where, f"DynamicUser={dynamic.value}", "superd runs handlers as user")
    for key, name in (("WorkingDirectory", "cwd"), ("UMask", "umask"), ("Nice", "nice")):
        s = svc.last("Service", key)
        if s is None:
            continue
        value = s.value.removeprefix("-")
        if key == "UMask" and re.fullmatch(r"[0-7]{1,4}", value):
            e.keys["umask"] = f"{int(value, 8):03o}"
        elif key == "Nice" and re.fullmatch(r"-?\d+", value) and -20 <= int(value) <= 19:
            e.keys["nice"] = int(value)
        elif key == "WorkingDirectory" and value.startswith("/"):
            e.keys["cwd"] = value
        else:
            e.drop(s.where, f"{key}={s.value}", f"not a value superd's {name} takes")
    for key, name in LIMITS.items():
        s = svc.last("Service", key)
        if s is not None:
            value = s.value.split(":")[0]
            if value == "infinity" or value.isdigit():
                e.keys.setdefault("rlimits", {})[name] = int(value) if value.isdigit() \
                    else "unlimited"
            else:
                e.drop(s.where, f"{key}={s.value}", "superd's rlimits take a number or "
                                                    "unlimited")
    runtime = svc.last("Service", "RuntimeMaxSec")
    if runtime:
        seconds = units.timespan(runtime.value)
        if seconds:
            e.keys["timeout"] = int(seconds) if seconds == int(seconds) else seconds
        elif runtime.value != "infinity":
            e.drop(runtime.where, f"RuntimeMaxSec={runtime.value}", "not a time span")


def _io(e: Entry, svc: Unit, accept: bool) -> None:
    """fd 0, 1 and 2 as systemd sets them up (systemd.exec(5)): stdout defaults to inherit
    (stdin's) when stdin is the socket, stderr to inherit (stdout's)."""
    stdin = svc.last("Service", "StandardInput")
    out = svc.last("Service", "StandardOutput")
    err = svc.last("Service", "StandardError")
    fd0 = stdin.value if stdin else "null"
    fd1 = out.value if out else "inherit" if fd0 == "socket" else "journal"
    fd1 = fd0 if fd1 == "inherit" else fd1
    fd2 = err.value if err else "inherit"
    fd2 = fd1 if fd2 == "inherit" else fd2
    if accept and fd0 != "socket":
        e.note("StandardInput= is not socket: systemd gave the program the connection as fd 3 "
               "(sd_listen_fds); superd gives it as fd 0 and 1")
    if out is not None and fd1 != "socket" and accept:
        e.drop(out.where, f"StandardOutput={out.value}", "a superd handler's fd 1 is the "
                                                          "connection")
    if fd2 in STDERR:
        e.keys["stderr"] = STDERR[fd2]
    elif err is not None:
        e.drop(err.where, f"StandardError={err.value}", "superd's stderr is log, socket or null")


MAPPED = {"ExecStart", "Environment", "EnvironmentFile", "PassEnvironment", "User", "Group",
          "DynamicUser", "WorkingDirectory", "UMask", "Nice", "RuntimeMaxSec",
          "StandardInput", "StandardOutput", "StandardError", *LIMITS}


def _rest(e: Entry, svc: Unit) -> None:
    for s in svc.settings:
        if s.section == "Service" and s.key in MAPPED:
            continue
        if s.section == "Unit" and s.key == "Description":
            e.inner.append(f"# {s.value}")
            continue
        if s.section != "Service":
            why = SECTION_WHY.get(s.section, "not a section of a service unit")
        elif s.key in DROPPED:
            why = DROPPED[s.key]
        elif s.key.startswith("Exec"):
            why = "superd runs one program per connection and no commands around it"
        elif SANDBOX.match(s.key):
            why = "superd does not sandbox its handlers (it sets user, group, umask, nice, " \
                  "rlimits)"
        else:
            why = "not a [Service] key superd has"
        e.drop(s.where, f"[{s.section}] {s.key}={s.value}", why)
