"""Only files as trustworthy as superd itself are read or imported (sshd's StrictModes).

superd runs as root and executes what its table and python handlers say, so a file it reads
is refused when anyone but root and superd's own user could change what is read: the file is
another user's, or writable by its group or by others, or a directory on its way from / is.
One exception, as in /tmp: a directory others may write to is fine when it is sticky and the
entry superd goes through there is root's or superd's user's (others can add names in a
sticky directory, never rename or remove ours).

Checking names and then opening them races with whoever can rename things on the way, so the
path is walked one component at a time from /: each directory is opened and checked on its
descriptor, a symlink is followed only from a directory already found safe, and the file is
opened at the end of that walk (O_NOFOLLOW) and checked on the descriptor that is then read.
After a safe walk, only root and superd's user could have changed anything on the way.
"""

from __future__ import annotations

import errno
import os
import stat

MAX_LINKS = 40  # as the kernel's own limit on symlinks in one lookup
OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


class Untrusted(Exception):
    """`path` may not be trusted; `reason` says why (without the path)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def owners() -> tuple[int, ...]:
    """The users who may own what superd reads: root, and the user superd runs as."""
    me = os.geteuid()
    return (0,) if me == 0 else (0, me)


def _who() -> str:
    me = os.geteuid()
    return "root" if me == 0 else f"root and uid {me}"


def _describe(st: os.stat_result) -> str:
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def file_problem(st: os.stat_result) -> str | None:
    """Why a file with this stat may not be trusted, or None."""
    if st.st_uid not in owners() or st.st_mode & OTHERS_WRITE:
        return f"writable by someone other than {_who()} ({_describe(st)}); refusing it"
    return None


def dir_problem(st: os.stat_result, sticky_ok: bool = True) -> str | None:
    """Why a directory with this stat may not be trusted, or None. A sticky directory that
    others may write to is fine when `sticky_ok` (its entries are then checked one by one)."""
    others_write = st.st_mode & OTHERS_WRITE and not (sticky_ok and st.st_mode & stat.S_ISVTX)
    if st.st_uid not in owners() or others_write:
        return f"writable by someone other than {_who()} ({_describe(st)})"
    return None


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def open_trusted(path: str, flags: int = os.O_RDONLY) -> int:
    """Open `path` after checking it and every directory on its way; return the descriptor.

    Raises Untrusted, or OSError (missing, a symlink loop, ...). The file must be regular.
    """
    walk = _Walk(os.path.abspath(path))
    try:
        name = walk.to_last()
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=walk.fd)
    finally:
        walk.close()
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(path, "not a regular file")
        problem = file_problem(st)
        if problem:
            raise Untrusted(path, problem)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_trusted(path: str, limit: int = -1) -> bytes:
    """The bytes of `path` (at most `limit`), read from a descriptor open_trusted checked."""
    with os.fdopen(open_trusted(path), "rb") as f:
        return f.read(limit)


def check_file(path: str) -> None:
    """Check `path` as open_trusted does, for a file that something else will open."""
    os.close(open_trusted(path))


def check_dir(path: str, sticky_ok: bool = True) -> None:
    """Check the directory `path` and every directory on its way; raise Untrusted or OSError.
    With `sticky_ok` false, `path` itself must not be writable by others even if sticky."""
    walk = _Walk(os.path.abspath(path))
    try:
        name = walk.to_last()
        fd = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=walk.fd)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    finally:
        walk.close()
    problem = dir_problem(st, sticky_ok)
    if problem:
        raise Untrusted(path, problem)


class _Walk:
    """The directories from / to where `path` leads, each open (O_PATH) and checked."""

    def __init__(self, path: str):
        self.path = path
        self.todo = _parts(path)
        self.stack: list[tuple[int, str, os.stat_result]] = []
        self._enter(os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), "/")

    @property
    def fd(self) -> int:
        return self.stack[-1][0]

    def to_last(self) -> str:
        """Walk every directory; the name of the last component (in the directory at .fd)."""
        links = 0
        while self.todo:
            name = self.todo.pop(0)
            if name == "..":
                if len(self.stack) > 1:
                    os.close(self.stack.pop()[0])
                continue
            dir_fd, where, dir_st = self.stack[-1]
            here = os.path.join(where, name)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if dir_st.st_mode & OTHERS_WRITE and st.st_uid not in owners():
                raise Untrusted(self.path, f"{here} is another user's (uid {st.st_uid}) in "
                                           f"the sticky directory {where}; refusing it")
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), self.path)
                target = os.readlink(name, dir_fd=dir_fd)
                if target.startswith("/"):
                    while len(self.stack) > 1:
                        os.close(self.stack.pop()[0])
                self.todo[:0] = _parts(target)
                continue
            if not self.todo:
                return name
            self._enter(os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=dir_fd), here)
        return "."

    def _enter(self, fd: int, where: str) -> None:
        try:
            st = os.fstat(fd)
            problem = dir_problem(st)
            if problem:
                raise Untrusted(self.path, f"its directory {where} is {problem}; refusing it")
        except BaseException:
            os.close(fd)
            raise
        self.stack.append((fd, where, st))

    def close(self) -> None:
        while self.stack:
            os.close(self.stack.pop()[0])
