"""The control socket: `superd status`, `reload` and `stop` talk to the running daemon here.

A unix stream socket, mode 0600, at settings.control_socket. One request line per connection,
one JSON answer. The peer's uid is checked with SO_PEERCRED as well as by the file mode, so a
socket path that someone loosened still refuses strangers. What the commands do is not known
here: the socket is given a table of them (`status`, `reload`, `stop` from the server).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from collections.abc import Callable
from typing import Any

from superd.loop import READ, Loop

Commands = dict[str, Callable[[], dict[str, Any]]]
MAX_REQUEST = 256
FD_PAUSE = 0.5  # out of fds: look at the control socket again this much later


class ControlSocket:
    def __init__(self, loop: Loop, path: str, commands: Commands):
        self.loop, self.path, self.commands = loop, path, commands
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        try:
            if not os.path.exists(path) or _is_stale(path):
                _unlink(path)
        except OSError:
            pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        except OSError:
            self.sock.close()
            raise
        finally:
            os.umask(old)
        try:
            os.chmod(path, 0o600)
            self.inode = os.stat(path).st_ino
            self.sock.listen(16)
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            _unlink(path)  # ours: bound a moment ago
            raise
        loop.add(self.sock, READ, self.accept)

    def accept(self, mask: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError as e:
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Still readable: stop watching for a moment instead of spinning.
                self.loop.remove(self.sock)
                self.loop.call_later(FD_PAUSE, self._resume)
            return
        conn.setblocking(False)
        self.loop.add(conn, READ, lambda m: self.request(conn))

    def _resume(self) -> None:
        if self.sock.fileno() >= 0 and not self.loop.watching(self.sock):
            self.loop.add(self.sock, READ, self.accept)

    def request(self, conn: socket.socket) -> None:
        self.loop.remove(conn)
        try:
            # Read the request even from a stranger: closing with unread bytes would reset the
            # connection and the client would never see why it was refused.
            command = conn.recv(MAX_REQUEST).decode("ascii", "replace").strip()
            _, uid, _ = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid not in (0, os.geteuid()):
                answer: dict[str, Any] = {
                    "error": f"permission denied: only uid {os.geteuid()} and root may "
                             "control this superd"}
            else:
                answer = self.answer(command)
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def answer(self, command: str) -> dict[str, Any]:
        run = self.commands.get(command)
        if run is None:
            return {"error": f"unknown command {command!r}"}
        return run()

    def close(self) -> None:
        self.loop.remove(self.sock)
        self.sock.close()
        try:
            if os.stat(self.path).st_ino == self.inode:
                os.unlink(self.path)
        except OSError:
            pass


def _is_stale(path: str) -> bool:
    """A socket file nobody answers on is left from a crash; one that answers is a live daemon."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    raise OSError(f"another superd is answering on {path}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def request(path: str, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Client side: send one command, return the daemon's JSON answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    answer: dict[str, Any] = json.loads(data)
    return answer
