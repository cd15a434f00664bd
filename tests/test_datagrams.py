"""Internal datagram services facing spoofed and hostile datagrams (issue 16, findings 3, 4, 16;
issue 12, point 8).

- One spoofed datagram whose source port is one of superd's own datagram ports starts no
  echo/chargen ping-pong (FreeBSD inetd's check_loop); nobody can bind such a port beside
  superd (no SO_REUSEADDR on UDP).
- `rate` limits the answers of an internal datagram service; `instances` and `per_source`
  are refused at load for one (they count connections, and there are none).
- `superd status` counts the datagrams answered and dropped.
- A unix datagram echo never replies into a socket the sender could not write to itself.
- chargen: TCP keeps sending after the client half-closes (RFC 864); UDP answers one whole
  line from a line start, as the BSD inetds do, so it amplifies no more than theirs.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import struct
import subprocess
import time

import pytest
import reliability_lib as rl
import superd_testlib as lib
from superd_testlib import connect, free_port, recv_exact, udp_request

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="needs root")
LINE = 74


def udp(port: int, internal: str, **extra: object) -> dict:
    return {"listen": f"127.0.0.1:{port}", "protocol": "udp", "internal": internal, **extra}


def spoof_udp(src_port: int, dst_port: int, payload: bytes) -> None:
    """Send one UDP datagram 127.0.0.1:src_port -> 127.0.0.1:dst_port with a raw socket, as
    a spoofer would: no socket of ours is bound to src_port (superd holds it)."""
    header = struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0)  # checksum 0: none
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        raw.sendto(header + payload, ("127.0.0.1", 0))


@needs_root
def test_spoofed_datagram_from_our_own_port_starts_no_loop(superd):
    ports = {"echo-u": free_port(), "chargen-u": free_port()}
    d = superd({name: udp(port, name[:-2]) for name, port in ports.items()})
    before = lib.cpu_seconds(d.pid)
    spoof_udp(ports["chargen-u"], ports["echo-u"], b"ping")
    spoof_udp(ports["echo-u"], ports["echo-u"], b"self")  # echo with itself, too
    time.sleep(1.0)  # what is measured: nothing may happen in this second
    spent = lib.cpu_seconds(d.pid) - before
    status = lib.status(d)["services"]
    assert status["echo-u"]["answered"] == 0 and status["echo-u"]["dropped"] == 2, status
    assert status["chargen-u"]["answered"] == 0, status
    assert spent < 0.3, f"superd used {spent:.2f} s of CPU in the second after the datagrams"
    assert udp_request("127.0.0.1", ports["echo-u"], b"still") is not None


def test_nobody_can_bind_beside_a_udp_listener(superd):
    port = free_port()
    superd({"echo-u": udp(port, "echo")})
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        with pytest.raises(OSError) as e:
            s.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE
    finally:
        s.close()


def test_status_counts_datagrams_answered_and_dropped(superd):
    port = free_port()
    d = superd({"echo-u": udp(port, "echo", no_access=["127.0.0.2"])})
    for i in range(3):
        assert udp_request("127.0.0.1", port, b"x%d" % i)[0] == b"x%d" % i
    assert udp_request("127.0.0.1", port, b"no", timeout=0.5, bind=("127.0.0.2", 0)) is None
    lib.wait_until(lambda: lib.status(d)["services"]["echo-u"]["dropped"] == 1, 5, "a drop")
    assert lib.status(d)["services"]["echo-u"]["answered"] == 3


def test_rate_limits_the_answers_of_a_datagram_service(superd):
    port = free_port()
    d = superd({"echo-u": udp(port, "echo", rate="5/s")})
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        start = time.monotonic()
        for i in range(40):
            s.sendto(b"%d" % i, ("127.0.0.1", port))
        got = 0
        for _ in range(40):
            try:
                s.recv(100)
            except TimeoutError:
                break
            got += 1
        elapsed = time.monotonic() - start
    # A bucket of 5, refilled at 5/s: at most 5 + 5 per second elapsed (and one in flight).
    assert 5 <= got <= 5 + int(5 * elapsed) + 1, (got, elapsed)
    assert lib.status(d)["services"]["echo-u"]["paused"] in ("rate", None)


@pytest.mark.parametrize("key,value", [("instances", 4), ("per_source", 2)])
def test_connection_limits_are_refused_on_a_datagram_service(new_daemon, key, value):
    d = new_daemon()
    d.write_table({"echo-u": udp(free_port(), "echo", **{key: value})})
    out = subprocess.run([lib.PY, "-m", "superd", "check", "-c", str(d.table)], cwd=lib.REPO,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"services.echo-u.{key}: {key} counts connections" in out.stdout, out.stdout


# -- unix datagrams: the confused deputy -----------------------------------------------------

def _client_send_then_swap(dirpath: str, server: str, victim: str) -> bool:
    """As nobody: bind in our own folder, send, then put a symlink to `victim` where our
    socket was. True when the swap was made (superd is stopped meanwhile)."""
    mine = os.path.join(dirpath, "client.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(mine)
    s.sendto(b"attacker bytes", server)
    s.close()
    os.unlink(mine)
    os.symlink(victim, mine)
    return True


def _client_echo(dirpath: str, server: str) -> bytes:
    mine = os.path.join(dirpath, "honest.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(mine)
        s.settimeout(5)
        s.sendto(b"hello", server)
        return s.recv(100)


@needs_root
def test_unix_datagram_reply_never_follows_a_swapped_path(superd):
    server_dir = rl.world_dir("superd-udg-")
    server = str(server_dir / "echo.sock")
    d = superd({"echo-ud": {"listen": server, "protocol": "unix-dgram", "internal": "echo"}})
    os.chmod(server, 0o666)
    victim_dir = rl.world_dir("superd-victim-")  # root's: nobody cannot write in it
    victim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    victim.bind(str(victim_dir / "victim.sock"))
    victim.settimeout(1.0)
    nobody = rl.nobody()
    client_dir = server_dir / "nobody"
    client_dir.mkdir()
    os.chown(client_dir, nobody.pw_uid, nobody.pw_gid)
    try:
        assert rl.run_as(nobody, _client_echo, str(client_dir), server) == b"hello"
        d.proc.send_signal(signal.SIGSTOP)  # ours: so that the swap comes before the reply
        try:
            assert rl.run_as(nobody, _client_send_then_swap, str(client_dir), server,
                             str(victim_dir / "victim.sock"))
        finally:
            d.proc.send_signal(signal.SIGCONT)
        with pytest.raises(TimeoutError):
            print("victim got", victim.recv(100))
        lib.wait_until(lambda: lib.status(d)["services"]["echo-ud"]["dropped"] == 1, 5,
                       "the swapped reply dropped")
    finally:
        victim.close()


# -- chargen ---------------------------------------------------------------------------------

def test_tcp_chargen_keeps_sending_after_a_half_close(superd):
    port = free_port()
    superd({"chargen": {"listen": f"127.0.0.1:{port}", "internal": "chargen"}})
    with connect("127.0.0.1", port) as s:
        s.sendall(b"a line the server throws away\r\n")
        s.shutdown(socket.SHUT_WR)
        data = recv_exact(s, 100_000, timeout=5)
    assert rl.chargen_ok(data), data[:100]


def test_udp_chargen_answers_one_whole_line_a_datagram(superd):
    port = free_port()
    superd({"chargen-u": udp(port, "chargen")})
    starts = []
    for _ in range(3):
        reply = udp_request("127.0.0.1", port, b"")
        assert reply is not None
        data = reply[0]
        assert len(data) == LINE and data.endswith(b"\r\n"), data
        assert rl.chargen_slice_ok(data), data
        starts.append(data[0])
    assert len(set(starts)) == 3, "each datagram starts one character on"
    # What a spoofed 0-byte request costs the victim, IP and UDP headers included.
    assert (LINE + 28) / 28 <= 3.7


def test_refused_datagrams_write_few_fail_lines(superd):
    """Finding 11: a UDP wait service with only_from wrote a FAIL line per refused datagram,
    and a datagram's source is whatever its sender wrote: a spoofer chose whom fail2ban bans.
    Now: one line per source a minute, ten a second in all, each saying the source is not
    verified; every refusal is still counted."""
    port = free_port()
    d = superd({"tftp": {"listen": f"127.0.0.1:{port}", "protocol": "udp", "wait": True,
                         "exec": ["/bin/true"], "only_from": ["192.0.2.0/24"]}})
    sources = [f"127.0.0.{i}" for i in range(2, 32)]  # 30 sources, 3 datagrams each
    for _ in range(3):
        for src in sources:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((src, 0))
                s.sendto(b"\0\1file\0octet\0", ("127.0.0.1", port))
    lib.wait_until(lambda: lib.status(d)["services"]["tftp"]["refused"].get("address") == 90,
                   10, "90 refusals counted")
    fails = [x for x in d.lines() if x.startswith("FAIL: tftp address")]
    assert 1 <= len(fails) <= 30, fails
    per_source = {x.split("from=")[1].split()[0] for x in fails}
    assert len(per_source) == len(fails), "one line per source"
    assert all(x.endswith("(datagram: its source is not verified)") for x in fails), fails
