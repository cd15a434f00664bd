"""Socket options on TCP and UDP services, seen where a handler sees them: getsockopt() on its
fd 0, `ss`, and the behaviour of a real client. (Unix, abstract, seqpacket and vsock sockets
are in test_socket_kinds.py; the table's checks of these keys in test_socket_table.py.)

Linux copies most options from a listening socket to the connections accepted from it; each
test here reads the option on the *accepted* connection a handler got, so an option the kernel
does not copy (SO_PRIORITY) fails here unless superd sets it per connection.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess

import pytest
import superd_testlib as lib
from superd_testlib import (
    connect,
    free_port,
    python_script,
    recv_until_eof,
    tcp_exchange,
    wait_until,
)

# getsockopt() on fd 0, as JSON on fd 1 (fd 0 is the connection, or for wait: true the
# listening socket, in which case one connection or datagram is taken and answered).
PROBE = r'''
import json, os, socket, sys
s = socket.socket(fileno=os.dup(0))
listening = len(sys.argv) > 1
if listening and s.type != socket.SOCK_DGRAM:
    conn, _ = s.accept()
def opt(level, name, size=0):
    try:
        if size:
            return s.getsockopt(level, name, size).rstrip(b"\0").decode()
        return s.getsockopt(level, name)
    except OSError as e:
        return f"errno {e.errno}"
name = s.getsockname()
name = list(name[:2]) if isinstance(name, tuple) else name.decode() if isinstance(name, bytes) \
    else name
out = {"family": int(s.family), "type": int(s.type), "sockname": name}
for name, level, option in [
        ("nodelay", 6, 1), ("keepalive", 1, 9), ("keepidle", 6, 4), ("keepintvl", 6, 5),
        ("keepcnt", 6, 6), ("defer_accept", 6, 9), ("rcvbuf", 1, 8), ("sndbuf", 1, 7),
        ("mark", 1, 36), ("priority", 1, 12), ("tos", 0, 1), ("ttl", 0, 2),
        ("tclass", 41, 67), ("hops", 41, 16), ("transparent", 0, 19),
        ("transparent6", 41, 75), ("freebind", 0, 15), ("freebind6", 41, 78),
        ("reuseport", 1, 15), ("broadcast", 1, 6)]:
    out[name] = opt(level, option)
out["device"] = opt(1, 25, 16)
out["env"] = {k: v for k, v in os.environ.items()
              if k in ("PROTO", "REMOTE_ADDR", "REMOTE_PORT") or k.startswith(("VSOCK", "UNIX"))}
data = json.dumps(out).encode()
if listening and s.type == socket.SOCK_DGRAM:
    _, peer = s.recvfrom(65536)
    s.sendto(data, peer)
else:
    target = conn if listening else s
    target.sendall(data)
'''


@pytest.fixture
def probe(tmp_path):
    return python_script(tmp_path / "probe.py", PROBE)


def ask(host: str, port: int) -> dict:
    return json.loads(tcp_exchange(host, port, b""))


def ask_udp(host: str, port: int, timeout: float = 5.0) -> dict:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as c:
        c.settimeout(timeout)
        c.sendto(b"?", (host, port))
        return json.loads(c.recvfrom(65536)[0])


def listening_line(port: int) -> str:
    """`ss -ltn` for one port (the local address column shows %device and bound addresses)."""
    r = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True,
                       timeout=10)
    return r.stdout


ALL_TCP = {"nodelay": True, "keepalive": {"time": 77, "interval": 13, "probes": 4},
           "receive_buffer": 100000, "send_buffer": "150K", "mark": 42, "ip_tos": "low-delay",
           "ip_ttl": 33, "priority": 5, "transparent": True, "free_bind": True}


def test_tcp_options_reach_the_handlers_fd0(superd, probe):
    plain, full, six, dual = free_port(), free_port(), free_port(), free_port()
    superd({
        "plain": {"listen": f"127.0.0.1:{plain}", "exec": [str(probe)]},
        "full": {"listen": f"127.0.0.1:{full}", "exec": [str(probe)],
                 "bind_to_device": "lo", **ALL_TCP},
        "six": {"listen": f"[::1]:{six}", "exec": [str(probe)], **ALL_TCP},
        "dual": {"listen": str(dual), "exec": [str(probe)], "ip_tos": 0x20, "ip_ttl": 9},
    })
    before = ask("127.0.0.1", plain)  # what the kernel gives without options: the control
    assert (before["nodelay"], before["keepalive"], before["mark"], before["priority"],
            before["tos"], before["transparent"], before["device"], before["freebind"]) == (
        0, 0, 0, 0, 0, 0, "", 0)
    got = ask("127.0.0.1", full)
    assert (got["nodelay"], got["keepalive"], got["keepidle"], got["keepintvl"],
            got["keepcnt"]) == (1, 1, 77, 13, 4), got
    assert got["rcvbuf"] == 2 * 100000 and got["sndbuf"] == 2 * 150 * 1024, got  # Linux doubles
    assert (got["mark"], got["tos"], got["ttl"], got["transparent"], got["freebind"]) == (
        42, 0x10, 33, 1, 1), got
    assert got["priority"] == 5, got  # not copied by the kernel: superd sets it per connection
    assert got["device"] == "lo", got
    v6 = ask("::1", six)
    assert (v6["tclass"], v6["hops"], v6["nodelay"], v6["priority"], v6["transparent6"]) == (
        0x10, 33, 1, 5, 1), v6
    mapped = ask("127.0.0.1", dual)  # an IPv4 client of a dual-stack socket: IP_TOS applies
    assert (mapped["tos"], mapped["ttl"]) == (0x20, 9), mapped
    assert (ask("::1", dual)["tclass"], ask("::1", dual)["hops"]) == (0x20, 9)


def test_internal_services_get_the_options_too(superd):
    """An internal session runs on the accepted socket in the loop: same options. The
    listening socket itself is what `ss` shows; the echo proves the service works."""
    port = free_port()
    superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo", "nodelay": True,
                     "bind_to_device": "lo"}})
    assert tcp_exchange("127.0.0.1", port, b"hello") == b"hello"
    assert f"127.0.0.1%lo:{port}" in listening_line(port)


def test_wait_handler_gets_the_listening_socket_with_its_options(superd, probe):
    """defer_accept is an option of the listening socket alone: a wait: true handler sees it
    on its fd 0; nodelay there too (and on the connections it accepts)."""
    port = free_port()
    superd({"w": {"listen": f"127.0.0.1:{port}", "wait": True, "exec": [str(probe), "listen"],
                  "defer_accept": 5, "nodelay": True, "reuse_port": True}})
    with connect("127.0.0.1", port) as c:
        c.sendall(b"x")  # with TCP_DEFER_ACCEPT the handler's accept waits for data
        got = json.loads(recv_until_eof(c))
    assert got["defer_accept"] >= 5 and got["nodelay"] == 1 and got["reuseport"] == 1, got


def test_defer_accept_holds_a_silent_client_back(superd):
    """TCP_DEFER_ACCEPT: a client that sends nothing is not even accepted (daytime would
    answer at once); one byte from it and it is served."""
    slow, fast = free_port(), free_port()
    superd({"slow": {"listen": f"127.0.0.1:{slow}", "internal": "daytime", "defer_accept": 30},
            "fast": {"listen": f"127.0.0.1:{fast}", "internal": "daytime"}})
    with connect("127.0.0.1", fast) as c:
        assert c.recv(100)  # the control: daytime answers a silent client at once
    with connect("127.0.0.1", slow) as c:
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(100)
        c.settimeout(5)
        c.sendall(b"\n")
        assert recv_until_eof(c).endswith(b"\r\n")


def test_udp_wait_handler_sees_broadcast_and_buffers(superd, probe):
    port, plain = free_port(), free_port()
    superd({"u": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True,
                  "exec": [str(probe), "listen"], "broadcast": True, "receive_buffer": "256K",
                  "ip_tos": 0x08, "mark": 3},
            "plain": {"listen": f"127.0.0.1:{plain}", "protocol": "udp", "wait": True,
                      "exec": [str(probe), "listen"]}})
    assert ask_udp("127.0.0.1", plain)["broadcast"] == 0
    got = ask_udp("127.0.0.1", port)
    assert (got["broadcast"], got["rcvbuf"], got["tos"], got["mark"]) == (
        1, 2 * 256 * 1024, 0x08, 3), got


# -- binding ---------------------------------------------------------------------------------


def test_free_bind_serves_an_address_not_on_this_machine(superd, new_daemon):
    """192.0.2.10 and 2001:db8::10 are TEST-NET: bound, never sent to."""
    port = free_port()
    superd({"vip": {"listen": [f"192.0.2.10:{port}", f"[2001:db8::10]:{port}"],
                    "internal": "echo", "free_bind": True},
            "here": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    lines = listening_line(port)
    assert f"192.0.2.10:{port}" in lines and f"[2001:db8::10]:{port}" in lines, lines
    assert tcp_exchange("127.0.0.1", port, b"up") == b"up"  # the rest of the table serves
    # without free_bind the same address cannot be bound: superd says which and why (and
    # tries it again: the address may come up)
    d = new_daemon()
    other = free_port()
    d.start({"vip": {"listen": f"192.0.2.10:{other}", "internal": "echo"}})
    not_started(d, "vip", f"services.vip.listen: cannot bind 192.0.2.10:{other}: Cannot "
                "assign requested address")


def test_reuse_port_lets_two_superds_share_a_port(superd, new_daemon, tmp_path):
    script = python_script(tmp_path / "who.py", "import os\nprint(os.environ['WHO'])\n")
    port = free_port()
    for who in ("one", "two"):
        superd({"w": {"listen": f"127.0.0.1:{port}", "exec": [str(script)], "reuse_port": True,
                      "env": {"WHO": who}}})
    seen: set[bytes] = set()
    for _ in range(200):  # the kernel spreads connections over both by a hash of the peer
        seen.add(tcp_exchange("127.0.0.1", port, b"").strip())
        if seen == {b"one", b"two"}:
            break
    assert seen == {b"one", b"two"}
    # and a third without reuse_port is refused the port, as any server would be
    d = new_daemon()
    d.start({"w": {"listen": f"127.0.0.1:{port}", "internal": "echo"}})
    not_started(d, "w", "Address already in use")


def test_reuse_port_beside_another_server(superd):
    port = free_port()
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", port))
    other.listen(16)
    try:
        superd({"echo": {"listen": f"127.0.0.1:{port}", "internal": "echo",
                         "reuse_port": True}})
        other.settimeout(0.05)
        served = got_other = 0
        for _ in range(200):
            with connect("127.0.0.1", port) as c:
                c.sendall(b"ping")
                c.shutdown(socket.SHUT_WR)
                c.settimeout(0.5)
                try:
                    served += c.recv(4) == b"ping"
                except TimeoutError:
                    pass  # the other server has it
            try:
                other.accept()[0].close()
                got_other += 1
            except TimeoutError:
                pass
            if served and got_other:
                break
        assert served and got_other, (served, got_other)
    finally:
        other.close()


def test_bind_to_device_that_does_not_exist_is_named(new_daemon):
    d = new_daemon()
    port = free_port()
    d.start({"x": {"listen": f"127.0.0.1:{port}", "internal": "echo",
                   "bind_to_device": "nosuchdev0"}})
    not_started(d, "x", "bind_to_device: No such device")


def not_started(d: lib.Superd, name: str, why: str) -> None:
    """`name` could not be bound: superd runs on, logs why once and shows it in status."""
    d.wait_log(rf"^{re.escape(name)}: not started: .*{re.escape(why)}")
    assert why in lib.status(d)["failed"][name]["reason"]


# -- reload ----------------------------------------------------------------------------------


def _listen_inode(port: int) -> int:
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as f:
            for line in f.read().splitlines()[1:]:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return int(parts[9])
    return 0


def test_reload_changes_options_on_the_same_socket(superd, probe):
    """nodelay and the rest can change on a bound socket: a reload keeps it (no connection is
    refused) and sets them; a new buffer size cannot be undone on a socket, so it rebinds."""
    port = free_port()
    svc = {"listen": f"127.0.0.1:{port}", "exec": [str(probe)], "nodelay": True, "mark": 9}
    d = superd({"p": svc})
    inode = _listen_inode(port)
    assert (ask("127.0.0.1", port)["nodelay"], ask("127.0.0.1", port)["mark"]) == (1, 9)
    d.reload({"p": {**svc, "nodelay": False, "mark": 0, "ip_ttl": 5}})
    got = ask("127.0.0.1", port)
    assert (got["nodelay"], got["mark"], got["ttl"]) == (0, 0, 5), got
    assert _listen_inode(port) == inode  # the very same listening socket
    d.reload({"p": {**svc, "receive_buffer": 90000}})
    assert ask("127.0.0.1", port)["rcvbuf"] == 180000
    wait_until(lambda: _listen_inode(port) not in (0, inode), 5, "a new listening socket")
