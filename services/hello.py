"""A line-oriented greeter: the example python handler that ships with superd.

superd imports this module when it loads the table and, for every connection, calls
``handle(sock, env)`` in a forked child (SPEC §3).  It is meant to be read as much as run:
it shows the things every handler of your own has to get right -

* take the peer's identity from ``env`` (superd already worked it out, and it is the same
  variables tcpserver, xinetd and systemd handlers know), not from ``getpeername()``;
* bound everything a peer controls: the number of lines, the length of a line, and how long
  the peer may stay silent - a handler without bounds is a free denial of service;
* treat a peer that goes away as normal (exit 0), because a non-zero status within a second
  of starting counts towards superd's back-off and would let a peer pause the service.

Protocol: after a greeting line, each request line gets exactly one answer line.  Lines end
with LF or CRLF (so ``nc``, ``socat`` and ``telnet`` all work).  Answers that are errors start
with ``error:`` so a script talking to it can tell them apart.

    upper TEXT   TEXT in upper case
    time         the server's current time, UTC, ISO 8601
    whoami       the peer's address and port as superd saw them
    help         the list of commands
    quit         say goodbye and close

It also runs on its own as an inetd-style program (the connected socket on fd 0), which is
handy for trying it without superd::

    systemd-socket-activate -l 127.0.0.1:2323 --inetd -a python3 services/hello.py
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import sys

MAX_LINES = 100
"""Requests per connection; after that the handler says goodbye, so one peer cannot keep a
handler (and an ``instances`` slot) forever by staying busy."""

MAX_LINE = 1024
"""Bytes per request line, line ending excluded; a longer line closes the connection, since
a peer that sends one is not following the protocol and buffering it costs us memory."""

IDLE_TIMEOUT = 30.0
"""Seconds a peer may stay silent (or refuse to read) before the handler gives up."""

_RECV_SIZE = 4096


class LineTooLongError(Exception):
    """The peer sent more than MAX_LINE bytes without a line end."""


class _LineReader:
    """Split a socket's byte stream into lines without ever buffering more than one line.

    ``sock.makefile().readline()`` would do, but it has no length limit of its own
    (``readline(limit)`` silently splits a long line in two) and it becomes unusable after a
    timeout; an explicit buffer keeps the bound and the error handling obvious.
    """

    def __init__(self, sock: socket.socket, max_line: int) -> None:
        self._sock = sock
        self._max = max_line
        self._buf = bytearray()
        self._eof = False

    def readline(self) -> bytes | None:
        """Return the next line without its line end, or None at end of stream."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[:nl]).removesuffix(b"\r")
                del self._buf[: nl + 1]
                if len(line) > self._max:
                    raise LineTooLongError
                return line
            # +1 leaves room for the CR of a CRLF that has not arrived whole yet.
            if len(self._buf) > self._max + 1:
                raise LineTooLongError
            if self._eof:
                # A last line without a line end still counts: `printf time | nc` works.
                if not self._buf:
                    return None
                line = bytes(self._buf).removesuffix(b"\r")
                self._buf.clear()
                return line
            chunk = self._sock.recv(_RECV_SIZE)
            if not chunk:
                self._eof = True
            else:
                self._buf += chunk


def _peer(env: dict[str, str]) -> tuple[str, str]:
    """Return the peer's address and port, as superd put them in the environment.

    Unix-socket peers have no address; superd gives their credentials instead, so show those.
    """
    if env.get("PROTO") == "UNIX":
        uid = env.get("UNIXREMOTEEUID", "?")
        pid = env.get("UNIXREMOTEPID", "?")
        return f"uid {uid}", f"pid {pid}"
    return env.get("REMOTE_ADDR", "unknown"), env.get("REMOTE_PORT", "?")


def _answer(line: str, env: dict[str, str]) -> tuple[str, bool]:
    """Compute the answer to one request line; the flag says whether to close afterwards."""
    command, _, arg = line.strip().partition(" ")
    command = command.lower()
    if command == "upper":
        return arg.upper(), False
    if command == "time":
        now = datetime.datetime.now(datetime.UTC)
        return now.isoformat(timespec="seconds"), False
    if command == "whoami":
        addr, port = _peer(env)
        return f"{addr} {port}", False
    if command == "help":
        return "commands: upper TEXT, time, whoami, help, quit", False
    if command == "quit":
        return "bye", True
    return f"error: unknown command {command!r} (try help)", False


def _send(sock: socket.socket, text: str) -> None:
    """Send one answer line; CRLF so that telnet shows it properly too."""
    sock.sendall(text.encode("utf-8", "replace") + b"\r\n")


def handle(sock: socket.socket, env: dict[str, str]) -> int:
    """Greet the peer, then answer its request lines until quit, EOF, a limit or idleness.

    Always returns 0: every way a session can end here is the peer's doing, not a fault of
    the handler, and superd treats quick non-zero exits as a reason to back off.
    """
    service = env.get("SUPERD_SERVICE", "hello")
    addr, _ = _peer(env)
    # A timeout on the socket bounds each recv and each sendall: a peer that neither talks
    # nor reads cannot hold this process for longer than IDLE_TIMEOUT at a time.
    sock.settimeout(IDLE_TIMEOUT)
    reader = _LineReader(sock, MAX_LINE)
    try:
        _send(sock, f"hello {addr}, this is {service}; try: upper TEXT, time, whoami, quit")
        for _ in range(MAX_LINES):
            raw = reader.readline()
            if raw is None:
                return 0
            line = raw.decode("utf-8", "replace")
            if not line.strip():
                continue
            answer, done = _answer(line, env)
            _send(sock, answer)
            if done:
                return 0
        _send(sock, f"bye: at most {MAX_LINES} lines per connection")
    except LineTooLongError:
        _try_send(sock, f"error: line longer than {MAX_LINE} bytes, closing")
    except TimeoutError:
        _try_send(sock, f"bye: idle for {IDLE_TIMEOUT:g} s")
    except OSError as exc:
        # The peer reset or vanished; worth a line in the log (stderr), not a failure.
        print(f"hello: connection from {addr} lost: {exc}", file=sys.stderr)
    return 0


def _try_send(sock: socket.socket, text: str) -> None:
    """Send a farewell if the peer still listens; it may well not, and that is fine."""
    with contextlib.suppress(OSError):
        _send(sock, text)


if __name__ == "__main__":
    # inetd style: the connected socket is fd 0.  os.environ stands in for superd's env;
    # launchers other than superd may not set the peer, so ask the socket then.
    _sock = socket.socket(fileno=0)
    _env = dict(os.environ)
    if "REMOTE_ADDR" not in _env and _sock.family in (socket.AF_INET, socket.AF_INET6):
        _host, _port = _sock.getpeername()[:2]
        _env.update(REMOTE_ADDR=_host.removeprefix("::ffff:"), REMOTE_PORT=str(_port))
    sys.exit(handle(_sock, _env))
