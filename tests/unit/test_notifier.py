"""superd/systemd.py's Notifier while systemd does not read: what waits, and what is dropped."""

from __future__ import annotations

import array
import socket

import pytest

from superd import systemd


@pytest.fixture
def stalled(tmp_path, monkeypatch):
    """A NOTIFY_SOCKET nobody reads, its buffer full, and a Notifier sending to it."""
    path = str(tmp_path / "notify")
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    reader.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    later: list[object] = []
    notifier = systemd.Notifier(lambda delay, fn: later.append(fn))
    for i in range(10_000):  # fill the socket: bounded, a few hundred do it
        if notifier.pending:
            break
        notifier.notify(f"X={i}")
    assert notifier.pending, "the socket never filled"
    yield notifier, reader
    reader.close()


def test_fd_store_notifications_are_never_dropped_from_the_queue(stalled):
    notifier, reader = stalled
    a, b = socket.socketpair()
    notifier.notify("FDSTORE=1\nFDNAME=kept", [a.fileno()])
    notifier.notify("FDSTOREREMOVE=1\nFDNAME=gone")
    for i in range(3 * systemd.NOTIFY_QUEUE):
        notifier.notify(f"Y={i}")
    messages = [m for m, _ in notifier.pending]
    assert len(messages) == systemd.NOTIFY_QUEUE
    assert "FDSTORE=1\nFDNAME=kept" in messages and "FDSTOREREMOVE=1\nFDNAME=gone" in messages
    assert messages[-1] == f"Y={3 * systemd.NOTIFY_QUEUE - 1}"  # the newest stay too

    a.close()  # the queue holds its own copy: what arrives is still that socket
    got: dict[str, list[int]] = {}
    reader.setblocking(False)
    for _ in range(10_000):
        try:
            data, anc, _, _ = reader.recvmsg(4096, socket.CMSG_SPACE(16))
        except BlockingIOError:
            notifier.flush()
            if not notifier.pending:
                break
            continue
        fds = array.array("i")
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[: len(raw) - len(raw) % fds.itemsize])
        got[data.decode()] = list(fds)
    assert "FDSTOREREMOVE=1\nFDNAME=gone" in got
    (fd,) = got["FDSTORE=1\nFDNAME=kept"]
    with socket.socket(fileno=fd) as copy:
        copy.send(b"x")
        assert b.recv(1) == b"x"
    b.close()
