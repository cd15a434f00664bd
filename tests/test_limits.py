"""Limits that pause, never switch off (SPEC §2 instances/on_limit/per_source/rate/timeout, §4).

instances in queue and refuse mode, per_source across IPv4 and IPv6, a rate-limited flood,
settings.max_children, handler timeouts (SIGTERM, then SIGKILL for a handler that ignores it),
crash-loop back-off, and what `superd status --json` says about all of it.
"""

from __future__ import annotations

import re
import socket
import time

from limits_lib import (
    closed_at_once,
    log_overlap,
    max_overlap,
    read_all,
    read_stamps,
    still_open,
    svc_status,
    syslog_times,
)
from superd_testlib import (
    connect,
    connection_refused,
    free_port,
    pid_alive,
    recv_exact,
    recv_until_eof,
    status,
    tcp_exchange,
    wait_until,
    write_script,
)


def fails(d, service: str, reason: str) -> list[str]:
    rx = re.compile(rf"^FAIL: {re.escape(service)} {reason}\b")
    return [line for line in d.lines() if rx.match(line)]


# --------------------------------------------------------------------------------------------
# instances


def test_queue_serves_everyone_two_at_a_time(superd, tmp_path):
    """instances: 2, on_limit: queue: ten 1-second clients all served, never more than two at
    once, none refused; status shows the service paused while it is full."""
    stamps = tmp_path / "stamps"
    script = write_script(tmp_path / "slow.sh", f"""#!/bin/sh
echo "S $(date +%s.%N) $$" >> {stamps}
sleep 1
echo "E $(date +%s.%N) $$" >> {stamps}
echo done
""")
    port = free_port()
    d = superd({"slow": {"listen": f"127.0.0.1:{port}", "exec": [str(script)],
                         "instances": 2, "on_limit": "queue"}})
    t0 = time.monotonic()
    clients = [connect("127.0.0.1", port, timeout=30) for _ in range(10)]
    try:
        d.wait_start("slow", count=2)
        # While two handlers run and eight clients wait, the service is paused (not refusing).
        seen = None
        for _ in range(3):
            st = svc_status(d, "slow")
            if st["paused"] is not None:
                seen = st
                break
        assert seen is not None, f"queue-mode service full but status says paused=null: {st}"
        assert seen["active"] <= 2, seen
        answers = read_all(clients, timeout=30)
    finally:
        for c in clients:
            c.close()
    elapsed = time.monotonic() - t0
    assert answers == [b"done\n"] * 10, answers
    assert elapsed >= 4.0, f"10 one-second clients two at a time took only {elapsed:.1f}s"
    d.wait_exit("slow", count=10, timeout=10)
    assert not fails(d, "slow", r"\S+"), [x for x in d.lines() if x.startswith("FAIL")]
    # overlap, from the handlers' own clock and from the daemon's START/EXIT order
    events = [(t, 1 if kind == "S" else -1) for kind, t, _ in read_stamps(stamps)]
    assert len(events) == 20, events
    assert max_overlap(events) == 2, f"handler stamps: {sorted(events)}"
    assert log_overlap(d.lines(), "slow") == 2, d.lines()
    st = svc_status(d, "slow")
    assert st["accepted"] == 10 and st["refused"] == {} and st["active"] == 0, st
    assert st["paused"] is None, st


def test_refuse_closes_the_third_at_once(superd):
    port = free_port()
    d = superd({"busy": {"listen": f"127.0.0.1:{port}", "exec": ["/bin/cat"],
                         "instances": 2, "on_limit": "refuse"}})
    a, b = connect("127.0.0.1", port), connect("127.0.0.1", port)
    try:
        d.wait_start("busy", count=2)
        with connect("127.0.0.1", port) as c:
            assert closed_at_once(c), "the third client must be closed at once"
        d.wait_log(r"^FAIL: busy service_limit from=127\.0\.0\.1$")
        # the two admitted ones are served normally
        a.sendall(b"one\n")
        assert recv_exact(a, 4) == b"one\n"
        st = svc_status(d, "busy")
        assert st["refused"] == {"service_limit": 1}, st
        assert st["active"] == 2 and st["accepted"] == 2, st
        assert st["paused"] is None, "refuse mode does not pause: " + repr(st)
    finally:
        a.close()
        b.close()
    d.wait_exit("busy", count=2)
    # a slot is free again
    assert tcp_exchange("127.0.0.1", port, b"again\n") == b"again\n"
    d.wait_start("busy", count=3)


def test_per_source_counts_one_peer_ip(superd):
    """per_source: 2 on a dual-stack listener: the third from 127.0.0.1 is closed, ::1 is
    served."""
    port = free_port()
    d = superd({"ps": {"listen": str(port), "exec": ["/bin/cat"], "per_source": 2}})
    held = [connect("127.0.0.1", port), connect("127.0.0.1", port)]
    try:
        d.wait_start("ps", count=2)
        with connect("127.0.0.1", port) as c:
            assert closed_at_once(c), "the third connection from 127.0.0.1 must be closed"
        d.wait_log(r"^FAIL: ps per_source_limit from=127\.0\.0\.1$")
        with connect("::1", port) as s6:
            s6.sendall(b"six\n")
            assert recv_exact(s6, 4) == b"six\n", "a peer from ::1 has its own count"
        for s in held:
            assert still_open(s)
        st = svc_status(d, "ps")
        assert st["refused"] == {"per_source_limit": 1}, st
        assert st["accepted"] == 3, st
    finally:
        for s in held:
            s.close()
    d.wait_exit("ps", count=3)
    assert tcp_exchange("127.0.0.1", port, b"free\n") == b"free\n"


def test_rate_limited_flood_is_served_at_the_rate(superd, tmp_path):
    """rate: 20/s, 200 connections in ~2 s: every one served, about 20 starts a second after
    the first bucketful, the service answers right after, never switched off."""
    stamps = tmp_path / "stamps"
    port = free_port()
    d = superd({"rl": {"listen": f"127.0.0.1:{port}", "rate": "20/s", "backlog": 256,
                       "exec": ["/bin/sh", "-c", f'echo "S $(date +%s.%N) $$" >> {stamps}; '
                                                 "echo ok"]}})
    clients: list[socket.socket] = []
    try:
        for _ in range(200):  # the flood: 200 connections spread over about two seconds
            clients.append(connect("127.0.0.1", port, timeout=10))
            time.sleep(0.01)
        answers = read_all(clients, timeout=40)
    finally:
        for c in clients:
            c.close()
    assert answers == [b"ok\n"] * 200, [a for a in answers if a != b"ok\n"][:5]
    times = sorted(t for _, t, _ in read_stamps(stamps))
    assert len(times) == 200, len(times)
    after_bucket = times[20:]
    span = after_bucket[-1] - after_bucket[0]
    rate = (len(after_bucket) - 1) / span if span > 0 else float("inf")
    assert rate < 35, f"{rate:.1f} starts/s after the first bucket (rate: 20/s)"
    # no one-second window (past the first bucket) holds far more than the rate allows
    busiest = max(sum(1 for u in after_bucket if t <= u < t + 1.0) for t in after_bucket)
    assert busiest <= 45, f"{busiest} starts within one second (rate: 20/s)"
    # the daemon's own START lines agree
    d.wait_start("rl", count=200)
    starts = syslog_times(d, r"^START: rl ")
    assert len(starts) == 200
    assert starts[-1] - starts[20] > 179 / 35, "START lines came faster than the rate"
    # right after the flood it answers again, and nothing switched it off
    assert tcp_exchange("127.0.0.1", port, b"", timeout=10) == b"ok\n"
    assert not connection_refused("127.0.0.1", port)
    st = svc_status(d, "rl")
    assert st["refused"] == {}, st
    assert st["accepted"] >= 201, st
    assert not [x for x in d.lines() if re.search(r"(?i)disabl|switch", x)], d.lines()[-20:]


def test_max_children_across_services(superd):
    """settings.max_children: 2 counts handlers of all services; internal sessions don't count."""
    pa, pb, pe = free_port(), free_port(), free_port()
    d = superd({"a": {"listen": f"127.0.0.1:{pa}", "exec": ["/bin/cat"]},
                "b": {"listen": f"127.0.0.1:{pb}", "exec": ["/bin/cat"]},
                "echo": {"listen": f"127.0.0.1:{pe}", "internal": "echo"}},
               settings={"max_children": 2})
    sa, sb = connect("127.0.0.1", pa), connect("127.0.0.1", pb)
    try:
        d.wait_start("a")
        d.wait_start("b")
        with connect("127.0.0.1", pa) as c:
            assert closed_at_once(c), "a third handler over max_children must be refused"
        d.wait_log(r"^FAIL: a process_limit from=127\.0\.0\.1$")
        with connect("127.0.0.1", pb) as c:
            assert closed_at_once(c)
        d.wait_log(r"^FAIL: b process_limit from=127\.0\.0\.1$")
        # an in-loop internal session is not a process: echo still answers
        assert tcp_exchange("127.0.0.1", pe, b"e\n", expect_len=2) == b"e\n"
        st = status(d)
        assert st["children"] == 2, st
        assert st["services"]["a"]["refused"] == {"process_limit": 1}, st
        assert st["services"]["b"]["refused"] == {"process_limit": 1}, st
        assert st["services"]["echo"]["refused"] == {}, st
    finally:
        sa.close()
    d.wait_exit("a")
    try:
        assert tcp_exchange("127.0.0.1", pa, b"room\n") == b"room\n"
    finally:
        sb.close()


# --------------------------------------------------------------------------------------------
# timeout


def test_timeout_sigterm_then_sigkill(superd, tmp_path):
    """timeout: 1: the handler's process group gets SIGTERM (EXIT signal=15); one that ignores
    TERM is SIGKILLed about 2 s later (EXIT signal=9). Grandchildren go with it."""
    term_pid, kill_pid = tmp_path / "term.pid", tmp_path / "kill.pid"
    term = write_script(tmp_path / "term.sh",
                        f"#!/bin/sh\nsleep 30 &\necho $! > {term_pid}\nwait\necho late\n")
    stubborn = write_script(tmp_path / "stubborn.sh",
                            f"#!/bin/sh\ntrap '' TERM\nsleep 30 &\necho $! > {kill_pid}\n"
                            "wait\nwait\necho late\n")
    pt, pk = free_port(), free_port()
    d = superd({"t-term": {"listen": f"127.0.0.1:{pt}", "exec": [str(term)], "timeout": 1},
                "t-kill": {"listen": f"127.0.0.1:{pk}", "exec": [str(stubborn)],
                           "timeout": 1}})
    t0 = time.monotonic()
    ct, ck = connect("127.0.0.1", pt, 15), connect("127.0.0.1", pk, 15)
    with ct, ck:
        assert recv_until_eof(ct, 10) == b"", "a timed-out handler sends nothing more"
        t_term = time.monotonic() - t0
        assert recv_until_eof(ck, 15) == b""
        t_kill = time.monotonic() - t0
    assert 0.9 <= t_term < 6, f"SIGTERM after timeout: 1 took {t_term:.1f}s"
    assert 2.7 <= t_kill < 10, f"SIGKILL 2 s after SIGTERM: closed after {t_kill:.1f}s"
    d.wait_log(r"^FAIL: t-term timeout( from=127\.0\.0\.1)?$")
    d.wait_log(r"^FAIL: t-kill timeout( from=127\.0\.0\.1)?$")
    d.wait_log(r"^EXIT: t-term signal=15 pid=\d+ ")
    d.wait_log(r"^EXIT: t-kill signal=9 pid=\d+ ")
    for f in (term_pid, kill_pid):
        pid = int(f.read_text())
        wait_until(lambda p=pid: not pid_alive(p), 5, f"grandchild {pid} killed with its group")
    assert not [x for x in d.lines() if "late" in x]


# --------------------------------------------------------------------------------------------
# crash-loop back-off


def test_failing_exec_backs_off_and_recovers(superd, tmp_path):
    """A handler that cannot be started (here: its program is no longer executable), five
    times in a row, pauses the service 1 s, then 2 s...; clients wait in the backlog; one
    good start resets it. (Back-off is for loops no client can cause: issue 12.)"""
    script = write_script(tmp_path / "prog.sh", "#!/bin/sh\necho good\n")
    port = free_port()
    d = superd({"crash": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}})

    def hit() -> bytes:
        return tcp_exchange("127.0.0.1", port, b"", timeout=15)

    script.chmod(0o644)  # exec now fails with EACCES
    for _ in range(5):
        assert hit() == b""
    d.wait_log(r"^BACKOFF: crash 1s$")
    # paused: a new client is not refused, it waits in the backlog until the pause ends
    with connect("127.0.0.1", port, 15) as s6:
        assert recv_until_eof(s6, 10) == b""
    d.wait_log(r"^FAIL: crash exec ", count=6)
    b1 = syslog_times(d, r"^BACKOFF: crash 1s$")[0]
    f6 = syslog_times(d, r"^FAIL: crash exec ")[5]
    assert f6 - b1 >= 0.8, f"6th start failed {f6 - b1:.2f}s into a 1 s back-off"
    # the 6th failure doubles it
    d.wait_log(r"^BACKOFF: crash 2s$")
    b2 = syslog_times(d, r"^BACKOFF: crash 2s$")[0]
    script.chmod(0o755)
    with connect("127.0.0.1", port, 15) as s7:
        st = svc_status(d, "crash")
        if time.time() - b2 < 1.8:  # (a very slow `superd status` may see the pause end)
            assert st["paused"] == "backoff", f"backing off but status says {st}"
            assert st["backoff"]["seconds"] == 2 and 0 < st["backoff"]["left"] <= 2, st
        assert recv_until_eof(s7, 10) == b"good\n"
    d.wait_start("crash", count=7)
    st7 = syslog_times(d, r"^START: crash ")[6]
    assert st7 - b2 >= 1.6, f"the 7th handler started {st7 - b2:.2f}s into a 2 s back-off"
    d.wait_log(r"^EXIT: crash status=0 ")
    # one good start resets it: five more failures give 1s again, not 4s
    script.chmod(0o644)
    for n in range(1, 6):
        assert hit() == b""
        d.wait_log(r"^FAIL: crash exec ", count=6 + n)
        if n < 5:
            later = [x for x in d.lines() if x.startswith("BACKOFF: crash")][2:]
            assert not later, f"back-off after {n} failure(s) following a good run: {later}"
    d.wait_log(r"^BACKOFF: crash 1s$", count=2)
    backoffs = [x for x in d.lines() if x.startswith("BACKOFF: crash")]
    assert backoffs == ["BACKOFF: crash 1s", "BACKOFF: crash 2s", "BACKOFF: crash 1s"], backoffs


def test_handlers_that_exit_non_zero_never_back_off(superd, tmp_path):
    """A nowait handler's exit status is its own affair: each run used up one client's
    connection, there is no loop. (sshd -i exits 255 after every session.)"""
    script = write_script(tmp_path / "grumpy.sh", "#!/bin/sh\necho no\nexit 255\n")
    port = free_port()
    d = superd({"grumpy": {"listen": f"127.0.0.1:{port}", "exec": [str(script)]}})
    start = time.monotonic()
    for _ in range(20):
        assert tcp_exchange("127.0.0.1", port, b"") == b"no\n"
    d.wait_exit("grumpy", count=20)
    assert not [x for x in d.lines() if x.startswith("BACKOFF")]
    assert time.monotonic() - start < 10


def test_backoff_false_never_pauses(superd, tmp_path):
    script = write_script(tmp_path / "prog.sh", "#!/bin/sh\necho good\n")
    port = free_port()
    d = superd({"crash": {"listen": f"127.0.0.1:{port}", "exec": [str(script)],
                          "backoff": False}})
    script.chmod(0o644)
    for _ in range(8):
        assert tcp_exchange("127.0.0.1", port, b"", timeout=5) == b""
    d.wait_log(r"^FAIL: crash exec ", count=8)
    assert not [x for x in d.lines() if x.startswith("BACKOFF")]


def test_backoff_tuned(superd, tmp_path):
    script = write_script(tmp_path / "prog.sh", "#!/bin/sh\necho good\n")
    port = free_port()
    d = superd({"crash": {"listen": f"127.0.0.1:{port}", "exec": [str(script)],
                          "backoff": {"after": 2, "first": 0.5, "max": 0.5}}})
    script.chmod(0o644)
    for _ in range(2):
        assert tcp_exchange("127.0.0.1", port, b"", timeout=5) == b""
    d.wait_log(r"^BACKOFF: crash 0\.5s$")
    for _ in range(2):
        assert tcp_exchange("127.0.0.1", port, b"", timeout=5) == b""
    d.wait_log(r"^BACKOFF: crash 0\.5s$", count=2)  # max: it does not double past it


def test_wait_handler_that_leaves_its_datagram_backs_off(superd, tmp_path):
    """inetd's "looping" service: a wait handler that exits at once without reading the
    datagram that woke it would be started again at once, for ever. That backs off."""
    script = write_script(tmp_path / "lazy.sh", "#!/bin/sh\nexit 0\n")
    port = free_port()
    d = superd({"lazy": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True,
                         "exec": [str(script)]}})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"never read", ("127.0.0.1", port))
    d.wait_log(r"^BACKOFF: lazy 1s$", timeout=10)
    d.wait_log(r"^lazy: the handler exited without taking what waits on its socket$")
    assert len(d.starts("lazy")) <= 7, "it must not have been started for ever"
