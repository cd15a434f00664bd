"""The command line (SPEC §1): run, check, status, reload, stop, import, --version.

Exit codes: 0 success; 1 a bad table or a refused operation (or no daemon running); 2 usage;
70 (EX_SOFTWARE) when `superd run` must stop after an internal error, which it logs first.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import socket
import sys
from typing import Any, TextIO

from superd import __version__, caps, control, yamlsrc
from superd.config import Settings, Table, load_table, read_table, table_path
from superd.listeners import AF_VSOCK, Listener
from superd.yamlsrc import TableError

EX_SOFTWARE = 70


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="superd", description="an inetd-like super-server")
    parser.add_argument("--version", action="version", version=f"superd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve the table (foreground unless --daemon)")
    run.add_argument("-c", "--config")
    run.add_argument("--daemon", action="store_true", help="detach (python-daemon)")
    run.add_argument("--pidfile", help="with --daemon: the pidfile to write")
    for name, text in (("check", "validate the table, start nothing"),
                       ("reload", "reload the running daemon (as SIGHUP)"),
                       ("stop", "stop the running daemon (as SIGTERM)"),
                       ("upgrade", "run the superd installed now in the daemon's place, "
                                   "keeping every connection (as SIGUSR2)")):
        sub.add_parser(name, help=text).add_argument("-c", "--config")
    sub.choices["check"].add_argument(
        "--bind", action="store_true",
        help="also try every bind, and say who holds an address that is taken")
    status = sub.add_parser("status", help="live per-service counters")
    status.add_argument("-c", "--config")
    status.add_argument("--json", action="store_true")
    status.add_argument("services", nargs="*", metavar="SERVICE", help="only these services")
    imp = sub.add_parser("import", help="translate inetd.conf, xinetd config or a systemd "
                                         "socket unit to YAML on stdout (or tcprules source "
                                         "to a rules: list)")
    imp.add_argument("kind", choices=("inetd", "xinetd", "systemd", "tcprules"))
    imp.add_argument("files", nargs="+", metavar="FILE",
                     help="inetd: a file or a directory of them; xinetd: xinetd.conf or a "
                          "directory; systemd: UNIT.socket [UNIT.service]; "
                          "tcprules: the rules source")
    imp.add_argument("--check", action="store_true",
                     help="also print the check summary on stderr (the result is always "
                          "validated; exit 1 if it would not load)")
    imp.add_argument("--flavour", choices=("debian", "freebsd", "openbsd", "inetutils"),
                     help="inetd: read plain tcp/udp as this inetd does (else told by the file)")
    imp.add_argument("--split", metavar="DIR",
                     help="write DIR/superd.yaml and DIR/conf.d/NAME.yaml, one per input file")
    args = parser.parse_args(argv)
    if args.command == "run" and args.pidfile and not args.daemon:
        parser.error("--pidfile goes with --daemon")
    if args.command == "import":
        most = 2 if args.kind == "systemd" else 1
        if len(args.files) > most:
            parser.error(f"import {args.kind} takes "
                         + ("UNIT.socket [UNIT.service]" if most == 2 else "one FILE"))
        if args.flavour and args.kind != "inetd":
            parser.error("--flavour goes with import inetd")
    return COMMANDS[args.command](args)


def _load(path: str, out: TextIO) -> Table | None:
    try:
        return load_table(path)
    except TableError as e:
        for problem in e.problems:
            print(problem, file=out)
        return None


def cmd_check(args: argparse.Namespace) -> int:
    path = table_path(args.config)
    table = _load(path, sys.stdout)
    if table is None:
        return 1
    if args.bind and not _check_binds(table):
        return 1
    print(f"{path}: ok, {len(table.services)} services")
    return 0


def _check_binds(table: Table) -> bool:
    """Bind every address of every enabled service and let it go again; print each that
    fails as `FILE:LINE: services.NAME.listen: cannot bind ...` and who holds it."""
    from superd.holders import describe
    good = True
    for svc in table.enabled:
        for addr in svc.listen:
            why = _unix_in_the_way(addr.path) if addr.path else None
            if why is None and not addr.path:
                try:
                    Listener.bind(addr, svc.protocol, svc.backlog).close()
                except OSError as e:
                    why = e.strerror or str(e)
                    need = caps.port_needs(addr.port) if e.errno == errno.EACCES else None
                    why += f" ({need})" if need and addr.inet else ""
            if why is not None:
                held = describe(addr, svc.protocol)
                print(f"{svc.where}: services.{svc.name}.listen: cannot bind {addr}: "
                      f"{why}" + (f" ({held})" if held else ""))
                good = False
    return good


def _unix_in_the_way(path: str) -> str | None:
    """Why a unix socket cannot be made at `path`, without touching what is there (a live
    superd's socket must not be replaced by a check)."""
    import stat
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None if os.path.isdir(os.path.dirname(path)) else "no such directory"
    if not stat.S_ISSOCK(st.st_mode):
        return "a file that is not a socket is in the way"
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
        probe = socket.socket(socket.AF_UNIX, kind)
        try:
            probe.connect(path)
            return "Address already in use"
        except ConnectionRefusedError:
            return None  # a stale socket: superd run replaces it
        except OSError:
            continue
        finally:
            probe.close()
    return None


def cmd_run(args: argparse.Namespace) -> int:
    from superd import reader, takeover, upgrade
    from superd.fdstore import is_stored
    from superd.forkexec import clean_signal_inheritance
    from superd.log import Log
    from superd.server import Server
    from superd.systemd import journal_sender, passed_sockets

    state = upgrade.take_over()  # set when this is `superd upgrade` taking over in place
    path = table_path(args.config)
    # Read in a child, as every read is (superd/reader.py): a handler module's import or a
    # name without an answer cannot hang or end superd itself.
    kind, value = reader.read_now(functools.partial(read_table, path), path)
    if kind == "ok":
        table = value
    else:  # only a table that cannot be read at all keeps superd from starting
        for problem in value if kind == "refused" else [f"{path}: {value}"]:
            print(problem, file=sys.stderr)
        if state is None:
            return 1
        table = upgrade.empty_table(path)  # still reap, log and finish what was handed over
    for problem in table.problems:  # the services they concern wait; the others run
        print(problem, file=sys.stderr)
    _ensure_std_fds()
    # Over an upgrade, the signals that came meanwhile stay blocked until the loop catches
    # them: delivered now, a SIGTERM would end superd without stopping anything.
    clean_signal_inheritance(keep_mask=state is not None)
    if args.daemon and state is None:
        from superd.daemonize import detach
        code = detach(args.pidfile)
        if code is not None:
            return code
    log = Log(table.settings)
    log.journal = journal_sender()
    socks = passed_sockets() if state is None else takeover.passed_listeners(state)
    stored = [s for name in [n for n in socks if is_stored(n)] for s in socks.pop(name)]
    passed = {name: [Listener(None, _protocol_of(s), s, passed=True) for s in group]
              for name, group in socks.items()}
    try:
        server = Server(table, log, passed, stored)
        if state is None:
            if args.daemon and args.pidfile:
                server.pidfile = os.path.abspath(args.pidfile)
            server.start()
        else:
            upgrade.unblock_signals()
            server.resume(state)
        server.run()
    except Exception as e:  # outside any loop callback: nothing to carry on with
        return _fatal(log, e)
    return 0


def _fatal(log: object, exc: BaseException) -> int:
    """Say why superd must exit, with the traceback, in the log and on stderr; exit 70."""
    import traceback
    lines = [f"superd exits after an internal error: {type(exc).__name__}: {exc}"]
    lines += [f"  {x}" for chunk in traceback.format_exception(exc)
              for x in chunk.rstrip("\n").split("\n")]
    for line in lines:
        try:
            log.error(line)  # type: ignore[attr-defined]
        except Exception:
            pass
    try:
        log.close()  # type: ignore[attr-defined]
    except Exception:
        pass
    print("\n".join(lines), file=sys.stderr)
    return EX_SOFTWARE


def _protocol_of(sock: socket.socket) -> str:
    if sock.family == socket.AF_UNIX:
        return {socket.SOCK_STREAM: "unix", socket.SOCK_SEQPACKET: "unix-seqpacket"}.get(
            sock.type, "unix-dgram")
    if sock.family == AF_VSOCK:
        return "vsock"
    return "tcp" if sock.type == socket.SOCK_STREAM else "udp"


def _ensure_std_fds() -> None:
    """Keep fds 0-2 taken, so no socket of ours ever lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)


def _control_path(path: str) -> str | None:
    """settings.control_socket of the table, and nothing else of it: no service is loaded (a
    python handler would be imported, and whatever it does at import would run here), and a
    half-edited table does not lock anyone out of the running daemon."""
    try:
        value = yamlsrc.load(os.path.abspath(path)).value
    except TableError as e:
        # (A reload of a table that cannot be read must still reach the daemon, so that it
        # says "refused" in its status and STATUS=: ExecReload= runs this.)
        for problem in e.problems:
            print(problem, file=sys.stderr)
        default = Settings().control_socket
        print(f"superd: asking the daemon at the default control socket {default}",
              file=sys.stderr)
        return default
    settings = value.get("settings") if isinstance(value, dict) else None
    sock = settings.get("control_socket") if isinstance(settings, dict) else None
    return sock if isinstance(sock, str) and sock.startswith("/") else Settings().control_socket


def _ask(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    sock_path = _control_path(table_path(args.config))
    if sock_path is None:
        return None
    # a reload answers once the table is read (superd/reader.py gives that READ_TIMEOUT)
    timeout = 150.0 if command == "reload" else 10.0
    try:
        answer = control.request(sock_path, command, timeout)
    except control.Stranger as e:
        print(f"superd: {e}", file=sys.stderr)
        return None
    except PermissionError:
        print(f"superd: permission denied: {sock_path} is for its owner (and root) only",
              file=sys.stderr)
        return None
    except (OSError, ValueError) as e:
        print(f"superd: no daemon answering on {sock_path}: {getattr(e, 'strerror', None) or e}",
              file=sys.stderr)
        return None
    if "error" in answer:
        print(f"superd: {answer['error']}", file=sys.stderr)
        return None
    if command == "reload":
        print("superd: reloaded")
    return answer


def cmd_status(args: argparse.Namespace) -> int:
    answer = _ask(args, "status")
    if answer is None:
        return 1
    failed = answer.get("failed", {})
    unknown = [name for name in args.services
               if name not in answer["services"] and name not in failed]
    if unknown:
        print(f"superd: no such service: {', '.join(unknown)}", file=sys.stderr)
        return 1
    if args.services:
        answer["services"] = {name: answer["services"][name] for name in args.services
                              if name in answer["services"]}
        answer["failed"] = failed = {n: failed[n] for n in args.services if n in failed}
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    _print_status(answer, failed)
    return 0


def _print_status(answer: dict[str, Any], failed: dict[str, Any]) -> None:
    up = answer.get("uptime", 0)
    print(f"superd pid {answer['pid']}, up {up // 86400}d {up % 86400 // 3600:02d}:"
          f"{up % 3600 // 60:02d}, {answer.get('running', 0)} handlers running "
          f"({answer['children']} processes), "
          f"{answer.get('table_state', {}).get('summary', 'table')} {answer['table']}")
    if answer.get("cgroups"):
        print(f"cgroups: {answer['cgroups']}")
    print(f"{'SERVICE':<20} {'ACCEPTED':>9} {'ACTIVE':>7} {'REFUSED':>8} {'LAST EXIT':>9}  PAUSED")
    for name, s in sorted(answer["services"].items()):
        refused = sum(s["refused"].values())
        last = "-" if s["last_exit"] is None else s["last_exit"]
        paused = s["paused"] or "-"
        if s.get("backoff"):
            paused += f" {s['backoff']['seconds']:g}s, {s['backoff']['left']:g}s left"
        print(f"{name:<20} {s['accepted']:>9} {s['active']:>7} {refused:>8} {last:>9}  {paused}")
        if s.get("kept"):
            print(f"{'':<20} runs its previous definition: {s['kept']}")
        if s.get("socket_activation"):
            print(f"{'':<20} {s['socket_activation']}")
        if s.get("start_failure"):
            print(f"{'':<20} cannot start its handler: {s['start_failure']}")
    for name, f in sorted(failed.items()):
        retry = (f"trying again in {f['next_try_in']:g}s" if f["next_try_in"] is not None
                 else "until the table is fixed and reloaded")
        print(f"{name:<20} NOT STARTED ({f['where']}): {f['reason']}; {retry}")


def cmd_reload(args: argparse.Namespace) -> int:
    return 0 if _ask(args, "reload") is not None else 1


def cmd_stop(args: argparse.Namespace) -> int:
    return 0 if _ask(args, "stop") is not None else 1


UPGRADE_WAIT = 30.0  # seconds `superd upgrade` waits for the new superd to answer


def cmd_upgrade(args: argparse.Namespace) -> int:
    """Ask the daemon to exec the superd installed now, then wait until that one answers."""
    import time
    path = table_path(args.config)
    try:  # the new superd reads the table again: it must read (as a reload would need)
        read_table(path)
    except TableError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        print("superd: upgrade refused: the table cannot be read", file=sys.stderr)
        return 1
    before = _ask(args, "status")
    if before is None or _ask(args, "upgrade") is None:
        return 1
    sock_path = _control_path(path) or ""
    end = time.monotonic() + UPGRADE_WAIT
    while time.monotonic() < end:
        time.sleep(0.05)  # the control socket is gone while the new superd starts
        try:
            now = control.request(sock_path, "status", timeout=2.0)
        except (OSError, ValueError):
            continue
        if now.get("upgrades", 0) > before.get("upgrades", 0):
            print(f"superd: upgraded in place (pid {now['pid']}, {now['children']} handlers "
                  "kept)")
            return 0
        if now.get("last_upgrade_error") not in (None, before.get("last_upgrade_error")):
            print(f"superd: upgrade failed, still running as before: "
                  f"{now['last_upgrade_error']}", file=sys.stderr)
            return 1
    print(f"superd: no answer from the upgraded superd within {UPGRADE_WAIT:g} s; see the log",
          file=sys.stderr)
    return 1


def cmd_import(args: argparse.Namespace) -> int:
    from superd.importer import run_import
    return run_import(args.kind, args.files, check=args.check, flavour=args.flavour,
                      split_dir=args.split)


COMMANDS = {"import": cmd_import, "run": cmd_run, "check": cmd_check, "status": cmd_status,
            "reload": cmd_reload, "stop": cmd_stop, "upgrade": cmd_upgrade}
