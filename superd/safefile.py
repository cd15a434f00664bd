"""Reading a small configuration file without ever waiting on it.

superd reads some files while it runs (hosts.allow, /etc/hosts, a banner at reload). A FIFO,
a device or a directory put in such a place must not hang the loop on open() or read():
the file is opened non-blocking and read only when it is a regular file.
"""

from __future__ import annotations

import errno
import os
import stat


def read_regular(path: str, limit: int) -> bytes:
    """Up to `limit` bytes of the regular file `path`; OSError otherwise (ENOENT as is)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 16))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
