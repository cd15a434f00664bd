"""The file of a unix socket: its directories, its owner and mode, set without races.

superd runs as root and may be told to put a socket in a directory other users can write
(/tmp, a shared runtime directory). Such a user can swap the path for a symlink or a file of
their own at any moment, so nothing is ever done to the *path* after bind():

- missing parent directories are made one at a time, each opened without following a
  symlink, and only the ones made here get `directory_mode`;
- the socket file is created by bind() under umask 0777, so it appears with no permissions at
  all rather than with superd's umask;
- then the path is opened with O_PATH|O_NOFOLLOW, and the kernel is asked (sock_diag, the
  netlink interface `ss -x` uses) which inode and device this socket is bound to. Only when
  the opened file is that very inode are its owner and mode set, through /proc/self/fd/N,
  which names exactly that inode whatever the path points to by then. Otherwise the socket is
  refused with the reason, and whatever sits at the path is left alone.

Without sock_diag (a kernel built without CONFIG_UNIX_DIAG) the opened file is trusted only
when its directory can be written by nobody but root.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct

from superd.sockopts import SocketOptions

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
UDIAG_SHOW_VFS = 0x2
UNIX_DIAG_VFS = 1
NLMSG_ERROR = 2
DIAG_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
MAX_DEPTH = 64  # parent directories superd will make for one socket


class Replaced(OSError):
    """The socket file is not (or no longer) the one this socket is bound to."""


def bind(sock: socket.socket, path: str, opts: SocketOptions) -> int:
    """Bind `sock` to the file `path` and give that file its owner and mode; its inode."""
    make_parents(os.path.dirname(path), opts.directory_mode)
    remove_stale(path)
    old = os.umask(0o777)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    return settle(sock, path, opts)


def settle(sock: socket.socket, path: str, opts: SocketOptions) -> int:
    """Set owner and mode on the socket file `sock` is bound to, if it is the one at `path`."""
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISSOCK(st.st_mode) or not _is_bound_to(sock, st, path):
            raise Replaced(errno.EEXIST, f"{path} is no longer the socket superd bound (someone "
                                         "replaced it); superd leaves it alone")
        here = f"/proc/self/fd/{fd}"  # exactly this inode, whatever the path names by now
        uid = -1 if opts.socket_uid is None else opts.socket_uid
        gid = -1 if opts.socket_gid is None else opts.socket_gid
        if uid != -1 or gid != -1:
            os.chown(here, uid, gid)
        os.chmod(here, opts.socket_mode)
        return st.st_ino
    finally:
        os.close(fd)


def _is_bound_to(sock: socket.socket, st: os.stat_result, path: str) -> bool:
    vfs = bound_file(sock)
    if vfs is not None:
        ino, dev = vfs
        return ino == st.st_ino and (dev >> 20, dev & 0xFFFFF) == (os.major(st.st_dev),
                                                                    os.minor(st.st_dev))
    return _only_root_writes(os.path.dirname(path))


def bound_file(sock: socket.socket) -> tuple[int, int] | None:
    """(inode, kernel device number) of the file `sock` is bound to, from sock_diag; None when
    the kernel cannot say."""
    ino = os.fstat(sock.fileno()).st_ino
    request = struct.pack("=BBHIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, UDIAG_SHOW_VFS) \
        + struct.pack("=II", 0xFFFFFFFF, 0xFFFFFFFF)
    header = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, 1, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(1.0)  # the kernel answers at once; never wait on it for long
            nl.send(header + request)
            data = nl.recv(8192)
    except OSError:
        return None
    if len(data) < 16 + DIAG_MSG.size:
        return None
    length, kind = struct.unpack_from("=IH", data)
    if kind == NLMSG_ERROR:
        return None
    offset, end = 16 + DIAG_MSG.size, min(length, len(data))
    for _ in range(64):  # attributes: u16 length, u16 type, value, padded to 4
        if offset + 4 > end:
            break
        alen, atype = struct.unpack_from("=HH", data, offset)
        if alen < 4:
            break
        if atype == UNIX_DIAG_VFS and alen >= 12:
            vino, vdev = struct.unpack_from("=II", data, offset + 4)
            return vino, vdev
        offset += (alen + 3) & ~3
    return None


def _only_root_writes(directory: str) -> bool:
    try:
        st = os.stat(directory)
    except OSError:
        return False
    return st.st_uid in (0, os.geteuid()) and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def make_parents(directory: str, mode: int) -> None:
    """Make the missing directories of `directory`, each with `mode` (systemd's DirectoryMode=).

    What exists is used as it is (symlinks included: /var/run is one); each directory made here
    is opened without following symlinks before it gets its mode, so one swapped in by another
    user stops the bind instead of being chmod-ed.
    """
    if os.path.isdir(directory):
        return
    missing: list[str] = []
    head = directory
    for _ in range(MAX_DEPTH):
        if os.path.isdir(head) or head in ("", "/"):
            break
        head, name = os.path.split(head)
        missing.append(name)
    else:
        raise OSError(errno.ENAMETOOLONG, f"more than {MAX_DEPTH} directories to make")
    fd = os.open(head or "/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for name in reversed(missing):
            made = True
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                made = False  # made by someone else meanwhile: used, but not chmod-ed
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=fd)
            os.close(fd)
            fd = nxt
            if made:
                os.fchmod(fd, mode)
    finally:
        os.close(fd)


def remove_stale(path: str) -> None:
    """A socket file left by a previous run would make bind fail; other files are kept."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
