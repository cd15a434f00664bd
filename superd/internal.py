"""The classic internal services, answered inside the loop (RFC 862, 863, 864, 867, 868).

As in inetd.c, a table maps each name to its stream and datagram behaviour. Stream sessions are
non-blocking and driven by the selector, so a client that reads chargen slowly (or never) costs
one registered fd and stalls nothing. Daytime and time answer at once and close: their reply is a
few bytes that always fit in a fresh socket's send buffer.
"""

from __future__ import annotations

import random
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from superd.loop import READ, WRITE, Loop, Timer

RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01
CHUNK = 65536
MAX_PENDING = 256 * 1024  # echo stops reading while this much is unsent
READS_PER_TURN = 4  # recv calls per readiness before other clients get their turn


def _chargen_cycle() -> bytes:
    """RFC 864's pattern: 72 of the 95 printable characters a line, shifted by one each line."""
    printable = bytes(range(32, 127))
    ring = printable * 2
    return b"".join(ring[i:i + 72] + b"\r\n" for i in range(len(printable)))


CHARGEN = _chargen_cycle()
CHARGEN2 = CHARGEN * 2 + CHARGEN[:CHUNK]  # any window of up to CHUNK bytes is one slice


def daytime_text() -> bytes:
    return time.strftime("%A, %B %d, %Y %H:%M:%S-%Z\r\n").encode()


def time_bytes() -> bytes:
    return struct.pack("!I", (int(time.time()) + RFC868_EPOCH) & 0xFFFFFFFF)


class Session:
    """One internal stream connection; subclasses say what to do when readable or writable."""

    events = READ

    def __init__(self, loop: Loop, sock: socket.socket, done: Callable[[Session], None],
                 peer: str):
        self.loop, self.sock, self.done, self.peer = loop, sock, done, peer
        self.closed = False
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

    def watch(self, events: int) -> None:
        if events == self.watching or not events:
            return
        if self.watching:
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

    def readable(self) -> None:
        try:
            for _ in range(READS_PER_TURN):
                data = self.sock.recv(CHUNK)
                if not data:
                    self.eof = True
                    break
                self.bytes_in += len(data)
                self.pending += data
                if len(self.pending) >= MAX_PENDING:
                    break
        except BlockingIOError:
            pass
        self.flush()

    def writable(self) -> None:
        self.flush()

    def wanted(self) -> int:
        return (0 if self.eof or len(self.pending) >= MAX_PENDING else READ) | (
            WRITE if self.pending else 0)

    def flush(self) -> None:
        if self.pending:
            try:
                sent = self.sock.send(self.pending)
            except BlockingIOError:
                sent = 0
            del self.pending[:sent]
            self.bytes_out += sent
        if self.eof and not self.pending:
            self.close()
            return
        self.watch(self.wanted())


class Discard(Session):
    """Reading and dropping is what Session does by default."""


class Chargen(Session):
    events = READ | WRITE

    def __init__(self, *args: object):
        self.offset = 0
        super().__init__(*args)  # type: ignore[arg-type]

    def writable(self) -> None:
        sent = self.sock.send(CHARGEN2[self.offset:self.offset + CHUNK])
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


def _chargen_datagram(data: bytes) -> bytes:
    size = random.randint(0, 512)
    start = random.randrange(len(CHARGEN))
    return CHARGEN2[start:start + size]


@dataclass(frozen=True)
class Builtin:
    """One row of the built-in table: how to serve a stream connection and a datagram."""

    name: str
    stream: Callable[..., Session]  # (loop, sock, done, peer) -> Session
    datagram: Callable[[bytes], bytes | None]


BUILTINS = {b.name: b for b in (
    Builtin("echo", Echo, lambda data: data),
    Builtin("discard", Discard, lambda data: None),
    Builtin("chargen", Chargen, _chargen_datagram),
    Builtin("daytime", Daytime, lambda data: daytime_text()),
    Builtin("time", Time, lambda data: time_bytes()),
)}
