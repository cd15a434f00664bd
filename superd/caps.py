"""Capabilities, no_new_privileges and the capability bounding set, as systemd.exec spells them.

`capabilities` (systemd's AmbientCapabilities=) keeps the named capabilities across the switch
to the service's user and the exec, as ambient capabilities: a handler running as `nobody`
with `cap_net_bind_service` may bind port 80 and nothing more. `capability_bounding_set`
(CapabilityBoundingSet=; a list of names to keep, or names each with `~` to drop) limits what
the handler and everything it starts can ever gain. The calls are prctl(2) and capset(2)
through ctypes, made in the forked child before exec; libc is loaded when this module is
imported, in the parent (no dlopen between fork and exec).
"""

from __future__ import annotations

import ctypes
import os

NAMES = (
    "chown dac_override dac_read_search fowner fsetid kill setgid setuid setpcap "
    "linux_immutable net_bind_service net_broadcast net_admin net_raw ipc_lock ipc_owner "
    "sys_module sys_rawio sys_chroot sys_ptrace sys_pacct sys_admin sys_boot sys_nice "
    "sys_resource sys_time sys_tty_config mknod lease audit_write audit_control setfcap "
    "mac_override mac_admin syslog wake_alarm block_suspend audit_read perfmon bpf "
    "checkpoint_restore").split()
NUMBERS = {f"cap_{name}": i for i, name in enumerate(NAMES)}
PR_SET_KEEPCAPS, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 8, 24, 38, 47
PR_CAP_AMBIENT_RAISE = 2
CAP_VERSION_3 = 0x20080522
_libc = ctypes.CDLL(None, use_errno=True)


def parse(names: list[str]) -> tuple[int, ...]:
    """Capability numbers for `cap_x` names (case as you like); ValueError for others."""
    out = []
    for name in names:
        number = NUMBERS.get(name.lower())
        if number is None:
            raise ValueError(f"{name!r} is not a capability (cap_net_bind_service, ...)")
        out.append(number)
    return tuple(sorted(set(out)))


def bounding(names: list[str]) -> tuple[int, ...]:
    """The set to keep: the names given, or, when each starts with `~`, all but those."""
    drops = [n.startswith("~") for n in names]
    if any(drops) and not all(drops):
        raise ValueError("either list capabilities to keep or, each with ~, ones to drop")
    if names and all(drops):
        dropped = set(parse([n[1:] for n in names]))
        return tuple(c for c in range(last_cap() + 1) if c not in dropped)
    return parse(names)


def effective() -> int:
    """The capabilities this process has now, as a bit mask (CapEff in /proc/self/status);
    without /proc, root is taken to have them all and anyone else none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return (1 << (last_cap() + 1)) - 1 if os.geteuid() == 0 else 0


def have(name: str) -> bool:
    """Whether this process has capability `name` (`cap_setuid`...) in its effective set."""
    return bool(effective() >> NUMBERS[name] & 1)


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return len(NAMES) - 1


def prctl(*args: int) -> None:
    """prctl(2), OSError on failure. (Every prctl superd makes goes through here.)"""
    if _libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({args[0]}): {os.strerror(ctypes.get_errno())}")


PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def drop_bounding(keep: tuple[int, ...]) -> None:
    for cap in range(last_cap() + 1):
        if cap not in keep:
            prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)


def keep_over_setuid() -> None:
    prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)


def raise_ambient(caps: tuple[int, ...]) -> None:
    """Make `caps` permitted, inheritable and effective, then ambient (after setuid)."""
    low = sum(1 << c for c in caps if c < 32)
    high = sum(1 << (c - 32) for c in caps if c >= 32)
    header = (ctypes.c_uint32 * 2)(CAP_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(low, low, low, high, high, high)
    if _libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), f"capset: {os.strerror(ctypes.get_errno())}")
    for cap in caps:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0)


def no_new_privileges() -> None:
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def unprivileged_port_start() -> int:
    """The lowest port anyone may bind (net.ipv4.ip_unprivileged_port_start; 1024 without
    /proc): below it, binding needs cap_net_bind_service."""
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1024


def port_needs(port: int) -> str | None:
    """Why this process cannot bind `port` itself (a socket systemd passes needs nothing),
    or None."""
    start = unprivileged_port_start()
    if 0 < port < start and not have("cap_net_bind_service"):
        return (f"port {port} is below net.ipv4.ip_unprivileged_port_start ({start}) and "
                f"superd (uid {os.geteuid()}) lacks cap_net_bind_service")
    return None


def switch_needs(uid: int | None, gid: int | None, groups: tuple[int, ...] | None) -> str | None:
    """Why this process cannot become `uid`/`gid` with `groups`, as spawn does it (setgroups
    when root, then setgid, setuid), or None. Checked when the table is read: otherwise each
    connection's handler would fail alone with a bare "Operation not permitted"."""
    missing = []
    resgid = os.getresgid()
    if not have("cap_setgid") and ((os.geteuid() == 0 and (groups or gid) is not None)
                                   or (gid is not None and gid not in resgid)):
        missing.append("cap_setgid")
    if not have("cap_setuid") and uid is not None and uid not in os.getresuid():
        missing.append("cap_setuid")
    if not missing:
        return None
    return (f"superd runs as uid {os.geteuid()} gid {os.getegid()} without "
            f"{' and '.join(missing)}: it cannot switch to uid {uid if uid is not None else '-'}"
            f" gid {gid if gid is not None else '-'} (run superd as root, or drop user/group)")
