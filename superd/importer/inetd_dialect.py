"""What depends on which inetd wrote an inetd.conf: plain `tcp`, unix socket files, buffer
sizes, FreeBSD's IPsec lines, and inetutils' directory of files.

The dialects read one line differently: `tcp` is IPv4 and IPv6 for Debian 12's openbsd-inetd
(0.20221205, its NEWS.Debian says so), IPv4 only for FreeBSD, OpenBSD, inetutils and Debian's
older openbsd-inetd. The flavour is given (`--flavour`) or told by the file ($FreeBSD$,
$OpenBSD$, FreeBSD's own syntax, update-inetd's marks); every plain tcp/udp line gets a note
saying which reading was used and why.
"""

from __future__ import annotations

import os
import re

from superd.importer.common import Entry, Remark, not_carried

FLAVOURS = ("debian", "freebsd", "openbsd", "inetutils")
LABELS = {"debian": "Debian 12's openbsd-inetd", "freebsd": "FreeBSD's inetd",
          "openbsd": "OpenBSD's inetd", "inetutils": "GNU inetutils' inetd"}
# protocol suffix -> families ("any" = IPv4 and IPv6); only plain "" differs by flavour
FAMILIES = {"": "any", "4": "4", "6": "6", "46": "any", "6only": "6"}
FREEBSD_UNIX = re.compile(r":[^:\s]*:[^:\s]*:[^:\s]*:/\S*")
BUFFER = re.compile(r"(sndbuf|rcvbuf)=(\d+)([km]?)")


def detect(lines: list[str]) -> tuple[str, str]:
    """(flavour, why) from what the file shows; Debian's reading when it shows nothing."""
    text = "\n".join(lines)
    if "$FreeBSD" in text:
        return "freebsd", "the file has FreeBSD's $FreeBSD$ mark"
    if "$OpenBSD" in text:
        return "openbsd", "the file has OpenBSD's $OpenBSD$ mark"
    for line in lines:
        words = line.split()
        if line.startswith("#@"):
            return "freebsd", "the file has FreeBSD's #@ IPsec lines"
        if words and not line.startswith("#") and FREEBSD_UNIX.fullmatch(words[0]):
            return "freebsd", "the file has FreeBSD's :user:group:mode: socket owners"
        if len(words) > 3 and not line.startswith("#") and "/" in words[3]:
            return "freebsd", "the file has FreeBSD's wait/max-child/... limits"
    if "#<off>#" in text or "#:INTERNAL:" in text:
        return "debian", "the file has the marks of Debian's update-inetd"
    return "debian", "nothing in the file names its inetd"


def family(suffix: str, flavour: str) -> str | None:
    """Which families a tcp/udp suffix listens on, for this flavour."""
    if suffix == "" and flavour != "debian":
        return "4"
    return FAMILIES.get(suffix)


def plain_note(proto: str, flavour: str, why: str) -> str:
    both = flavour == "debian"
    return (f"{proto}: {'IPv4 and IPv6' if both else 'IPv4 only'}, as {LABELS[flavour]} reads "
            f"it ({why}); " + ("FreeBSD, OpenBSD, inetutils and Debian before 12 read it as "
                               "IPv4 only: import with --flavour freebsd, openbsd or inetutils "
                               "for that" if both else "Debian 12 reads it as IPv4 and IPv6: "
                               "import with --flavour debian for that"))


def unix_file(e: Entry, host: str, flavour: str) -> str | None:
    """Owner and mode of a unix socket's file: FreeBSD's `:user:group:mode:` prefix, or what
    each inetd does without one. A reason when the line cannot be carried over."""
    if host.startswith(":"):
        parts = host[1:].split(":")
        if len(parts) != 3 or not parts[0] or not parts[1]:
            return (f"{host}: expected FreeBSD's :user:group:mode: before the path (FreeBSD's "
                    "inetd skips the line too)")
        user, group, mode = parts
        if not re.fullmatch(r"[0-7]{1,4}", mode) or int(mode, 8) > 0o777:
            return f"{host}: {mode!r} is not an octal mode (FreeBSD's inetd skips the line too)"
        e.keys.update(socket_user=user, socket_group=group, socket_mode=f"{int(mode, 8):04o}")
        return None
    if host != "*":
        e.note(f"the address {host} does not apply to a unix socket (inetd ignores it too)")
    if flavour == "freebsd":
        e.keys["socket_mode"] = "0200"
        e.note("FreeBSD's inetd makes the socket root's with mode 0200 (only root may "
               "connect): kept as socket_mode 0200; superd's own default is 0666")
    else:
        e.keys["socket_mode"] = "0755"
        e.note("inetd made the socket with its umask (022 when init or systemd starts it: "
               "srwxr-xr-x root, so only root could connect): kept as socket_mode 0755; "
               "superd's own default is 0666, for every local user")
    return None


def buffers(e: Entry, options: str, where: str) -> None:
    """`,sndbuf=N[k|m]` and `,rcvbuf=N[k|m]` (OpenBSD, NetBSD, Debian): the new keys."""
    for option in options.split(","):
        m = BUFFER.fullmatch(option)
        if not m or int(m[2]) == 0:
            e.drop(where, f",{option}", "not sndbuf= or rcvbuf= with a size (inetd skips the "
                                        "line for it)")
            continue
        key = "send_buffer" if m[1] == "sndbuf" else "receive_buffer"
        e.keys[key] = f"{m[2]}{m[3].upper()}" if m[3] else int(m[2])


def internal_name(service: str, proto: str, flavour: str) -> str:
    """FreeBSD matches a built-in on a unix socket by the last part of its path."""
    if proto == "unix" and flavour == "freebsd":
        return os.path.basename(service)
    return service


def ipsec(where: str, text: str) -> Remark:
    """FreeBSD's `#@ policy` line (an IPsec policy for the entries below it; `#@` alone ends
    it): superd sets none, so it is left out, said and counted."""
    policy = text[2:].strip()
    reason = (f"IPsec policy for the entries below ({policy}): superd sets no IPsec policy "
              "on its sockets; set it with setkey(8) for their addresses and ports") if policy \
        else "the end of an IPsec policy: superd set none"
    return not_carried(where, reason, [text], service=False)


def files_of(path: str) -> list[str]:
    """The file, or every regular file of a directory in name order: inetutils reads
    /etc/inetd.d that way (all of them, whatever their name)."""
    if not os.path.isdir(path):
        return [path]
    names = sorted(os.listdir(path), key=os.fsencode)
    return [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
