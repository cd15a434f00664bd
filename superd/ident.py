"""Ask the client's ident server (RFC 1413) who owns a connection, without waiting for it.

The question goes out from the address the client connected to (a multi-homed host's ident
server must see the pair it knows), to port 113 of the client, as a non-blocking socket on
the loop. The answer line is checked as xinetd checks it: the port pair must be ours, the
reply type USERID. Anything else (refused, no answer before the deadline, an ERROR reply, a
malformed or overlong line) is "no answer", and the caller decides what that means.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass

from superd.loop import READ, WRITE, Loop, Timer

PORT = 113
MAX_REPLY = 1000  # RFC 1413: a reply line is at most 1000 characters


@dataclass(frozen=True)
class Identity:
    """A USERID reply: the operating system field and the user (printable characters only)."""

    opsys: str
    user: str

    @property
    def text(self) -> str:
        """As xinetd logs it after `USERID: svc `."""
        return f"{self.opsys} : {self.user}"


def printable(text: str, limit: int = 256) -> str:
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def parse_reply(line: bytes, remote_port: int, local_port: int) -> Identity | None:
    """`PORT , PORT : USERID : OPSYS[,CHARSET] : USER`, for our port pair; else None."""
    try:
        text = line.decode("latin-1")
        ports, kind, opsys, user = text.split(":", 3)
        theirs, ours = (int(p) for p in ports.split(","))
    except ValueError:
        return None
    if (theirs, ours) != (remote_port, local_port) or kind.strip() != "USERID":
        return None
    user = user.lstrip(" \t").rstrip("\r\n")
    if not user:
        return None
    return Identity(printable(opsys.split(",")[0].strip(), 64), printable(user))


class Query:
    """One ident question for the connection `conn` (whose peer is `addr`)."""

    def __init__(self, loop: Loop, conn: socket.socket, addr: tuple[str, int],
                 timeout: float, then: Callable[[Identity | None], None]):
        self.loop, self.then = loop, then
        self.sock: socket.socket | None = None
        self.timer: Timer | None = None
        self.reply = b""
        self.done = False
        try:
            local = conn.getsockname()
            self.remote_port, self.local_port = addr[1], local[1]
            self.question = f"{self.remote_port} , {self.local_port}\r\n".encode()
            sock = self.sock = socket.socket(conn.family, socket.SOCK_STREAM
                                             | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            sock.bind((local[0], 0))
            code = sock.connect_ex((addr[0], PORT))
        except OSError:
            code = errno.EADDRNOTAVAIL
        if code not in (0, errno.EINPROGRESS):
            loop.call_later(0, lambda: self.finish(None))  # `then` never runs before we return
            return
        self.loop.add(self.sock, WRITE, self.ready)  # type: ignore[arg-type]
        self.timer = loop.call_later(timeout, lambda: self.finish(None))

    def ready(self, mask: int) -> None:
        sock = self.sock
        if sock is None:
            return
        try:
            if mask & WRITE:
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.finish(None)
                    return
                sock.send(self.question)  # a fresh socket's buffer holds a few bytes
                self.loop.modify(sock, READ, self.ready)
                return
            data = sock.recv(MAX_REPLY + 2 - len(self.reply))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.finish(None)
            return
        self.reply += data
        line, nl, _ = self.reply.partition(b"\n")
        if nl:
            self.finish(parse_reply(line, self.remote_port, self.local_port))
        elif not data or len(self.reply) > MAX_REPLY:
            self.finish(None)

    def finish(self, identity: Identity | None) -> None:
        if self.done:
            return
        self.cancel()
        self.then(identity)

    def cancel(self) -> None:
        """Stop asking (the connection is gone): close, and never call back."""
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.sock is not None:
            self.loop.remove(self.sock)
            self.sock.close()
            self.sock = None
