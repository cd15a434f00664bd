"""The control socket: `superd status`, `reload` and `stop` talk to the running daemon here.

A unix stream socket, mode 0600, at settings.control_socket. One request line per connection,
one JSON answer. The peer's uid is checked with SO_PEERCRED as well as by the file mode, so a
socket path that someone loosened still refuses strangers. What the commands do is not known
here: the socket is given a table of them (`status`, `reload`, `stop` from the server).

Both ends trust the path only as far as it deserves. Its folder must be private (made 0700 if
missing; refused if anyone but root or superd's user could write there, sticky or not), so
nobody else can put a socket there first or swap ours; and superd removes nothing at the path
but a socket of its user that nobody answers on (left by a crash). The client checks who
answers (SO_PEERCRED: root, or the user it runs as) before it sends a command.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
from collections.abc import Callable
from typing import Any

from superd import strict
from superd.loop import READ, WRITE, Loop, Timer

Reply = Callable[[dict[str, Any]], None]
# A command is given where to send its answer: at once (status), or in a later loop turn
# (reload: the table is read off the loop).
Commands = dict[str, Callable[[Reply], None]]
MAX_REQUEST = 256
FD_PAUSE = 0.5  # out of fds: look at the control socket again this much later
SEND_TIMEOUT = 5.0  # an answer its client does not read within this is dropped


class ControlSocket:
    def __init__(self, loop: Loop, path: str, commands: Commands):
        self.loop, self.path, self.commands = loop, path, commands
        _private_folder(os.path.dirname(path))
        _clear_stale(path)
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
            st = os.lstat(path)
            self.inode = (st.st_dev, st.st_ino)
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
            _, uid, _ = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        reply = _Answer(self.loop, conn).send
        if uid not in (0, os.geteuid()):
            reply({"error": f"permission denied: only uid {os.geteuid()} and root may "
                            "control this superd"})
            return
        run = self.commands.get(command)
        if run is None:
            reply({"error": f"unknown command {command!r}"})
            return
        run(reply)

    def close(self) -> None:
        self.loop.remove(self.sock)
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.inode and stat.S_ISSOCK(st.st_mode):
                os.unlink(self.path)
        except OSError:
            pass


class _Answer:
    """One answer on its way to a client, without ever blocking the loop: what the socket
    does not take at once is sent as it drains, for SEND_TIMEOUT at most."""

    def __init__(self, loop: Loop, conn: socket.socket):
        self.loop, self.conn = loop, conn
        self.data = b""
        self.given = False
        self.timer: Timer | None = None

    def send(self, answer: dict[str, Any]) -> None:
        if self.given:
            return
        self.given = True
        self.data = json.dumps(answer).encode() + b"\n"
        self._write(WRITE)
        if self.data:
            self.loop.add(self.conn, WRITE, self._write)
            self.timer = self.loop.call_later(SEND_TIMEOUT, self._close)

    def _write(self, mask: int) -> None:
        try:
            sent = self.conn.send(self.data)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(self.data)  # the client is gone: nothing more to send
        self.data = self.data[sent:]
        if not self.data:
            self._close()

    def _close(self) -> None:
        self.data = b""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn.fileno() >= 0:
            if self.loop.watching(self.conn):
                self.loop.remove(self.conn)
            self.conn.close()


class Refused(OSError):
    """No control socket at this path; the message says why."""


def _private_folder(folder: str) -> None:
    """Make `folder` (0700) if it is missing; refuse it if others could write to it."""
    if not os.path.isdir(folder):
        os.makedirs(os.path.dirname(folder) or "/", mode=0o755, exist_ok=True)
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
    try:
        strict.check_dir(folder, sticky_ok=False)
    except strict.Untrusted as e:
        raise Refused(f"its folder {folder} is not private ({e.reason}): whoever can write "
                      "there could answer in superd's place; use a private folder such as "
                      "/run/superd") from None


def _clear_stale(path: str) -> None:
    """Remove what a crashed superd left at `path`, a socket of ours nobody answers on;
    refuse anything else there, and leave it alone."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise Refused(f"{path} exists and is not a socket; superd leaves it alone")
    if st.st_uid not in strict.owners():
        raise Refused(f"{path} is a socket of uid {st.st_uid}; superd leaves it alone")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        _unlink(path)  # nobody listens: left by a crash (and the folder is ours alone)
        return
    finally:
        probe.close()
    raise Refused(f"another superd is answering on {path}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Stranger(Exception):
    """The process answering on the control socket is neither root nor the user asking."""

    def __init__(self, path: str, uid: int, pid: int):
        super().__init__(f"refusing {path}: it is answered by uid {uid} (pid {pid}), not by "
                         f"root or uid {os.geteuid()}; nothing was sent to it")
        self.uid, self.pid = uid, pid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket (SO_PEERCRED)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid, gid


def request(path: str, command: str, timeout: float = 10.0) -> dict[str, Any]:
    """Client side: send one command, return the daemon's JSON answer. Raises Stranger,
    before sending anything, when the process listening there is neither root nor us."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        pid, uid, _ = peer_credentials(sock)
        if uid not in (0, os.geteuid()):
            raise Stranger(path, uid, pid)
        sock.sendall(command.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    answer: dict[str, Any] = json.loads(data)
    return answer
