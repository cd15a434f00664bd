"""What superd tells of itself: `superd status`, the STATUS= line under systemd, the state
dump SIGUSR1 writes into the log. Plain functions of the counts they are given."""

from __future__ import annotations

import time
from typing import Any


def table_summary(state: dict[str, Any]) -> str:
    """`table of 14:02 refused: 3 problems, running the previous one`, or `table of 14:02`."""
    when = time.strftime("%H:%M", time.localtime(state["read"]))
    reading = state.get("reading_since")
    now = (f"; reading it again since {time.strftime('%H:%M:%S', time.localtime(reading))}"
           if reading is not None else "")
    if state["refused"]:
        return (f"table of {when} refused: {_problems(state['problems'])}, running the "
                f"previous one{now}")
    if state["problems"]:
        return f"table of {when}: {_problems(state['problems'])}{now}"
    return f"table of {when}{now}"


def _problems(n: int) -> str:
    return f"{n} problem" if n == 1 else f"{n} problems"


def status_line(status: dict[str, Any]) -> str:
    """The STATUS= line: services, the ones not started by name, handlers, counts."""
    services = status["services"].values()
    served = sum(s["accepted"] for s in services)
    refused = sum(sum(s["refused"].values()) for s in services)
    paused = sum(1 for s in services if s["paused"])
    failed = sorted(status["failed"])
    state = status["table_state"]
    return (f"{len(status['services'])} services"
            + (f", {len(failed)} not started ({', '.join(failed[:5])}"
               + (", ..." if len(failed) > 5 else "") + ")" if failed else "")
            + f", {status['running']} handlers running, {served} served, {refused} refused"
            + (f", {paused} paused" if paused else "")
            + (f"; {state['summary']}" if state["problems"] or state["refused"] else ""))


def status_lines(status: dict[str, Any]) -> list[str]:
    """The status as log lines: a summary, then one line per service."""
    lines = [f"status: pid {status['pid']}, {len(status['services'])} services, "
             f"{status['running']} handlers, {status['children']} processes, "
             f"cgroups {status.get('cgroups', 'off')}, table {status['table']}"]
    for name, s in sorted(status["services"].items()):
        refused = ",".join(f"{k}={v}" for k, v in sorted(s["refused"].items())) or "0"
        lines.append(f"status: {name} accepted={s['accepted']} active={s['active']} "
                     f"refused={refused} last_exit={s['last_exit']} paused={s['paused'] or '-'}")
    for name, f in sorted(status.get("failed", {}).items()):
        lines.append(f"status: {name} not started: {f['reason']}")
    return lines


def reload_answer(problems: list[str], refused: bool) -> dict[str, Any]:
    """What `superd reload` hears: ok, or the problems and whether the table was refused."""
    if refused:
        return {"error": "reload refused, the running table stays:\n" + "\n".join(problems)}
    if problems:
        return {"error": "reloaded, but what these concern was refused (the services they "
                         "name run as they did, or not at all):\n" + "\n".join(problems)}
    return {"ok": True}
