"""Helpers of the access and policy tests (test_names, test_wrappers, test_ident, ...).

`start_private(new_daemon, services, etc)` starts superd in a mount namespace of its own where
the /etc files in `etc` are private copies; `names_etc(tmp, server)` makes the hosts and
resolv.conf such a daemon resolves with. `served(...)` and `refused(...)` are what a client
sees. Every wait is bounded.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from pathlib import Path

from dns_lib import Dnsmasq, etc_file, private_etc, resolv_conf
from limits_lib import closed_at_once, connect_from, recv_all_from
from superd_testlib import PY, REPO, Superd

HOSTS = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n"
REPLY = ["/bin/sh", "-c", 'echo "hi $REMOTE_ADDR"']


def names_etc(tmp: Path, server: str, hosts: str = HOSTS,
              options: str = "timeout:1 attempts:1") -> dict[str, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    return {"/etc/hosts": etc_file(tmp, "hosts", hosts),
            "/etc/resolv.conf": resolv_conf(tmp, server, options)}


def start_private(new_daemon, services: dict, etc: dict[str, Path], **kw) -> Superd:
    d = new_daemon()
    d.prefix = private_etc(etc)
    return d.start(services, **kw)


def served(src: str, port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """What a client from `src` gets (to EOF) from a REPLY service."""
    return recv_all_from(src, host, port, timeout=timeout)


def refused(d: Superd, service: str, src: str, port: int, reason: str,
            host: str = "127.0.0.1", timeout: float = 5.0) -> None:
    """`src` is closed with nothing sent and FAIL: service reason from=src is logged."""
    with connect_from(src, host, port) as s:
        assert closed_at_once(s, timeout), f"{src} must be refused on {service}"
    d.wait_log(rf"^FAIL: {re.escape(service)} {re.escape(reason)} from={re.escape(src)}$",
               timeout=timeout)


def echo_latency(port: int, host: str = "127.0.0.1") -> float:
    """Seconds one line takes through an echo service."""
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"ping\n")
        assert s.recv(16) == b"ping\n"
    return time.monotonic() - started


def check(table: Path, text: str) -> subprocess.CompletedProcess:
    """`superd check` of a table with `text`."""
    table.write_text(text)
    return subprocess.run([PY, "-m", "superd", "check", "-c", str(table)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def dnsmasq(tmp: Path, hosts: dict[str, list[str]], ptrs: dict[str, str] | None = None,
            ttl: int = 300) -> Dnsmasq:
    """A started dnsmasq for `hosts` (and lying `ptrs`), its files under tmp/dns."""
    (tmp / "dns").mkdir(exist_ok=True)
    return Dnsmasq(tmp / "dns", hosts, ptrs, ttl).start()
