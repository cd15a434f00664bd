"""`redirect: HOST:PORT`: forward each connection to another server, inside the loop.

No process per connection: xinetd forks one for each redirect, socat execs one. A Relay is an
internal session (superd/internal.py) holding two sockets and, for each direction, a pipe the
bytes move through with splice(2), so they never enter Python: from the source socket into
the pipe, from the pipe into the other socket. The pipe is the whole buffer of a direction
(PIPE_SIZE at most): while it is full the source is not read, so a fast sender and a slow
receiver cost bounded memory, and TCP's own flow control pushes back on the sender. Where
splice does not work for a pair of sockets, the same is done with recv_into and send through
a buffer of the same size. An end-of-file in one direction is passed on as a half-close
(shutdown SHUT_WR) once everything before it is delivered; the relay ends when both
directions have ended, or at once on an error. The byte counts go into the EXIT line
(log_on_success: traffic, xinetd's TRAFFIC).
"""

from __future__ import annotations

import base64
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from superd.config import Service
from superd.internal import BUILTINS, Budget, Builtin, Session
from superd.log import Log
from superd.loop import READ, WRITE, Loop, Timer

PIPE_SIZE = 1 << 20  # bytes in flight per direction, at most
CONNECT_TIMEOUT = 10.0
ROUNDS = 16  # moves per direction per wake-up before other connections get their turn
COPY = 1 << 16  # bytes a copying read takes; a read this full switches to splice
GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH)
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class Channel:
    """One direction: bytes from `src` to `dst`, copied through a small buffer at first, and
    through a pipe with splice() once a read fills the buffer (a bulk transfer): a short
    exchange costs no pipe, a long one never enters Python."""

    def __init__(self, src: socket.socket, dst: socket.socket):
        self.src, self.dst = src, dst
        self.held = 0  # bytes read from src, not yet written to dst
        self.eof = False
        self.shut = False
        self.moved = 0
        self.pipe: tuple[int, int] | None = None
        self.buffer = bytearray()
        self.size = PIPE_SIZE
        self.splice = True  # False once the kernel refused to splice these sockets

    def wants_read(self) -> bool:
        return not self.eof and self.held < self.size

    def wants_write(self) -> bool:
        return self.held > 0

    def pump(self, closing: bool) -> None:
        """Move what can move now; OSError when a socket is gone. At the end of the source,
        pass the half-close on (unless `closing`: the other way is done, close() will)."""
        for _ in range(ROUNDS):
            got = self._fill() if self.wants_read() else 0
            sent = self._drain() if self.held else 0
            if not got and not sent:
                break
        if self.eof and not self.held and not self.shut:
            self.shut = True
            if closing:
                return
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError as e:
                if e.errno != errno.ENOTCONN:
                    raise

    def _fill(self) -> int:
        try:
            if self.pipe is not None:
                n = os.splice(self.src.fileno(), self.pipe[1], self.size - self.held,
                              flags=SPLICE_FLAGS)
            else:
                data = self.src.recv(min(COPY, self.size - self.held))
                self.buffer += data
                n = len(data)
                if n == COPY and self.splice and self.held == 0:
                    self._to_pipe()  # a bulk transfer: from the next read on, splice
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as e:
            if e.errno != errno.EINVAL or self.pipe is None or self.held != len(self.buffer):
                raise
            self._unsplice()  # these sockets cannot be spliced: copy them
            return 0
        if n == 0:
            self.eof = True
        self.held += n
        return n

    def _to_pipe(self) -> None:
        self.pipe = PIPES.take()
        if self.pipe is None:
            self.splice = False

    def _unsplice(self) -> None:
        self.splice = False
        if self.pipe is not None:
            PIPES.give(self.pipe, True)
            self.pipe = None

    def _drain(self) -> int:
        try:
            if self.buffer:
                n = self.dst.send(self.buffer)
                del self.buffer[:n]
            elif self.pipe is not None:
                n = os.splice(self.pipe[0], self.dst.fileno(), self.held, flags=SPLICE_FLAGS)
            else:
                return 0
        except (BlockingIOError, InterruptedError):
            return 0
        self.held -= n
        self.moved += n
        return n

    def close(self) -> None:
        if self.pipe is not None:
            PIPES.give(self.pipe, self.held == len(self.buffer))
            self.pipe = None


class Pipes:
    """Empty pipes kept for the next bulk transfer (a pipe costs two fds and an fcntl)."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self.free: list[tuple[tuple[int, int], int]] = []

    def take(self) -> tuple[int, int] | None:
        if self.free:
            return self.free.pop()[0]
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # above /proc/sys/fs/pipe-max-size: the pipe keeps its own size
            pass
        return pipe

    def give(self, pipe: tuple[int, int], empty: bool) -> None:
        if empty and len(self.free) < self.keep:
            self.free.append((pipe, 0))
        else:
            for fd in pipe:
                os.close(fd)


PIPES = Pipes()


class Relay(Session):
    """One redirected connection (see the module docstring)."""

    fds = 2  # the client's socket and the upstream one; pipes only while fds are free (Pipes)

    def __init__(self, loop: Loop, sock: socket.socket, done: Callable[[Session], None],
                 peer: str, budget: Budget, *, target: tuple[int, str | tuple[str, int]],
                 service: str, warn: Callable[[str], None]):
        super().__init__(loop, sock, done, peer, budget)
        self.target, self.service, self.warn = target, service, warn
        self.up: socket.socket | None = None
        self.channels: tuple[Channel, Channel] | None = None
        self.connect_timer: Timer | None = None
        self.watched: dict[socket.socket, int] = {}  # what the loop watches for
        self.ends: dict[socket.socket, tuple[Callable[[int], None], Channel, Channel]] = {}

    def start(self) -> None:
        self.sock.setblocking(False)
        family, address = self.target
        try:
            up = self.up = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                         | socket.SOCK_CLOEXEC)
            code = up.connect_ex(address)
        except OSError as e:
            code = e.errno or errno.EIO
        if code not in (0, errno.EINPROGRESS):
            self._failed(code)
            return
        self.loop.add(up, WRITE, self._connected)
        self.watched[up] = WRITE
        self.connect_timer = self.loop.call_later(CONNECT_TIMEOUT,
                                                  lambda: self._failed(errno.ETIMEDOUT))

    def _connected(self, mask: int) -> None:
        assert self.up is not None
        code = self.up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._failed(code)
            return
        if self.connect_timer is not None:
            self.connect_timer.cancel()
            self.connect_timer = None
        c2u, u2c = self.channels = (Channel(self.sock, self.up), Channel(self.up, self.sock))
        # per socket: its callback, the way out of it (read) and the way into it (write)
        self.ends = {self.sock: (partial(self._ready, self.sock), c2u, u2c),
                     self.up: (partial(self._ready, self.up), u2c, c2u)}
        self.loop.modify(self.up, READ, self.ends[self.up][0])
        self.loop.add(self.sock, READ, self.ends[self.sock][0])
        self.watched = {self.up: READ, self.sock: READ}
        self.watching = READ
        self._move((c2u,))  # the client's first bytes are usually waiting already

    def _failed(self, code: int) -> None:
        if not self.closed:
            self.warn(f"{self.service}: redirect to {_where(self.target)} from={self.peer}: "
                      f"{os.strerror(code)}")
            self.close()

    def _ready(self, sock: socket.socket, mask: int) -> None:
        if self.closed:
            return
        _, out, inbound = self.ends[sock]
        self._move((out,) if mask == READ else (inbound,) if mask == WRITE else (out, inbound))

    def _move(self, channels: tuple[Channel, ...]) -> None:
        assert self.channels is not None and self.up is not None
        c2u, u2c = self.channels
        try:
            for channel in channels:
                channel.pump((u2c if channel is c2u else c2u).shut)
        except OSError as e:
            if e.errno not in GONE:
                self.warn(f"{self.service}: redirect from={self.peer}: {e.strerror}")
            self.close()
            return
        self.bytes_in, self.bytes_out = c2u.moved, u2c.moved
        if c2u.shut and u2c.shut:
            self.close()
            return
        for sock, (callback, out, inbound) in self.ends.items():
            want = (READ if out.wants_read() else 0) | (WRITE if inbound.wants_write() else 0)
            was = self.watched.get(sock, 0)
            if want != was:
                if want and was:
                    self.loop.modify(sock, want, callback)
                elif want:
                    self.loop.add(sock, want, callback)
                else:
                    self.loop.remove(sock)
                self.watched[sock] = want

    # -- superd upgrade: a relay in flight goes on in the superd that takes over -------------

    def extra(self) -> dict[str, object]:
        """Both sockets and each direction's pipe stay open over the exec; the bytes a
        direction holds are in its pipe or its buffer (sent along). One still connecting is
        not carried over: the next superd closes it."""
        if self.channels is None or self.up is None:
            return {"connecting": True}
        fds = [self.up.fileno()]
        channels = []
        for channel in self.channels:
            fds += list(channel.pipe or ())
            channels.append({"pipe": list(channel.pipe or ()), "held": channel.held,
                             "eof": channel.eof, "shut": channel.shut, "moved": channel.moved,
                             "buffer": base64.b64encode(bytes(channel.buffer)).decode(),
                             "splice": channel.splice})
        for fd in fds:
            os.set_inheritable(fd, True)
        return {"up": self.up.fileno(), "channels": channels, "fds": fds}

    def resume(self, extra: dict[str, Any]) -> None:
        for fd in extra.get("fds", []):
            os.set_inheritable(fd, False)
        if "up" not in extra:
            self.warn(f"{self.service}: redirect from={self.peer}: closed by superd upgrade "
                      "while it was connecting")
            self.close()
            return
        self.sock.setblocking(False)
        self.up = socket.socket(fileno=extra["up"])
        self.up.setblocking(False)
        self.channels = (Channel(self.sock, self.up), Channel(self.up, self.sock))
        for channel, state in zip(self.channels, extra["channels"], strict=True):
            channel.pipe = (state["pipe"][0], state["pipe"][1]) if state["pipe"] else None
            channel.held, channel.eof, channel.shut = state["held"], state["eof"], state["shut"]
            channel.moved, channel.splice = state["moved"], state["splice"]
            channel.buffer = bytearray(base64.b64decode(state["buffer"]))
        c2u, u2c = self.channels
        self.ends = {self.sock: (partial(self._ready, self.sock), c2u, u2c),
                     self.up: (partial(self._ready, self.up), u2c, c2u)}
        self._move(self.channels)  # registers what each socket waits for

    def close(self) -> None:
        if self.closed:
            return
        if self.connect_timer is not None:
            self.connect_timer.cancel()
        for sock, events in self.watched.items():
            if events:
                self.loop.remove(sock)
        self.watched.clear()
        self.watching = 0
        for channel in self.channels or ():
            channel.close()
        if self.up is not None:
            self.up.close()
        super().close()


def _where(target: tuple[int, str | tuple[str, int]]) -> str:
    address = target[1]
    if isinstance(address, str):
        return address
    return f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"


def resumed_builtin(service: str, log: Log) -> Builtin:
    """For a relay handed over by superd upgrade whose service has no redirect any more: it
    goes on to where it was connected, and needs no target."""
    return Builtin("redirect", partial(Relay, target=(socket.AF_INET, ("", 0)), service=service,
                                       warn=log.warning), lambda data: None)


def builtin_for(config: Service, log: Log) -> Builtin | None:
    """What serves `config` inside the loop: a built-in service, a relay, or nothing."""
    if config.redirect is None:
        return BUILTINS.get(config.internal)
    return Builtin("redirect", partial(Relay, target=config.redirect, service=config.name,
                                       warn=log.warning), lambda data: None)

