"""superd/pipeline.py: a connection's way through its service's stages, admission and start.

Fake stages record what they see into one journal shared with admission, start and refusal,
so each test reads the order things happened in, as the log lines would show it: which stages
ran, whether the connection was admitted and started, or refused and for what reason.
"""

from __future__ import annotations

import socket

import pytest

from superd.pipeline import (
    ADMITTED,
    CHECKING,
    ENDED,
    WAIT,
    Connection,
    Pipeline,
)


class FakeStage:
    """Answers `answer` (None, a refusal reason, or WAIT); on expiry says `on_expiry`."""

    def __init__(self, name: str, journal: list, answer=None, deadline: float = 2.0,
                 on_expiry: str | None = None):
        self.name, self.journal, self.answer = name, journal, answer
        self.deadline, self.on_expiry = deadline, on_expiry
        self.cancelled: list[Connection] = []

    def check(self, conn, done):
        self.journal.append(self.name)
        return self.answer

    def expired(self, conn):
        self.journal.append(f"{self.name} expired")
        return self.on_expiry

    def cancel(self, conn):
        self.cancelled.append(conn)


class Run:
    """A pipeline over fake stages, with admission answering `admit_answer`."""

    def __init__(self, fake_time, *stages: tuple, admit_answer: str | None = None):
        self.journal: list = []
        self.stages = [FakeStage(name, self.journal, *rest) for name, *rest in stages]
        self.admit_answer = admit_answer
        self.time = fake_time
        self.pipeline = Pipeline(tuple(self.stages), admit=self.admit, start=self.start,
                                 refuse=self.refuse, call_later=fake_time.call_later)
        self.socks: list[socket.socket] = []

    def admit(self, conn):
        self.journal.append("admit")
        return self.admit_answer

    def start(self, conn):
        self.journal.append("start")

    def refuse(self, conn, reason):
        self.journal.append(f"refused: {reason}")

    def connect(self) -> Connection:
        a, b = socket.socketpair()
        self.socks += [a, b]
        conn = Connection(a, None, "192.0.2.1", None)
        self.pipeline.begin(conn)
        return conn

    def close(self) -> None:
        for s in self.socks:
            s.close()


@pytest.fixture
def run(fake_time):
    made: list[Run] = []

    def make(*stages, **kw) -> Run:
        made.append(Run(fake_time, *stages, **kw))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_without_stages_a_connection_goes_straight_to_admission_and_start(run, fake_time):
    r = run()
    conn = r.connect()
    assert r.journal == ["admit", "start"]
    assert conn.state == ADMITTED
    assert fake_time.timers == [], "no stage: no deadline, no timer"


def test_stages_run_in_their_order_then_admission_then_start(run):
    r = run(("proxy",), ("access",), ("ident",))
    r.connect()
    assert r.journal == ["proxy", "access", "ident", "admit", "start"]


def test_a_refusal_stops_the_rest_and_names_the_reason(run):
    r = run(("proxy",), ("access", "address"), ("ident",))
    r.connect()
    assert r.journal == ["proxy", "access", "refused: address"]


def test_a_refusal_by_admission_starts_nothing(run):
    r = run(("access",), admit_answer="per_source_limit")
    conn = r.connect()
    assert r.journal == ["access", "admit", "refused: per_source_limit"]
    assert conn.state != ADMITTED


def test_a_waiting_stage_holds_the_connection_until_done(run, fake_time):
    r = run(("proxy",), ("ident", WAIT, 5.0), ("banner",))
    conn = r.connect()
    assert r.journal == ["proxy", "ident"]
    assert conn.state == CHECKING and conn in r.pipeline.waiting
    (deadline,) = fake_time.pending()
    assert deadline.when - fake_time.now == pytest.approx(5.0), "the stage's own deadline"
    r.pipeline.done(conn, None)
    assert r.journal == ["proxy", "ident", "banner", "admit", "start"]
    assert deadline.cancelled and not r.pipeline.waiting
    assert conn.state == ADMITTED


def test_a_waiting_stage_may_refuse_when_done(run, fake_time):
    r = run(("ident", WAIT), ("banner",))
    conn = r.connect()
    r.pipeline.done(conn, "ident_refused")
    assert r.journal == ["ident", "refused: ident_refused"]
    assert fake_time.pending() == []


def test_at_the_deadline_the_stage_says_refuse(run, fake_time):
    r = run(("proxy", WAIT, 3.0, "proxy_timeout"), ("access",))
    conn = r.connect()
    fake_time.advance(2.9)
    assert r.journal == ["proxy"]
    fake_time.advance(0.1)
    assert r.journal == ["proxy", "proxy expired", "refused: proxy_timeout"]
    assert r.stages[0].cancelled == [conn], "the stage is told to stop waiting first"
    assert not r.pipeline.waiting


def test_at_the_deadline_the_stage_may_say_go_on_without_it(run, fake_time):
    """ident, say: no answer in time means USERID is unknown, not that the client is bad."""
    r = run(("ident", WAIT, 1.0, None), ("access",))
    r.connect()
    fake_time.advance(1.0)
    assert r.journal == ["ident", "ident expired", "access", "admit", "start"]


def test_a_late_answer_after_the_deadline_is_ignored(run, fake_time):
    r = run(("ident", WAIT, 1.0, "ident_timeout"))
    conn = r.connect()
    fake_time.advance(1.0)
    r.pipeline.done(conn, None)
    assert r.journal == ["ident", "ident expired", "refused: ident_timeout"]


def test_an_answer_in_time_means_no_expiry(run, fake_time):
    r = run(("ident", WAIT, 1.0, "ident_timeout"))
    conn = r.connect()
    r.pipeline.done(conn, None)
    fake_time.advance(10.0)
    r.pipeline.done(conn, None)  # a second answer changes nothing either
    assert r.journal == ["ident", "admit", "start"]


def test_two_waiting_stages_each_have_their_own_deadline(run, fake_time):
    r = run(("proxy", WAIT, 1.0, "proxy_timeout"), ("ident", WAIT, 4.0, None))
    conn = r.connect()
    fake_time.advance(0.5)
    r.pipeline.done(conn, None)
    assert fake_time.next_in() == pytest.approx(4.0), "ident's deadline runs from its start"
    fake_time.advance(3.9)
    assert r.journal == ["proxy", "ident"]
    fake_time.advance(0.1)
    assert r.journal == ["proxy", "ident", "ident expired", "admit", "start"]


def test_connections_wait_apart(run, fake_time):
    r = run(("ident", WAIT, 1.0, "ident_timeout"))
    first = r.connect()
    fake_time.advance(0.5)
    second = r.connect()
    r.pipeline.done(second, None)
    fake_time.advance(0.5)
    assert r.journal == ["ident", "ident", "admit", "start", "ident expired",
                         "refused: ident_timeout"]
    assert first.sock.fileno() >= 0, "refusing (counting, logging, closing) is refuse()'s job"


def test_abort_drops_what_waits_and_starts_nothing(run, fake_time):
    r = run(("ident", WAIT, 5.0, None), ("access",))
    conns = [r.connect() for _ in range(3)]
    r.pipeline.abort()
    assert all(c.state == ENDED and c.sock.fileno() == -1 for c in conns), "closed"
    assert sorted(map(id, r.stages[0].cancelled)) == sorted(map(id, conns))
    assert fake_time.pending() == [] and not r.pipeline.waiting
    fake_time.advance(10.0)
    r.pipeline.done(conns[0], None)
    assert r.journal == ["ident"] * 3, "nothing admitted, started or refused after abort"
