"""The classic internal services, answered inside the loop (RFC 862, 863, 864, 867, 868).

As in inetd.c, a table maps each name to its stream and datagram behaviour. Stream sessions are
non-blocking and driven by the selector, so a client that reads chargen slowly (or never) costs
one registered fd and stalls nothing. Daytime and time answer at once and close: their reply is a
few bytes that always fit in a fresh socket's send buffer.
"""

from __future__ import annotations

import base64
import itertools
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from superd.loop import READ, WRITE, Loop, Timer

RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01
CHUNK = 65536
SESSION_BUFFER = 64 * 1024  # echo stops reading while this much of a session is unsent
PACKET = 256 * 1024  # the largest seqpacket message read whole (a unix one fits its sndbuf)
MAX_QUEUED = 64  # packet echo stops reading while this many messages are unsent
READS_PER_TURN = 4  # recv calls per readiness before other clients get their turn
TRIM_AFTER = 1 << 20  # once echo sessions held this much, give the heap back when they are done


def _chargen_cycle() -> bytes:
    """RFC 864's pattern: 72 of the 95 printable characters a line, shifted by one each line."""
    printable = bytes(range(32, 127))
    ring = printable * 2
    return b"".join(ring[i:i + 72] + b"\r\n" for i in range(len(printable)))


CHARGEN = _chargen_cycle()
CHARGEN2 = CHARGEN * 2 + CHARGEN[:CHUNK]  # any window of up to CHUNK bytes is one slice
CHARGEN_VIEW = memoryview(CHARGEN2)  # slices of it copy nothing
LINE = 74  # 72 characters and CR LF
LINES = len(CHARGEN) // LINE


def daytime_text() -> bytes:
    return time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n").encode()


def time_bytes() -> bytes:
    return struct.pack("!I", (int(time.time()) + RFC868_EPOCH) & 0xFFFFFFFF)


class Budget:
    """What all echo sessions together may hold unsent (`settings.max_buffered`).

    A client that sends and never reads leaves its echo in superd's memory; one session holds
    at most SESSION_BUFFER, and all of them together at most `limit`. A session that finds the
    budget spent stops reading until others have sent enough of theirs.
    """

    def __init__(self, limit: int, emptied: Callable[[], None]):
        self.limit, self.used = limit, 0
        self.emptied = emptied  # called when nothing is held any more after a lot was
        self.waiting: set[Echo | PacketEcho] = set()
        self.peak = 0  # the most held since the sessions last held nothing

    def give_back(self, size: int) -> None:
        self.used -= size
        if not self.used and self.peak >= TRIM_AFTER:
            self.peak = 0
            self.emptied()
        if self.waiting and self.used <= self.limit // 2:
            waiting, self.waiting = self.waiting, set()
            for session in waiting:
                if not session.closed:
                    session.watch(session.wanted())


class Session:
    """One internal stream connection; subclasses say what to do when readable or writable."""

    events = READ
    fds = 1  # sockets it holds, as settings.max_sessions counts them (a relay holds two)

    def __init__(self, loop: Loop, sock: socket.socket, done: Callable[[Session], None],
                 peer: str, budget: Budget):
        self.loop, self.sock, self.done, self.peer = loop, sock, done, peer
        self.budget = budget
        self.closed = False
        self.seen = 0  # bytes moved when the idle sweep last looked (superd/sessions.py)
        self.idle_sweeps = 0
        self.watching = 0  # the events we are registered for; 0: not registered
        self.timer: Timer | None = None  # the service's `timeout`, if it has one
        self.started = time.monotonic()
        self.bytes_in = self.bytes_out = 0

    def start(self) -> None:
        """Begin serving; the owner has recorded the session by now, as `done` may come at once.

        Read before registering with the selector: the client's bytes, and often its FIN, are
        usually queued already, and a session that ends here never costs an epoll_ctl.
        """
        self.sock.setblocking(False)
        if self.events & READ:
            self.ready(READ)
        if not self.closed:
            self.watch(self.wanted())

    def wanted(self) -> int:
        return self.events

    def extra(self) -> dict[str, object]:
        """What the next superd needs, beyond the socket, to go on with it (superd upgrade)."""
        return {}

    def take_extra(self, extra: dict[str, Any]) -> None:
        pass

    def resume(self, extra: dict[str, Any]) -> None:
        """Go on where an earlier superd left off (superd upgrade): its state, its events."""
        self.take_extra(extra)
        self.sock.setblocking(False)
        self.watch(self.wanted())

    def watch(self, events: int) -> None:
        if events == self.watching:
            return
        if not events:
            self.loop.remove(self.sock)  # waits for something else: not for its socket
        elif self.watching:
            self.loop.modify(self.sock, events, self.ready)
        else:
            self.loop.add(self.sock, events, self.ready)
        self.watching = events

    def ready(self, mask: int) -> None:
        if self.closed:
            return
        try:
            if mask & READ:
                self.readable()
            if mask & WRITE and not self.closed:
                self.writable()
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close()

    def readable(self) -> None:
        """Read and drop what is there, up to a few chunks a turn; close at EOF."""
        for _ in range(READS_PER_TURN):
            data = self.sock.recv(CHUNK)
            if not data:
                self.close()
                return
            self.bytes_in += len(data)

    def writable(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.watching:
                self.loop.remove(self.sock)
            self.sock.close()
            self.done(self)


class Echo(Session):
    def __init__(self, *args: object):
        self.pending = bytearray()
        self.eof = False
        super().__init__(*args)  # type: ignore[arg-type]

    def room(self) -> int:
        """How much more this session may read before what it holds is sent."""
        return min(CHUNK, SESSION_BUFFER - len(self.pending),
                   self.budget.limit - self.budget.used)

    def readable(self) -> None:
        budget = self.budget
        try:
            for _ in range(READS_PER_TURN):
                room = self.room()
                if room <= 0:
                    break
                data = self.sock.recv(room)
                if not data:
                    self.eof = True
                    break
                self.bytes_in += len(data)
                if not self.pending:
                    try:  # the common case: straight back, nothing held
                        sent = self.sock.send(data)
                    except BlockingIOError:
                        sent = 0
                    self.bytes_out += sent
                    data = data[sent:]
                    if not data:
                        continue
                self.pending += data
                budget.used += len(data)
                if budget.used > budget.peak:
                    budget.peak = budget.used
        except BlockingIOError:
            pass
        self.flush()

    def writable(self) -> None:
        self.flush()

    def extra(self) -> dict[str, object]:
        return {"pending": base64.b64encode(bytes(self.pending)).decode(), "eof": self.eof}

    def take_extra(self, extra: dict[str, Any]) -> None:
        self.pending += base64.b64decode(extra.get("pending", ""))
        self.eof = bool(extra.get("eof"))
        self.budget.used += len(self.pending)

    def wanted(self) -> int:
        reading = not self.eof and self.room() > 0
        if not reading and not self.eof and len(self.pending) < SESSION_BUFFER:
            self.budget.waiting.add(self)  # the shared budget is spent: wait for room
        return (READ if reading else 0) | (WRITE if self.pending else 0)

    def flush(self) -> None:
        if self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                sent = 0
            del self.pending[:sent]
            self.bytes_out += sent
            if sent:
                self.budget.give_back(sent)
        if self.eof and not self.pending:
            self.close()
            return
        self.watch(self.wanted())

    def close(self) -> None:
        if self.pending and not self.closed:
            held, self.pending = len(self.pending), bytearray()
            self.budget.give_back(held)
        self.budget.waiting.discard(self)
        super().close()


class PacketEcho(Session):
    """Echo on a SOCK_SEQPACKET socket: each message goes back as one message (a byte buffer
    would join messages that arrive together). An empty message reads as the end, as recv()
    cannot tell the two apart. What it holds counts in the echo budget too."""

    def __init__(self, *args: object):
        self.pending: deque[bytes] = deque()
        self.eof = False
        super().__init__(*args)  # type: ignore[arg-type]

    def readable(self) -> None:
        budget = self.budget
        for _ in range(READS_PER_TURN):
            if not self._may_read():
                break
            try:
                data = self.sock.recv(PACKET)
            except BlockingIOError:  # (not raised on: what was read must still be sent)
                break
            if not data:
                self.eof = True
                break
            self.bytes_in += len(data)
            self.pending.append(data)
            budget.used += len(data)
            budget.peak = max(budget.peak, budget.used)
        self.flush()

    def _may_read(self) -> bool:
        return len(self.pending) < MAX_QUEUED and self.budget.used < self.budget.limit

    def extra(self) -> dict[str, object]:
        return {"messages": [base64.b64encode(m).decode() for m in self.pending],
                "eof": self.eof}

    def take_extra(self, extra: dict[str, Any]) -> None:
        for message in extra.get("messages", []):
            self.pending.append(base64.b64decode(message))
            self.budget.used += len(self.pending[-1])
        self.eof = bool(extra.get("eof"))

    def writable(self) -> None:
        self.flush()

    def wanted(self) -> int:
        reading = not self.eof and self._may_read()
        if not reading and not self.eof and len(self.pending) < MAX_QUEUED:
            self.budget.waiting.add(self)
        return (READ if reading else 0) | (WRITE if self.pending else 0)

    def flush(self) -> None:
        while self.pending:
            try:
                sent = self.sock.send(self.pending[0])
            except BlockingIOError:
                break
            self.bytes_out += sent
            self.budget.give_back(len(self.pending.popleft()))
        if self.eof and not self.pending:
            self.close()
            return
        self.watch(self.wanted())

    def close(self) -> None:
        if self.pending and not self.closed:
            held = sum(map(len, self.pending))
            self.pending.clear()
            self.budget.give_back(held)
        self.budget.waiting.discard(self)
        super().close()


class Discard(Session):
    """Reading and dropping is what Session does by default."""


class Chargen(Session):
    """RFC 864: what the client sends is thrown away, and the stream goes on until the client
    closes the connection; a half-close (shutdown SHUT_WR) is not the end of it."""

    events = READ | WRITE

    def __init__(self, *args: object):
        self.offset = 0
        super().__init__(*args)  # type: ignore[arg-type]

    def readable(self) -> None:
        for _ in range(READS_PER_TURN):
            data = self.sock.recv(CHUNK)
            if not data:
                self.watch(WRITE)  # the client is done sending, not done reading
                return
            self.bytes_in += len(data)

    def extra(self) -> dict[str, object]:
        return {"offset": self.offset}

    def take_extra(self, extra: dict[str, Any]) -> None:
        self.offset = int(extra.get("offset", 0)) % len(CHARGEN)

    def writable(self) -> None:
        sent = self.sock.send(CHARGEN_VIEW[self.offset:self.offset + CHUNK])
        self.bytes_out += sent
        self.offset = (self.offset + sent) % len(CHARGEN)


class Answer(Session):
    """Daytime and time: send the answer, close, done. No polling at all."""

    def reply(self) -> bytes:
        return b""

    def start(self) -> None:
        try:
            self.bytes_out = self.sock.send(self.reply())
        except OSError:
            pass
        self.closed = True
        self.sock.close()
        self.done(self)


class Daytime(Answer):
    def reply(self) -> bytes:
        return daytime_text()


class Time(Answer):
    def reply(self) -> bytes:
        return time_bytes()


_next_line = itertools.count()


def _chargen_datagram(data: bytes) -> bytes:
    """One whole line per datagram, each starting one character on, as the BSD inetds send:
    74 bytes whatever was asked (RFC 864 allows 0 to 512), so a spoofed request of a few
    bytes cannot be amplified more than theirs."""
    start = (next(_next_line) % LINES) * LINE
    return CHARGEN[start:start + LINE]


@dataclass(frozen=True)
class Builtin:
    """One row of the built-in table: how to serve a stream connection and a datagram."""

    name: str
    stream: Callable[..., Session]  # (loop, sock, done, peer, budget) -> Session
    datagram: Callable[[bytes], bytes | None]


BUILTINS = {b.name: b for b in (
    Builtin("echo", Echo, lambda data: data),
    Builtin("echo-packet", PacketEcho, lambda data: data),
    Builtin("discard", Discard, lambda data: None),
    Builtin("chargen", Chargen, _chargen_datagram),
    Builtin("daytime", Daytime, lambda data: daytime_text()),
    Builtin("time", Time, lambda data: time_bytes()),
)}
