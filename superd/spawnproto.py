"""The messages between superd and its spawner processes, defined once for both sides.

The channel is a SOCK_SEQPACKET socketpair, so every message arrives whole. Messages are
marshal'd tuples (fast, and stdlib only: the spawner processes import this file too).

  superd -> spawner   one Request, with the connection's fd attached (SCM_RIGHTS), and the
                      service's stderr pipe after it when `stderr` is "log"
  spawner -> superd   a batch of up to REPLIES_PER_MESSAGE replies, in the order they happened:
                      Started (the handler runs, or pid 0 when it could not even fork) and
                      Exited (a handler the spawner started has been reaped)
"""

from __future__ import annotations

import marshal
import socket
from typing import NamedTuple

MAX_FDS = 2
# Receive buffers are allocated per message: a request is well under MAX_REQUEST (a larger one
# is started by superd itself), a reply batch well under MAX_REPLY.
MAX_REQUEST = 64 << 10
MAX_REPLY = 8 << 10
REPLIES_PER_MESSAGE = 64  # about 20 bytes each; one with failure text goes alone
MAX_FAILURE = 4096  # bytes of failure text a Started carries at most


class Request(NamedTuple):
    """Start one handler: what `forkexec.fork_exec` needs, but for the fds."""

    token: int  # superd's name for the request, echoed in Started
    stderr: str  # "log" (the second fd attached), "socket" (the connection) or "null"
    argv: tuple[bytes, ...]
    program: tuple[bytes, ...]
    env: list[bytes]
    cwd: str
    gid: int | None
    groups: list[int] | None
    uid: int | None
    umask: int  # -1: leave it
    cgroup: str = ""  # the cgroup directory to start it in (superd/cgroups.py), or none


class Started(NamedTuple):
    token: int
    pid: int  # 0: it could not even fork
    failure: bytes | str | None  # the child's error pipe bytes, or a sentence; None: it runs


class Exited(NamedTuple):
    pid: int
    status: int  # a wait status, as os.waitpid gives it


Reply = Started | Exited
_TAGS: dict[str, type[Started] | type[Exited]] = {"S": Started, "X": Exited}


RECORD_CHUNK = 32 << 10


def send_record(sock: socket.socket, record: bytes) -> None:
    """A helper's first message, however large: its length, then chunks (SOCK_SEQPACKET
    messages are bounded by the socket buffer)."""
    sock.sendall(len(record).to_bytes(8, "big"))
    for i in range(0, len(record), RECORD_CHUNK):
        sock.sendall(record[i:i + RECORD_CHUNK])


def receive_record(sock: socket.socket) -> bytes:
    size = int.from_bytes(sock.recv(8), "big")
    chunks: list[bytes] = []
    while sum(map(len, chunks)) < size:
        chunk = sock.recv(RECORD_CHUNK)
        if not chunk:
            raise EOFError("superd went away before the record was whole")
        chunks.append(chunk)
    return b"".join(chunks)


def encode_request(request: Request) -> bytes:
    return marshal.dumps(tuple(request))


def decode_request(data: bytes) -> Request:
    return Request(*marshal.loads(data))


def token_of(data: bytes) -> int:
    """The token of a request that does not decode as a Request, if it has one (else 0)."""
    try:
        first = marshal.loads(data)[0]
    except Exception:
        return 0
    return first if isinstance(first, int) else 0


def encode_replies(replies: list[Reply]) -> bytes:
    return marshal.dumps(tuple(("S" if type(r) is Started else "X", *r) for r in replies))


def decode_replies(data: bytes) -> list[Reply]:
    """The replies in one message; ValueError when it is not a batch of well-formed ones."""
    try:
        items = marshal.loads(data)
    except (EOFError, ValueError, TypeError) as e:
        raise ValueError(f"not a reply message ({e})") from None
    out: list[Reply] = []
    for item in items if isinstance(items, tuple) else (None,):
        head = item[0] if isinstance(item, tuple) and item else None
        kind = _TAGS.get(head) if isinstance(head, str) else None
        if kind is None or len(item) != len(kind._fields) + 1:
            raise ValueError(f"unexpected reply {item!r:.80}")
        out.append(kind(*item[1:]))
    return out
