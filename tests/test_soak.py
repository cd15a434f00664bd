"""Soak: many connections across every kind of service, reloads in the middle, no leak after.

One daemon serves a mix of internal services (TCP and UDP), exec handlers (/bin/cat,
sha256sum, a UDP `wait` handler) and a python handler. Client threads hammer it with random
payloads and check every answer byte for byte, while the main thread reloads the table every
few seconds, alternating between two tables (one adds a service and changes the settings of
three others, whose sockets must stay open). At the end:

- every connection got its full correct answer: zero lost, zero wrong (counted per service);
- the daemon's own counters (`status`) and its log (START lines) agree with the client's count;
- the daemon's fd count and child count are back where they were after the warm-up, and its
  RSS is back within a small margin (Python's allocator keeps some arenas).

CI runs the short version (5,000 connections, at least 10 s). The long version (at least 20,000
connections over at least 60 s) runs with SUPERD_LONG=1 or `-m slow`:

    SUPERD_LONG=1 .venv/bin/python -m pytest -p no:cacheprovider tests/test_soak.py -s
"""

from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass

import pytest
import reliability_lib as rl
import superd_testlib as lib

SERVICES_UDP_UPPER = lib.REPO / "services" / "udp_upper"
WEIGHTS = {"echo": 3, "discard": 1, "chargen": 1, "daytime": 1, "time": 1, "cat": 2, "sha": 1,
           "py": 2, "echo-u": 2, "time-u": 1, "chargen-u": 1, "upper-u": 1}
RSS_MARGIN_KB = 3 * 1024  # growth allowed between the warmed-up baseline and the end


@dataclass
class Plan:
    connections: int  # at least this many exchanges ...
    seconds: float  # ... over at least this long
    reload_every: float
    threads: int
    deadline: float  # hard stop (the test fails if the target was not reached by then)


SHORT = Plan(connections=5000, seconds=10, reload_every=2.0, threads=6, deadline=150)
LONG = Plan(connections=20000, seconds=60, reload_every=3.0, threads=8, deadline=900)


def tables(d: lib.Superd, ports: dict[str, int]) -> tuple[dict, dict]:
    """Table A (the baseline) and table B (one more service; three services changed)."""
    def at(name: str) -> str:
        return f"127.0.0.1:{ports[name]}"

    a = {
        "echo": {"listen": at("echo"), "internal": "echo"},
        "discard": {"listen": at("discard"), "internal": "discard"},
        "chargen": {"listen": at("chargen"), "internal": "chargen"},
        "daytime": {"listen": at("daytime"), "internal": "daytime"},
        "time": {"listen": at("time"), "internal": "time"},
        "echo-u": {"listen": at("echo"), "protocol": "udp", "internal": "echo"},
        "time-u": {"listen": at("time"), "protocol": "udp", "internal": "time"},
        "chargen-u": {"listen": at("chargen"), "protocol": "udp", "internal": "chargen"},
        # A short timeout: superd keeps a finished handler's cancelled timer until its due
        # time (see test_finished_handlers_hold_no_memory), which is not what this measures.
        "cat": {"listen": at("cat"), "exec": ["/bin/cat"], "timeout": 5},
        "sha": {"listen": at("sha"), "exec": ["/usr/bin/sha256sum"]},
        "py": {"listen": at("py"), "python": "soakhandler.py:handle", "instances": 200},
        "upper-u": {"listen": at("upper"), "protocol": "udp", "wait": True,
                    "exec": [str(SERVICES_UDP_UPPER)]},
    }
    b = json.loads(json.dumps(a))
    b["extra"] = {"listen": at("extra"), "internal": "echo"}
    b["extra-cat"] = {"listen": at("extra-cat"), "exec": ["/bin/cat"]}  # removed again in A
    b["cat"]["timeout"] = 6
    b["sha"]["env"] = {"SOAK_TABLE": "B"}
    b["py"]["instances"] = 300
    return a, b


class Clients:
    """Client threads doing random exchanges; every result is counted."""

    def __init__(self, ports: dict[str, int], threads: int, seed: int):
        self.ports = ports
        self.kinds = list(WEIGHTS)
        self.weights = [WEIGHTS[k] for k in self.kinds]
        self.stop = threading.Event()
        self.ok = [Counter() for _ in range(threads)]
        self.bad: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i, seed + i), daemon=True)
                        for i in range(threads)]

    def port(self, kind: str) -> int:
        return self.ports[{"echo-u": "echo", "time-u": "time", "chargen-u": "chargen",
                           "upper-u": "upper"}.get(kind, kind)]

    def run(self, i: int, seed: int) -> None:
        rng = random.Random(seed)
        for n in range(10_000_000):
            if self.stop.is_set():
                return
            kind = rng.choices(self.kinds, self.weights)[0]
            try:
                wrong = rl.EXCHANGES[kind](self.port(kind), rng)
            except (OSError, AssertionError) as e:
                wrong = f"{kind}: {e!r}"
            if wrong is None:
                self.ok[i][kind] += 1
            else:
                with self.lock:
                    self.bad.append(f"thread {i} #{n} {kind} at {time.monotonic():.3f}: {wrong}")
                    self.ok[i]["__errors__"] += 1

    def total(self) -> int:
        return sum(sum(c.values()) for c in self.ok)

    def tcp_total(self) -> int:
        """TCP connections done (UDP exchanges are extra; errors count as not done)."""
        return sum(c[k] for c in self.ok for k in rl.TCP_KINDS)

    def counts(self) -> Counter:
        out: Counter = Counter()
        for c in self.ok:
            out.update(c)
        out.pop("__errors__", None)
        return out

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout: float = 60) -> None:
        self.stop.set()
        end = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, end - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"client threads stuck: {alive}"


def warm_up(ports: dict[str, int], rounds: int = 20) -> Counter:
    """A few exchanges of every kind, so the baseline is taken with everything imported."""
    rng = random.Random(1)
    done: Counter = Counter()
    c = Clients(ports, 1, 0)
    for _ in range(rounds):
        for kind in WEIGHTS:
            wrong = rl.EXCHANGES[kind](c.port(kind), rng)
            assert wrong is None, f"warm-up: {wrong}"
            done[kind] += 1
    return done


def extras(ports: dict[str, int], sent: Counter) -> None:
    """Table B's own services answer (asked from here: they come and go with reloads)."""
    for name in ("extra", "extra-cat"):
        assert lib.tcp_exchange("127.0.0.1", ports[name], b"x\n", timeout=10) == b"x\n"
        sent[name] += 1


def log_counts(d: lib.Superd) -> tuple[Counter, list[str], int]:
    """START lines per service, FAIL/traceback/refused lines, reload lines."""
    starts: Counter = Counter()
    bad = []
    reloads = 0
    for line in d.lines():
        m = re.match(r"^START: (\S+) pid=", line)
        if m:
            starts[m[1]] += 1
        elif line.startswith("reloaded: "):
            reloads += 1
        elif (line.startswith(("FAIL:", "BACKOFF:")) or "Traceback" in line
              or "refused" in line or "cannot" in line):
            bad.append(line)
    return starts, bad, reloads


def figures(record: dict) -> None:
    """Print the figures (visible with -s) and append them to $SUPERD_FIGURES if set."""
    line = json.dumps(record, sort_keys=True)
    print("\nFIGURES " + line)
    path = os.environ.get("SUPERD_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def soak(d: lib.Superd, plan: Plan, label: str) -> None:
    with rl.NotifyReader(d):
        _soak(d, plan, label)


def _soak(d: lib.Superd, plan: Plan, label: str) -> None:
    ports = {n: lib.free_port() for n in ("echo", "discard", "chargen", "daytime", "time", "cat",
                                         "sha", "py", "upper", "extra", "extra-cat")}
    (d.table.parent / "soakhandler.py").write_text(rl.PY_HANDLER)
    table_a, table_b = tables(d, ports)
    d.start(table_a)
    at_ready = rl.snapshot(d)

    # Warm up (every service, one reload there and back), then take the baseline.
    sent: Counter = warm_up(ports)
    d.reload(table_b)
    extras(ports, sent)
    d.reload(table_a)
    sent.update(warm_up(ports, 5))
    baseline = rl.settled_snapshot(d)

    clients = Clients(ports, plan.threads, seed=random.randrange(1 << 30))
    t0 = time.monotonic()
    clients.start()
    reloads = 2
    current = "a"
    try:
        for _ in range(100_000):
            elapsed = time.monotonic() - t0
            if clients.tcp_total() >= plan.connections and elapsed >= plan.seconds:
                break
            assert elapsed < plan.deadline, (
                f"only {clients.tcp_total()} TCP connections in {elapsed:.0f}s (target "
                f"{plan.connections} in {plan.deadline}s); errors: {clients.bad[:5]}")
            rl.assert_alive(d)
            time.sleep(plan.reload_every)
            # reloads happen "in the middle": not in the last stretch of the run
            if clients.tcp_total() < plan.connections * 0.9 or elapsed < plan.seconds * 0.8:
                current = "b" if current == "a" else "a"
                d.reload(table_b if current == "b" else table_a)
                reloads += 1
                if current == "b":
                    extras(ports, sent)
    finally:
        clients.join()
    elapsed = time.monotonic() - t0
    if current == "b":
        d.reload(table_a)
        reloads += 1
    rl.assert_alive(d)
    counts = clients.counts()
    total = sum(counts.values())
    errors = len(clients.bad)
    assert errors == 0, (f"{errors} of {total + errors} exchanges failed:\n"
                         + "\n".join(clients.bad[:20]))
    tcp = sum(counts[k] for k in rl.TCP_KINDS)
    assert tcp >= plan.connections

    # The daemon's own counters and its log agree with what the clients saw.
    sent.update(counts)
    status = rl.wait_quiet(d, 30)
    for name in sorted(rl.TCP_KINDS):
        got = status["services"][name]
        assert got["accepted"] == sent[name], (name, got, sent[name])
        assert not got["refused"], (name, got)
        assert got["paused"] is None, (name, got)

    def log_agrees():
        starts, bad, reload_lines = log_counts(d)
        return (all(starts[n] == sent[n] for n in rl.TCP_KINDS | {"extra", "extra-cat"})
                and reload_lines == reloads and (starts, bad))

    try:
        starts, bad = lib.wait_until(log_agrees, 30, "log lines for every connection",
                                     interval=0.5)
    except AssertionError:
        starts, bad, reload_lines = log_counts(d)
        raise AssertionError(f"log: START lines {dict(starts)} vs sent {dict(sent)}; "
                             f"{reload_lines} reload lines vs {reloads} reloads") from None
    assert bad == [], "unexpected log lines:\n" + "\n".join(bad[:20])

    # No leak: fds and children back to the baseline, RSS within a small margin.
    end = rl.settled_snapshot(d)
    figures({"test": label, "exchanges": total, "tcp_connections": tcp,
             "udp_exchanges": total - tcp, "errors": errors, "seconds": round(elapsed, 1),
        "per_second": round(total / elapsed), "reloads": reloads,
        "per_service": dict(sorted(counts.items())),
        "fds": [at_ready.nfds, baseline.nfds, end.nfds],
        "rss_kb": [at_ready.rss_kb, baseline.rss_kb, end.rss_kb],
        "processes_below": [len(at_ready.children), len(baseline.children),
                            len(end.children)],
        "below_at_end": [rl.cmdline(p)[-60:] for p in end.children]})
    assert end.children == baseline.children, (
        f"processes below superd: {baseline.children} at the start, {end.children} at the end")
    assert end.nfds == baseline.nfds, "fd leak: " + rl.fd_diff(baseline, end)
    assert rl.fd_kinds(end.fds) == rl.fd_kinds(baseline.fds), rl.fd_diff(baseline, end)
    assert end.rss_kb <= baseline.rss_kb + RSS_MARGIN_KB, (
        f"RSS grew from {baseline.rss_kb} kB to {end.rss_kb} kB over {total} exchanges")


@pytest.fixture
def own_daemon(request, tmp_path, rsyslog):
    """A Superd managed here rather than by the `new_daemon` fixture.

    The fixture's teardown checks that no pid ever logged in a START line is still alive; after
    tens of thousands of handlers the pids wrap around (pid_max is 32768 here) and unrelated
    new processes get them. This teardown checks the handlers running at stop time instead.
    """
    d = lib.Superd(tmp_path / "d", rsyslog, request.node.nodeid)
    yield d
    if d.proc is None:
        return
    running = []
    if d.proc.poll() is None:
        # (a pid already gone, or a zombie, has no start time: nothing to wait for)
        running = [(pid, t) for pid in rl.descendants(d.pid)
                   if (t := rl.start_time(pid)) is not None]
    rc = d.stop()
    d.close_files()
    assert rc == 0, f"superd exited {rc}: {d.stderr_text()[-2000:]}"
    lib.wait_until(lambda: not [p for p, t in running if rl.start_time(p) == t], 10,
                   f"handlers {running} gone after superd stopped")


def test_soak_short(own_daemon):
    """CI: at least 5,000 TCP connections over at least 10 s, reloads every 2 s, no loss/leak."""
    soak(own_daemon, SHORT, "soak-short")


@pytest.mark.slow
def test_soak_long(request, own_daemon):
    """At least 20,000 TCP connections over at least 60 s, reloads every 3 s, no loss, no leak."""
    rl.require_long(request)
    soak(own_daemon, LONG, "soak-long")


def _exchanges(port: int, n: int, threads: int = 4) -> list[str]:
    """n cat round trips from `threads` threads; the list of what went wrong."""
    bad: list[str] = []

    def run(k: int) -> None:
        rng = random.Random(k)
        for _ in range(n // threads):
            try:
                wrong = rl.x_cat(port, rng)
            except (OSError, AssertionError) as e:
                wrong = repr(e)
            if wrong:
                bad.append(wrong)

    ts = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "client threads stuck"
    return bad


FINISHED = int(os.environ.get("SUPERD_FINISHED_HANDLERS", "3000"))


@pytest.mark.parametrize("timeout", [3600])
def test_finished_handlers_hold_no_memory(own_daemon, timeout):
    """What superd keeps for a handler is freed when the handler exits.

    A service with a long `timeout` and one long-running handler (an idle client), then
    thousands of short connections: the daemon's RSS must not grow with the number of
    handlers that have come and gone (memory in proportion to rate x timeout is a leak for
    any busy service with a timeout of an hour).
    """
    d = own_daemon
    port = lib.free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"]}
    if timeout:
        svc["timeout"] = timeout
    d.start({"cat": svc})
    with rl.NotifyReader(d), lib.connect("127.0.0.1", port) as held:
        held.sendall(b"x")
        assert lib.recv_exact(held, 1) == b"x"
        assert _exchanges(port, 200) == []
        lib.wait_until(lambda: len(rl.handler_procs(d)) == 1, 10, "only the held handler left")
        before = rl.rss_kb(d.pid)
        t0 = time.monotonic()
        assert _exchanges(port, FINISHED) == []
        lib.wait_until(lambda: len(rl.handler_procs(d)) == 1, 10, "only the held handler left")
        after = rl.rss_kb(d.pid)
        figures({"test": "finished-handlers-memory", "timeout": timeout,
                 "handlers": FINISHED, "rss_kb": [before, after],
                 "seconds": round(time.monotonic() - t0, 1)})
        rl.assert_alive(d)
        assert after - before < 1024, (
            f"RSS grew by {after - before} kB over {FINISHED} finished handlers "
            f"({(after - before) * 1024 // FINISHED} bytes each) with timeout: {timeout}")
