"""The START, EXIT and FAIL lines of a connection, in xinetd's layout.

Their words are a contract: fail2ban filters, log watchers and admins' greps read them
(superd's own filter is config/fail2ban/superd.conf). `log_on_success` and `log_on_failure`
choose the fields; a line with none of its fields chosen is not written at all.
"""

from __future__ import annotations

from collections.abc import Set


def start_line(service: str, opts: Set[str], pid: int, peer: str) -> str | None:
    if not opts & {"pid", "host"}:
        return None
    text = f"START: {service}"
    if "pid" in opts:
        text += f" pid={pid}"
    if "host" in opts and peer:
        text += f" from={peer}"
    return text


def exit_line(service: str, opts: Set[str], pid: int, code: int, duration: float) -> str | None:
    """A handler's end: `code` as os.waitstatus_to_exitcode gives it (negative: a signal)."""
    if not opts & {"exit", "pid", "duration"}:
        return None
    text = f"EXIT: {service}"
    if "exit" in opts:
        text += f" signal={-code}" if code < 0 else f" status={code}"
    if "pid" in opts:
        text += f" pid={pid}"
    if "duration" in opts:
        text += f" duration={int(duration)}(sec)"
    return text


def session_line(service: str, opts: Set[str], duration: float, bytes_in: int,
                 bytes_out: int) -> str | None:
    """An internal session's end, written only with `traffic` (xinetd's TRAFFIC)."""
    if "traffic" not in opts:
        return None
    return (f"EXIT: {service} status=0 pid=0 duration={int(duration)}(sec) "
            f"in={bytes_in}(bytes) out={bytes_out}(bytes)")


def fail_line(service: str, opts: Set[str], reason: str, peer: str, datagram: bool) -> str:
    host = f" from={peer}" if "host" in opts and peer else ""
    note = " (datagram: its source is not verified)" if datagram else ""
    return f"FAIL: {service} {reason}{host}{note}"
