"""The command line (SPEC §1): run, check, status, reload, stop, import, --version.

Exit codes: 0 success; 1 a bad table or a refused operation (or no daemon running); 2 usage;
70 (EX_SOFTWARE) when `superd run` must stop after an internal error, which it logs first.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from typing import Any, TextIO

from superd import __version__, control, yamlsrc
from superd.config import Settings, Table, load_table, table_path
from superd.listeners import Listener
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
                       ("stop", "stop the running daemon (as SIGTERM)")):
        sub.add_parser(name, help=text).add_argument("-c", "--config")
    status = sub.add_parser("status", help="live per-service counters")
    status.add_argument("-c", "--config")
    status.add_argument("--json", action="store_true")
    imp = sub.add_parser("import", help="translate inetd.conf or xinetd config to YAML on stdout")
    imp.add_argument("kind", choices=("inetd", "xinetd"))
    imp.add_argument("file")
    imp.add_argument("--check", action="store_true",
                     help="also print the check summary on stderr (the result is always "
                          "validated; exit 1 if it would not load)")
    args = parser.parse_args(argv)
    if args.command == "run" and args.pidfile and not args.daemon:
        parser.error("--pidfile goes with --daemon")
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
    print(f"{path}: ok, {len(table.services)} services")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from superd.binding import BindError
    from superd.log import Log
    from superd.server import Server
    from superd.systemd import journal_sender, passed_sockets

    path = table_path(args.config)
    table = _load(path, sys.stderr)
    if table is None:
        return 1
    _ensure_std_fds()
    if args.daemon:
        from superd.daemonize import detach
        code = detach(args.pidfile)
        if code is not None:
            return code
    log = Log(table.settings)
    log.journal = journal_sender()
    passed = {name: [Listener(None, _protocol_of(s), s, passed=True) for s in socks]
              for name, socks in passed_sockets().items()}
    try:
        server = Server(table, log, passed)
        try:
            server.start()
        except BindError as e:
            print(f"superd: {e}", file=sys.stderr)
            log.error(str(e))
            return 1
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
        return "unix" if sock.type == socket.SOCK_STREAM else "unix-dgram"
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
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None
    settings = value.get("settings") if isinstance(value, dict) else None
    sock = settings.get("control_socket") if isinstance(settings, dict) else None
    return sock if isinstance(sock, str) and sock.startswith("/") else Settings().control_socket


def _ask(args: argparse.Namespace, command: str) -> dict[str, Any] | None:
    sock_path = _control_path(table_path(args.config))
    if sock_path is None:
        return None
    try:
        answer = control.request(sock_path, command)
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
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
        return 0
    print(f"superd pid {answer['pid']}, {answer['children']} handlers running, "
          f"table {answer['table']}")
    print(f"{'SERVICE':<20} {'ACCEPTED':>9} {'ACTIVE':>7} {'REFUSED':>8} {'LAST EXIT':>9}  PAUSED")
    for name, s in sorted(answer["services"].items()):
        refused = sum(s["refused"].values())
        last = "-" if s["last_exit"] is None else s["last_exit"]
        print(f"{name:<20} {s['accepted']:>9} {s['active']:>7} {refused:>8} {last:>9}  "
              f"{s['paused'] or '-'}")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    return 0 if _ask(args, "reload") is not None else 1


def cmd_stop(args: argparse.Namespace) -> int:
    return 0 if _ask(args, "stop") is not None else 1


def cmd_import(args: argparse.Namespace) -> int:
    from superd.importer import run_import
    return run_import(args.kind, args.file, check=args.check)


COMMANDS = {"import": cmd_import, "run": cmd_run, "check": cmd_check, "status": cmd_status,
            "reload": cmd_reload, "stop": cmd_stop}
