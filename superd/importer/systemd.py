"""A systemd socket unit and its service (an `Accept=yes` template, or the service an
`Accept=no` socket starts) in, a `Translation` out: `superd import systemd UNIT.socket
[UNIT.service]`.

The [Socket] section gives the listen addresses and the socket options (the same keys as
superd's, sockopts.py), Accept= gives `wait`, MaxConnections= and MaxConnectionsPerSource=
the limits. The [Service] section (systemd_service.py) gives ExecStart, User/Group,
Environment and the rest. A socket unit with Listen lines of several kinds (stream and
datagram) becomes one superd service per kind. Every other key is kept as a `not carried
over:` comment with the reason; systemd's defaults that superd does not share are written out
(MaxConnections=64, the backlog) with a note.
"""

from __future__ import annotations

import re

from superd import sockopts
from superd.importer import systemd_service as service
from superd.importer import systemd_units as units
from superd.importer.common import Entry, Translation, not_carried
from superd.importer.systemd_units import Setting, Unit

LISTEN = {"ListenStream": "stream", "ListenDatagram": "dgram",
          "ListenSequentialPacket": "seqpacket"}
UNIX = {"stream": "unix", "dgram": "unix-dgram", "seqpacket": "unix-seqpacket"}
NOT_SOCKETS = ("ListenFIFO", "ListenSpecial", "ListenNetlink", "ListenMessageQueue",
               "ListenUSBFunction")
BOOLEAN_KEYS = {"FreeBind": "free_bind", "NoDelay": "nodelay", "ReusePort": "reuse_port",
                "Transparent": "transparent", "Broadcast": "broadcast"}
NUMBER_KEYS = {"Mark": "mark", "IPTTL": "ip_ttl", "Priority": "priority"}
SIZE_KEYS = {"ReceiveBuffer": "receive_buffer", "SendBuffer": "send_buffer"}
MODE_KEYS = {"SocketMode": "socket_mode", "DirectoryMode": "directory_mode"}
KEEPALIVE = {"KeepAliveTimeSec": "time", "KeepAliveIntervalSec": "interval",
             "KeepAliveProbes": "probes"}
TOS = {"low-delay": "low-delay", "throughput": "throughput", "reliability": "reliability",
       "low-cost": "low-cost"}
SOCKET_DROPPED = {
    "FileDescriptorName": "superd names a passed socket after its service (LISTEN_FDNAMES)",
    "SocketProtocol": "superd's sockets are TCP, UDP, unix and vsock (no SCTP, UDP-Lite, MPTCP)",
    "PassCredentials": "superd sets no SO_PASSCRED", "PassSecurity": "superd sets no SO_PASSSEC",
    "PassPacketInfo": "superd sets no IP_PKTINFO", "PassFileDescriptorsToExec": "not in superd",
    "Timestamping": "superd sets no SO_TIMESTAMP", "TCPCongestion": "superd sets no "
    "TCP_CONGESTION", "Symlinks": "superd makes no symlinks to its sockets",
    "RemoveOnStop": "superd removes its unix socket files when it stops, always",
    "TriggerLimitIntervalSec": "superd never switches a service off: its limits pause",
    "TriggerLimitBurst": "superd never switches a service off: its limits pause",
    "PollLimitIntervalSec": "superd pauses by its own limits (rate, instances)",
    "PollLimitBurst": "superd pauses by its own limits (rate, instances)",
    "Writable": "for FIFOs and special files only", "PipeSize": "for FIFOs only",
    "FlushPending": "superd never flushes a socket's queue",
    "SELinuxContextFromNet": "superd does not switch SELinux contexts",
    "SmackLabel": "superd sets no SMACK labels", "SmackLabelIPIn": "superd sets no SMACK labels",
    "SmackLabelIPOut": "superd sets no SMACK labels",
    "Service": "the service unit is read for the handler; superd names it after the socket",
}


def translate(socket_path: str, service_path: str | None = None) -> Translation:
    """Read the socket unit and its service; OSError when one cannot be read."""
    sock = units.read_unit(socket_path)
    accept = units.boolean(_value(sock, "Accept") or "no") is True
    svc_path = service_path or service.find(sock, socket_path, accept)
    svc = units.read_unit(svc_path)
    name = re.sub(r"@?\.socket$", "", sock.name)
    t = Translation("systemd", socket_path, header=[
        f"superd service table imported from {socket_path} and {svc_path} by `superd import "
        "systemd`.",
        "Each service shows the unit lines it came from. `note:` lines say where superd",
        "behaves differently; `not carried over:` lines are what superd cannot do, and why.",
        "See docs/migrating.md for the whole mapping.",
    ])
    listens = _listens(sock)
    for setting in (s for s in sock.settings if s.section == "Socket" and s.key in NOT_SOCKETS):
        t.items.append(not_carried(setting.where, f"{setting.key}=: superd listens on "
                                                  "sockets only", [_line(setting)],
                                   service=False))
    kinds = {kind for _, kind, _ in listens}
    for kind in sorted(kinds, key=list(LISTEN.values()).index):
        lines = [s for s, k, _ in listens if k == kind]
        e = Entry(name, kind if len(kinds) > 1 else "", lines[0].where,
                  [_line(s) for s in lines])
        e.comments = [f"# {c.lstrip('#; ')}" for c in sock.comments + svc.comments]
        problem = _socket(e, sock, [(s, a) for s, k, a in listens if k == kind], accept)
        problem = problem or service.service(e, svc, name, accept)
        if problem:
            t.items.append(not_carried(e.source, problem, e.header))
        else:
            t.items.append(e)
    if not listens:
        t.items.append(not_carried(sock.name, "no ListenStream=, ListenDatagram= or "
                                              "ListenSequentialPacket= line", []))
    return t


def _value(unit: Unit, key: str, section: str = "Socket") -> str | None:
    s = unit.last(section, key)
    return s.value if s else None


def _line(s: Setting) -> str:
    return f"[{s.section}] {s.key}={s.value}"


def _listens(sock: Unit) -> list[tuple[Setting, str, str]]:
    """(setting, stream/dgram/seqpacket, the address as written) of every Listen line."""
    out = []
    for key, kind in LISTEN.items():
        out += [(s, kind, s.value) for s in sock.values("Socket", key)]
    return out


def listen_form(text: str, kind: str, v6only: str) -> tuple[str, str, str | None]:
    """(superd protocol, listen value, note) of one systemd address; ValueError if none."""
    if text.startswith(("/", "@")):
        return UNIX[kind], text, None
    if text.startswith("vsock:"):
        if kind != "stream":
            raise ValueError(f"vsock {kind}: superd serves vsock streams only")
        return "vsock", text, None
    protocol = {"stream": "tcp", "dgram": "udp"}.get(kind)
    if protocol is None:
        raise ValueError("seqpacket over IP is SCTP, which superd does not serve")
    if text.isdigit():
        return protocol, (f"[::]:{text}" if v6only == "ipv6-only" else text), None
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)", text)
    if m and m[1] == "::" and v6only != "ipv6-only":
        return protocol, m[2], (f"{text}: systemd binds it dual-stack (BindIPv6Only="
                                f"{v6only or 'default'}): written as {m[2]}, IPv4 and IPv6")
    if m or re.fullmatch(r"\d{1,3}(\.\d{1,3}){3}:\d+", text):
        return protocol, text, None
    raise ValueError(f"{text}: superd listens on PORT, ADDR:PORT, [ADDR]:PORT, a path, "
                     "@name or vsock:CID:PORT (host names and %interface are not resolved)")


def _socket(e: Entry, sock: Unit, listens: list[tuple[Setting, str]],
            accept: bool) -> str | None:
    """Listen addresses, wait, limits and socket options; a reason when nothing can run."""
    v6only = (_value(sock, "BindIPv6Only") or "").strip()
    protocols, listen, kind = set(), [], ""
    for setting, text in listens:
        kind = next(k for key, k in LISTEN.items() if key == setting.key)
        try:
            protocol, value, note = listen_form(text, kind, v6only)
        except ValueError as err:
            e.drop(setting.where, _line(setting), str(err))
            continue
        protocols.add(protocol)
        listen.append(value)
        if note:
            e.note(note)
    if not listen:
        return "none of its Listen addresses is one superd can serve"
    if len(protocols) > 1:
        return (f"its {kind} addresses are of several kinds ({', '.join(sorted(protocols))}): "
                "write one superd service for each")
    protocol = protocols.pop()
    e.keys["listen"] = listen[0] if len(listen) == 1 else listen
    if protocol != "tcp":
        e.keys["protocol"] = protocol
    e.keys["wait"] = not accept
    if not accept and len(listen) > 1:
        e.note("Accept=no with several sockets: systemd hands them all to one process; "
               "superd starts the handler with the one that became readable")
    _limits(e, sock, accept, protocol)
    _options(e, sock)
    _fit(e, sock, protocol, all(v.startswith("@") for v in listen))
    _rest(e, sock)
    return None


def _limits(e: Entry, sock: Unit, accept: bool, protocol: str) -> None:
    most = sock.last("Socket", "MaxConnections")
    if accept and protocol not in ("udp", "unix-dgram"):
        value = most.value if most else "64"
        if value.isdigit() and int(value) > 0:
            e.keys["instances"] = int(value)
            e.note(("MaxConnections=" if most else "systemd's default MaxConnections=64: ")
                   + f"{value}; over it systemd refuses a connection, superd queues it "
                   "(on_limit: queue; on_limit: refuse is systemd's way)")
        elif most:
            e.drop(most.where, _line(most), "not a number")
    elif most:
        e.drop(most.where, _line(most), "only for Accept=yes (systemd ignores it too)")
    per = sock.last("Socket", "MaxConnectionsPerSource")
    if per and per.value.isdigit() and int(per.value) > 0:
        e.keys["per_source"] = int(per.value)
    elif per:
        e.drop(per.where, _line(per), "not a number of connections")
    backlog = sock.last("Socket", "Backlog")
    if protocol in ("udp", "unix-dgram"):
        return
    if backlog and backlog.value.isdigit() and 0 < int(backlog.value) <= 65535:
        e.keys["backlog"] = int(backlog.value)
    elif backlog:
        e.drop(backlog.where, _line(backlog), "superd's backlog is 1 to 65535")
    else:
        e.keys["backlog"] = 4096
        e.note("systemd's default Backlog= (SOMAXCONN, 4096): written out, superd's own is 128")


def _options(e: Entry, sock: Unit) -> None:
    """The socket options: systemd's key names for superd's (sockopts.py)."""
    def bad(s: Setting, why: str) -> None:
        e.drop(s.where, _line(s), why)

    for s in (x for x in sock.settings if x.section == "Socket"):
        key, value = s.key, s.value
        if key in BOOLEAN_KEYS:
            flag = units.boolean(value)
            if flag is None:
                bad(s, "not a boolean")
            elif flag:
                e.keys[BOOLEAN_KEYS[key]] = True
        elif key in NUMBER_KEYS:
            if value.isdigit():
                e.keys[NUMBER_KEYS[key]] = int(value)
            else:
                bad(s, "not a number")
        elif key in SIZE_KEYS:
            got = units.size(value)
            if got:
                e.keys[SIZE_KEYS[key]] = got
            else:
                bad(s, "not a size")
        elif key in MODE_KEYS:
            if re.fullmatch(r"[0-7]{1,4}", value):
                e.keys[MODE_KEYS[key]] = f"{int(value, 8):04o}"
            else:
                bad(s, "not an octal mode")
        elif key in ("SocketUser", "SocketGroup"):
            e.keys["socket_user" if key == "SocketUser" else "socket_group"] = value
        elif key == "BindToDevice" and value:
            e.keys["bind_to_device"] = value
        elif key == "DeferAcceptSec":
            _seconds(e, s, "defer_accept")
        elif key == "IPTOS":
            if value in TOS or value.isdigit() and int(value) <= 255:
                e.keys["ip_tos"] = TOS.get(value) or int(value)
            else:
                bad(s, "not 0 to 255, low-delay, throughput, reliability or low-cost")
    _keepalive(e, sock)


SYSTEMD_NAMES = {v: k for k, v in {**BOOLEAN_KEYS, **NUMBER_KEYS, **SIZE_KEYS, **MODE_KEYS}.items()}
SYSTEMD_NAMES.update(socket_user="SocketUser", socket_group="SocketGroup",
                     bind_to_device="BindToDevice", defer_accept="DeferAcceptSec",
                     ip_tos="IPTOS", keepalive="KeepAlive")


def _fit(e: Entry, sock: Unit, protocol: str, abstract: bool) -> None:
    """systemd sets an option only where it applies; superd refuses the others: they are
    taken out again here, each with a comment, so the service loads."""
    for key in [k for k in e.keys if k in sockopts.APPLIES]:
        protocols, what = sockopts.APPLIES[key]
        if protocol in protocols and not (abstract and key in sockopts.FILE_KEYS):
            continue
        value = e.keys.pop(key)
        s = sock.last("Socket", SYSTEMD_NAMES[key])
        why = ("no file for an abstract socket (systemd ignores it too)" if protocol in
               protocols else f"{what}, for other sockets than {protocol} (systemd ignores "
                               "it here too)")
        e.drop(s.where if s else e.source, f"{SYSTEMD_NAMES[key]}={s.value if s else value}",
               why)


def _seconds(e: Entry, s: Setting, key: str) -> int | None:
    got = units.timespan(s.value)
    if got is None:
        e.drop(s.where, _line(s), "not a time span")
        return None
    whole = max(1, int(-(-got // 1)))  # the kernel counts whole seconds
    if got:
        e.keys[key] = whole
    if got and whole != got:
        e.note(f"{s.key}={s.value}: {whole} s (the kernel counts whole seconds)")
    return whole


def _keepalive(e: Entry, sock: Unit) -> None:
    on = sock.last("Socket", "KeepAlive")
    params = {}
    for key, name in KEEPALIVE.items():
        s = sock.last("Socket", key)
        if s is None:
            continue
        got = units.timespan(s.value) if key != "KeepAliveProbes" else (
            int(s.value) if s.value.isdigit() else None)
        if not got:
            e.drop(s.where, _line(s), "not a time span" if key != "KeepAliveProbes"
                   else "not a number")
        elif not (on and units.boolean(on.value)):
            e.drop(s.where, _line(s), "KeepAlive= is off: systemd sets it, the kernel does "
                                      "not use it")
        else:
            params[name] = max(1, int(-(-got // 1)))
    if on and units.boolean(on.value):
        e.keys["keepalive"] = params or True
    elif on and units.boolean(on.value) is None:
        e.drop(on.where, _line(on), "not a boolean")


MAPPED = {"Accept", "BindIPv6Only", "MaxConnections", "MaxConnectionsPerSource", "Backlog",
          "SocketUser", "SocketGroup", "BindToDevice", "DeferAcceptSec", "IPTOS", "KeepAlive",
          *LISTEN, *NOT_SOCKETS, *BOOLEAN_KEYS, *NUMBER_KEYS, *SIZE_KEYS, *MODE_KEYS, *KEEPALIVE}


def _rest(e: Entry, sock: Unit) -> None:
    """Every other line of the socket unit, with its reason."""
    for s in sock.settings:
        if s.section == "Socket" and s.key in MAPPED:
            continue
        if s.section == "Socket":
            why = SOCKET_DROPPED.get(s.key) or (
                "superd runs no commands around a socket" if s.key.startswith("Exec") else
                "not a [Socket] key superd has")
        elif s.section == "Unit" and s.key == "Description":
            e.inner.append(f"# {s.value}")
            continue
        else:
            why = service.SECTION_WHY.get(s.section, "not a section of a socket unit")
        e.drop(s.where, _line(s), why)
