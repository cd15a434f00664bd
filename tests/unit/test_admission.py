"""superd/limits.py: which connections a service admits, and when its listener pauses.

A paused service's listener is not polled, so its clients wait in the kernel backlog: that is
what `paused` means to a user. Each test drives a Limits the way a service does (admit, then
the handler runs; its exit frees the slot) on a fake clock, and reads what a user would see:
the refusal reason of the FAIL line, whether the listener is polled, the BACKOFF lines.
"""

from __future__ import annotations

import errno

import pytest

from superd.config import Service
from superd.limits import Limits

A, B = "192.0.2.1", "192.0.2.2"


class Svc:
    """A service as Limits sees it: its running handlers, max_children's room, its log."""

    def __init__(self, fake_time, **config):
        self.time = fake_time
        self.running = 0
        self.room_left = True
        self.warnings: list[str] = []
        self.polled: list[str | None] = []  # `paused` at each change the service is told of
        self.limits = Limits(Service(name="svc", **config), active=lambda: self.running,
                             clock=fake_time.clock, call_later=fake_time.call_later,
                             changed=lambda: self.polled.append(self.limits.paused),
                             warn=self.warnings.append)
        self.limits.configure(self.limits.config, self.room)

    def room(self) -> str | None:
        return None if self.room_left else "process_limit"

    def connect(self, peer: str = A) -> str | None:
        """A connection reaches admission: None and its handler runs, or the refusal."""
        reason = self.limits.admit(peer)
        if reason is None:
            self.running += 1
        return reason

    def exit(self, peer: str = A) -> None:
        """A handler is reaped (the process table counts it gone first, as it does)."""
        self.running -= 1
        self.limits.freed(peer)

    @property
    def paused(self) -> str | None:
        return self.limits.paused

    def reload(self, **config) -> None:
        self.limits.configure(Service(name="svc", **config), self.room)


# -- instances -------------------------------------------------------------------------------


def test_queue_pauses_when_the_last_slot_is_taken_and_resumes_when_one_frees(fake_time):
    svc = Svc(fake_time, instances=2, on_limit="queue")
    assert svc.connect() is None and svc.paused is None
    assert svc.connect() is None
    assert svc.paused == "service_limit", "the last slot is taken: stop polling the listener"
    assert svc.polled == ["service_limit"]
    svc.exit()
    assert svc.paused is None and svc.polled == ["service_limit", None]
    assert fake_time.pending() == [], "a queue pause ends by a freed slot, not by a timer"


def test_queue_refuses_what_a_batch_brings_past_the_limit(fake_time):
    """Connections already accepted when the pause began are refused, not started."""
    svc = Svc(fake_time, instances=1, on_limit="queue")
    assert svc.connect() is None and svc.paused == "service_limit"
    assert svc.connect(B) == "service_limit"
    assert svc.running == 1


def test_refuse_mode_refuses_over_the_limit_and_never_pauses(fake_time):
    svc = Svc(fake_time, instances=1, on_limit="refuse")
    assert svc.connect() is None
    assert [svc.connect() for _ in range(3)] == ["service_limit"] * 3
    assert svc.paused is None and svc.polled == []
    svc.exit()
    assert svc.connect() is None


def test_unlimited_instances_never_refuse_or_pause(fake_time):
    svc = Svc(fake_time)
    assert all(svc.connect() is None for _ in range(500))
    assert svc.paused is None


def test_a_reload_that_raises_instances_ends_the_pause(fake_time):
    svc = Svc(fake_time, instances=1, on_limit="queue")
    svc.connect()
    assert svc.paused == "service_limit"
    svc.reload(instances=3, on_limit="queue")
    assert svc.paused is None
    assert svc.connect() is None and svc.paused is None
    assert svc.connect() is None and svc.paused == "service_limit"


# -- per_source and max_children -------------------------------------------------------------


def test_per_source_counts_each_peer_apart(fake_time):
    svc = Svc(fake_time, per_source=2)
    assert svc.connect(A) is None and svc.connect(A) is None
    assert svc.connect(A) == "per_source_limit"
    assert svc.connect(B) is None, "another peer has its own count"
    svc.exit(A)
    assert svc.connect(A) is None, "a handler of A exited: A has room again"
    assert svc.connect(A) == "per_source_limit"
    assert svc.paused is None, "per_source refuses; it never pauses the listener"


def test_per_source_counts_unix_peers_by_uid(fake_time):
    svc = Svc(fake_time, per_source=1)
    assert svc.connect("uid:1000") is None
    assert svc.connect("uid:1000") == "per_source_limit"
    assert svc.connect("uid:1001") is None


def test_a_refused_connection_takes_no_per_source_slot(fake_time):
    svc = Svc(fake_time, per_source=1)
    svc.room_left = False
    assert svc.connect(A) == "process_limit"
    svc.room_left = True
    assert svc.connect(A) is None, "the refusal must not have counted against A"


def test_max_children_refuses_with_process_limit(fake_time):
    svc = Svc(fake_time)
    svc.room_left = False
    assert svc.connect() == "process_limit"
    assert svc.paused is None
    svc.room_left = True
    assert svc.connect() is None


def test_the_first_limit_reached_names_the_refusal(fake_time):
    """instances before per_source before max_children, as the FAIL line says one reason."""
    svc = Svc(fake_time, instances=1, on_limit="refuse", per_source=1)
    svc.connect(A)
    svc.room_left = False
    assert svc.connect(A) == "service_limit"
    svc.exit(A)
    svc.reload(per_source=1)
    svc.room_left = True
    assert svc.connect(A) is None
    svc.room_left = False
    assert svc.connect(A) == "per_source_limit"
    assert svc.connect(B) == "process_limit"


# -- rate ------------------------------------------------------------------------------------


def test_rate_lets_a_burst_through_then_pauses_until_a_token_is_back(fake_time):
    svc = Svc(fake_time, rate=(2, 1.0))  # rate: 2/s
    assert svc.connect() is None and svc.paused is None
    assert svc.connect() is None
    assert svc.paused == "rate"
    assert fake_time.next_in() == pytest.approx(0.5)
    fake_time.advance(0.49)
    assert svc.paused == "rate"
    fake_time.advance(0.01)
    assert svc.paused is None, "a rate pause ends by itself"


def test_rate_holds_the_long_run_rate(fake_time):
    """A client that connects whenever the listener is polled gets N per period, no more."""
    svc = Svc(fake_time, rate=(5, 1.0))
    admitted = 0
    for _ in range(2000):  # 10 s in 5 ms steps
        if svc.paused is None:
            assert svc.connect() is None
            svc.exit()
            admitted += 1
        fake_time.advance(0.005)
    assert 5 + 5 * 10 - 1 <= admitted <= 5 + 5 * 10, admitted


def test_rate_per_minute_pauses_for_a_tenth_of_a_minute_per_token(fake_time):
    svc = Svc(fake_time, rate=(6, 60.0))  # rate: 6/min
    for _ in range(6):
        assert svc.connect() is None
    assert svc.paused == "rate" and fake_time.next_in() == pytest.approx(10.0)


def test_an_idle_bucket_fills_up_to_n_and_no_further(fake_time):
    svc = Svc(fake_time, rate=(3, 1.0))
    fake_time.advance(3600)
    burst = 0
    while svc.paused is None and burst < 100:
        svc.connect()
        burst += 1
    assert burst == 3


def test_a_rate_pause_that_ends_while_full_keeps_the_listener_paused(fake_time):
    svc = Svc(fake_time, rate=(2, 1.0), instances=5, on_limit="queue")
    svc.connect()
    svc.connect()
    assert svc.paused == "rate"
    svc.reload(rate=(2, 1.0), instances=2, on_limit="queue")  # now full, as the table says
    fake_time.advance(1.0)
    assert svc.paused == "service_limit", "the bucket is back but no slot is"
    svc.exit()
    assert svc.paused is None


def test_a_reload_does_not_refill_the_rate_bucket(fake_time):
    """SIGHUP (any table change) must not let a rate-limited service take a fresh burst."""
    svc = Svc(fake_time, rate=(2, 60.0))  # rate: 2/min, a token every 30 s
    svc.connect()
    svc.connect()
    assert svc.paused == "rate"
    svc.reload(rate=(2, 60.0))
    fake_time.advance(30.0)
    assert svc.paused is None
    assert svc.connect() is None
    assert svc.paused == "rate", "30 s brought one token back, not two"


# -- back-off (starts that fail in a row) ----------------------------------------------------


def quick_failures(svc: Svc, n: int) -> None:
    """Handlers that could not be started (exec failed), n of them in a row."""
    for _ in range(n):
        assert svc.connect() is None
        svc.exit()
        svc.limits.failed()


def test_five_failed_starts_in_a_row_back_off_one_second(fake_time):
    svc = Svc(fake_time)
    quick_failures(svc, 4)
    assert svc.paused is None and svc.warnings == []
    quick_failures(svc, 1)
    assert svc.paused == "backoff"
    assert svc.warnings == ["BACKOFF: svc 1s"]
    assert svc.limits.backoff_left() == {"seconds": 1.0, "left": 1.0}
    fake_time.advance(0.99)
    assert svc.paused == "backoff"
    fake_time.advance(0.01)
    assert svc.paused is None and svc.limits.backoff_left() is None


def test_back_off_doubles_per_step_up_to_sixty_seconds(fake_time):
    svc = Svc(fake_time)
    quick_failures(svc, 5)
    for _ in range(8):
        fake_time.advance(fake_time.next_in())
        quick_failures(svc, 1)
    assert svc.warnings == [f"BACKOFF: svc {s}s" for s in (1, 2, 4, 8, 16, 32, 60, 60, 60)]
    assert fake_time.next_in() == pytest.approx(60.0)


def test_one_good_start_resets_the_back_off(fake_time):
    svc = Svc(fake_time)
    quick_failures(svc, 6)
    assert svc.warnings[-1] == "BACKOFF: svc 2s"
    fake_time.advance(2.0)
    svc.connect()
    svc.exit()
    svc.limits.succeeded()
    quick_failures(svc, 4)
    assert svc.paused is None, "the count starts again after a good start"
    quick_failures(svc, 1)
    assert svc.warnings[-1] == "BACKOFF: svc 1s", "and so does the step"


def test_how_handlers_exit_never_backs_off(fake_time):
    """A nowait handler's exit status is its own affair (sshd -i exits 255 each time)."""
    svc = Svc(fake_time)
    for _ in range(50):
        assert svc.connect() is None
        svc.exit()
        svc.limits.succeeded()  # what a service says of a handler that started
    assert svc.paused is None and svc.warnings == []


def test_backoff_tuned_and_off(fake_time):
    from superd.fields import Backoff
    svc = Svc(fake_time, backoff=Backoff(after=2, first=0.5, most=0.5))
    quick_failures(svc, 2)
    assert svc.warnings == ["BACKOFF: svc 0.5s"]
    fake_time.advance(0.5)
    quick_failures(svc, 1)
    assert svc.warnings == ["BACKOFF: svc 0.5s", "BACKOFF: svc 0.5s"], "max: no doubling past"
    off = Svc(fake_time, backoff=None)
    quick_failures(off, 20)
    assert off.paused is None and off.warnings == []


def test_back_off_ending_while_full_keeps_the_queue_pause(fake_time):
    svc = Svc(fake_time, instances=3, on_limit="queue")
    svc.connect(B)  # a long-running handler
    quick_failures(svc, 5)
    assert svc.paused == "backoff"
    svc.reload(instances=1, on_limit="queue")  # its one slot is taken
    fake_time.advance(1.0)
    assert svc.paused == "service_limit"
    svc.exit(B)
    assert svc.paused is None


@pytest.mark.parametrize("config", [{"rate": (1, 0.1)}, {"instances": 1, "on_limit": "queue"}])
def test_an_admission_during_a_back_off_does_not_cut_it_short(fake_time, config):
    svc = Svc(fake_time, **config)
    for _ in range(5):
        svc.limits.failed()  # five failed starts
    assert svc.paused == "backoff"
    assert svc.connect(B) is None  # it had passed its stages before the back-off began
    svc.exit(B)
    svc.limits.succeeded()  # ... and ran well (which resets the *next* step)
    fake_time.advance(0.5)
    assert svc.paused is not None, "the 1 s back-off must last 1 s"


# -- out of file descriptors -----------------------------------------------------------------


EMFILE = OSError(errno.EMFILE, "Too many open files")


def test_out_of_fds_pauses_and_doubles_up_to_five_seconds(fake_time):
    svc = Svc(fake_time)
    steps = []
    for _ in range(9):
        svc.limits.out_of_fds(EMFILE)
        assert svc.paused == "fds"
        steps.append(round(fake_time.next_in(), 3))
        fake_time.advance(fake_time.next_in())
        assert svc.paused is None
    assert steps == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert svc.warnings[0] == "svc: accept: Too many open files; pausing 0.1s"


def test_a_pause_that_replaces_another_is_not_ended_by_the_first_ones_timer(fake_time):
    svc = Svc(fake_time)
    svc.limits.out_of_fds(EMFILE)  # 0.1 s
    quick_failures(svc, 5)  # then a 1 s back-off
    fake_time.advance(0.5)
    assert svc.paused == "backoff"
    fake_time.advance(0.5)
    assert svc.paused is None


def test_an_accept_that_works_resets_the_fd_back_off(fake_time):
    svc = Svc(fake_time)
    for _ in range(3):
        svc.limits.out_of_fds(EMFILE)
        fake_time.advance(fake_time.next_in())
    svc.limits.accepted_ok()
    svc.limits.out_of_fds(EMFILE, "spawner")
    assert fake_time.next_in() == pytest.approx(0.1)
    assert svc.warnings[-1] == "svc: spawner: Too many open files; pausing 0.1s"
