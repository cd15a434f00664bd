"""What handlers leave behind: the processes they start, wherever those go.

A handler may start processes that leave its process group and session (setsid, a double
fork). `timeout`, max_children and a stop must still reach them. Where cgroup v2 is writable,
each handler starts in a cgroup of its own (superd/cgroups.py), which holds whatever it
starts: `timeout` and a stop signal the whole cgroup, and a survey, twice a second while
handlers run (superd/processes.py keeps the timer), counts its processes. A cgroup still
holding processes when its handler exits "lingers": counted, and ended at its handler's
`timeout` or at the stop.

Without cgroups the survey falls back on superd being a child subreaper: a process a handler
started and left (a double-forked daemon, `setsid cmd &`) becomes superd's child, an
"escaped" process. It counts toward max_children, a stop ends it with the handlers, and one
still in its handler's session (it did not call setsid itself) is ended when its handler's
`timeout` would have been.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from superd import cgroups, proctree

KILL_AFTER_TERM = 2.0  # `timeout`: SIGKILL this long after SIGTERM (SPEC §2)


class Tree(Protocol):
    """What is asked of /proc about superd's descendants (superd/proctree.py)."""

    def children(self, pid: int | str = "self") -> list[int]: ...
    def descendants(self, pid: int | str = "self") -> list[int]: ...
    def session_of(self, pid: int) -> int | None: ...


class Named(Protocol):
    """A handler's service, as far as its remains need it."""

    name: str


@dataclass
class Escaped:
    """A process a handler left behind, now superd's child (no cgroup holds it)."""

    session: int  # its session id: its handler's pid, unless it made a session of its own
    owner: Named | None  # the service of that handler, when the session tells
    deadline: float | None  # its handler's timeout (then, 2 s later, SIGKILL)
    sig: int = signal.SIGTERM


@dataclass
class Lingering:
    """A cgroup whose handler exited while processes it started still run in it."""

    owner: Named | None
    deadline: float | None  # its handler's timeout (then, 2 s later, cgroup.kill)
    sig: int = signal.SIGTERM


Origin = Callable[[int], "tuple[Named, float | None] | None"]  # a session's handler, if known


class Remains:
    def __init__(self, tree: Tree = proctree):
        self.tree = tree
        self.escaped: dict[int, Escaped] = {}
        self.lingering: dict[str, Lingering] = {}
        self.contained = 0  # processes in running handlers' cgroups but theirs, and lingering
        self.cgroups: cgroups.Cgroups | None = None  # made when first used
        self.mode = ""  # settings.cgroups, as last configured
        self.state = "off"  # for `superd status`: on (where) or off (why)
        self.placing = False  # new handlers get a cgroup each

    def count(self) -> int:
        """What max_children counts besides the handlers themselves."""
        return len(self.escaped) + self.contained

    def busy(self) -> bool:
        """Something to survey, even with no handler running (a count to bring to 0)."""
        return bool(self.escaped or self.lingering or self.contained
                    or (self.cgroups is not None and self.cgroups.excess()))

    # -- cgroups ------------------------------------------------------------------------------

    def use_cgroups(self, mode: str) -> str | None:
        """settings.cgroups, at start and at each reload where it changed. Returns an error to
        log: cgroups asked for (yes) and not usable."""
        if mode == self.mode:
            return None
        self.mode = mode
        decision = cgroups.decide(mode)
        if decision.own and self.cgroups is None:
            try:
                self.cgroups = cgroups.Cgroups.make(decision.own, os.getpid(),
                                                    proctree.start_ticks("self") or 0,
                                                    proctree.start_ticks)
            except OSError as e:
                decision = cgroups.Decision("", f"off: {decision.own}: {e.strerror}")
        self.placing = bool(decision.own)
        self.state = decision.reason
        if mode == "yes" and not decision.own:
            return f"settings.cgroups: yes, but {decision.reason}"
        return None

    def place(self) -> str:
        """A cgroup for a handler about to start, or "" (then the subreaper view covers it)."""
        if self.cgroups is None or not self.placing:
            return ""
        try:
            return self.cgroups.take()
        except OSError as e:  # (cgroup.max.descendants reached, say)
            self.state = f"on, but the last handler got no cgroup: {e.strerror}"
            return ""

    def vacate(self, cgroup: str, owner: Named | None, deadline: float | None) -> None:
        """A handler is gone (or never started): its cgroup is free again, or lingers with
        what is left in it."""
        if cgroup and self.cgroups is not None and not self.cgroups.give_back(cgroup):
            self.lingering[cgroup] = Lingering(owner, deadline)

    def close(self) -> None:
        """superd exits: remove its cgroups but those still holding processes."""
        if self.cgroups is not None:
            self.cgroups.remove()

    # -- signals -----------------------------------------------------------------------------

    def end(self, pid: int, cgroup: str, sig: int, below: Iterable[int]) -> None:
        """`timeout`: everything the handler `pid` started, whatever group or session it is
        in: its cgroup, or what was `below` it and what it left behind in its session."""
        if cgroup:  # everything it started is in there, whatever it did
            cgroups.signal_all(cgroup, sig)
            return
        _kill(below, sig)
        _kill([p for p, e in self.escaped.items() if e.session == pid], sig)

    def below(self, helpers: Collection[int]) -> list[int]:
        """Every process below superd but its helpers (`helpers`)."""
        return [pid for pid in self.tree.descendants() if pid not in helpers]

    def signal_everything(self, sig: int, below: Iterable[int], forking: set[str]) -> None:
        """A stop: every process in superd's cgroups, what escaped, and `below`; but not in
        the cgroups of handlers being forked (`forking`), where a spawner may be."""
        for path in self.cgroups.known() if self.cgroups is not None else ():
            if path not in forking:
                cgroups.signal_all(path, sig)
        _kill([*self.escaped, *below], sig)

    # -- the survey --------------------------------------------------------------------------

    def survey(self, running: Iterable[tuple[int, str]], skip: Callable[[int], bool],
               origin: Origin, now: float) -> None:
        """Count what handlers' cgroups hold (`running`: each handler's pid and cgroup), find
        superd's children no cgroup holds and `skip` does not know, and end at its deadline
        whatever is left."""
        found = self._survey_cgroups(running, now)
        if self.cgroups is not None:
            self.cgroups.trim()
        for pid in self.tree.children():
            if pid in self.escaped or pid in found or skip(pid):
                continue
            session = self.tree.session_of(pid)
            if session is None:
                continue
            known = origin(session)
            self.escaped[pid] = Escaped(session, known[0] if known else None,
                                        known[1] if known else None)
        for pid, e in self.escaped.items():
            if e.deadline is not None and e.deadline <= now:
                _kill([pid], e.sig)
                e.deadline, e.sig = now + KILL_AFTER_TERM, signal.SIGKILL

    def _survey_cgroups(self, running: Iterable[tuple[int, str]], now: float) -> set[int]:
        """Count, end at their deadline, free the empty ones. Returns every process found."""
        found: set[int] = set()
        count = 0
        for pid, path in running:
            try:
                pids = (cgroups.procs(path) or []) if path else []
            except (OSError, ValueError):
                continue  # (EMFILE, say: counted at the next survey)
            found.update(pids)
            count += len(pids) - (pid in pids)
        for path, left in list(self.lingering.items()):
            if self.cgroups is None or self.cgroups.give_back(path):
                del self.lingering[path]  # empty now, or gone
                continue
            try:
                pids = cgroups.procs(path) or []
            except (OSError, ValueError):
                continue
            found.update(pids)
            count += len(pids)
            if left.deadline is not None and left.deadline <= now:
                cgroups.signal_all(path, left.sig)
                left.deadline, left.sig = now + KILL_AFTER_TERM, signal.SIGKILL
        self.contained = count
        return found

    # -- superd upgrade ----------------------------------------------------------------------

    def export(self, now: float) -> dict[str, Any]:
        def until(deadline: float | None) -> float | None:
            return None if deadline is None else deadline - now
        return {"escaped": [{"pid": pid, "session": e.session, "deadline_in": until(e.deadline),
                             "service": e.owner.name if e.owner else None}
                            for pid, e in self.escaped.items()],
                "lingering": [{"cgroup": path, "deadline_in": until(g.deadline),
                               "service": g.owner.name if g.owner else None}
                              for path, g in self.lingering.items()]}

    def restore(self, state: dict[str, Any], owner: Callable[[str], Named], held: set[str],
                now: float) -> None:
        """What an earlier superd (this pid) watched; the cgroups no handler holds (`held`)
        are free, or linger."""
        def back(item: dict[str, Any]) -> tuple[Named | None, float | None]:
            return (owner(item["service"]) if item["service"] else None,
                    None if item["deadline_in"] is None else now + item["deadline_in"])
        for item in state["escaped"]:
            self.escaped[item["pid"]] = Escaped(item["session"], *back(item))
        for item in state.get("lingering", ()):
            self.lingering[item["cgroup"]] = Lingering(*back(item))
        paths = [p for p in [*held, *self.lingering] if p]
        own = cgroups.current()
        base = os.path.dirname(paths[0]) if paths else own and cgroups.base_of(
            own, os.getpid(), proctree.start_ticks("self") or 0)
        if self.cgroups is None and base and os.path.isdir(base):
            self.cgroups = cgroups.Cgroups(base)  # (cgroups off now: watched, removed at exit)
        for path in self.cgroups.known() if self.cgroups is not None else ():
            if path not in held and path not in self.lingering:
                self.vacate(path, None, None)


def _kill(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
