"""Name servers and private /etc files for the tests of names: nothing here asks real DNS.

- `Dnsmasq`: a real dnsmasq (Debian dnsmasq-base) answering for the names a test gives it,
  on port 53 of an address of its own in 127/8, authoritative for them (every other name
  and address is NXDOMAIN), with the TTL the test chooses.
- `SilentDns`: a name server that reads every query and never answers.
- `private_etc(files)`: the argv prefix that runs a program in a mount namespace of its own
  where each given /etc file is a private copy (bind mounts; the host's files are untouched).

Every wait is bounded.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from superd_testlib import wait_until

_rng = random.Random(os.getpid() ^ time.time_ns())


def private_address() -> str:
    """An address in 127/8 that nothing of ours uses yet (port 53 free on it)."""
    for _ in range(200):
        ip = f"127.{_rng.randint(60, 250)}.{_rng.randint(1, 250)}.{_rng.randint(2, 250)}"
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((ip, 53))
            return ip
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free 127/8 address for a name server")


class Dnsmasq:
    """dnsmasq serving `hosts` ({name: [addresses]}, with PTRs) and `ptrs` ({ip: name},
    PTR only: a lying reverse name) with TTL `ttl`."""

    def __init__(self, directory: Path, hosts: dict[str, list[str]],
                 ptrs: dict[str, str] | None = None, ttl: int = 300):
        self.dir, self.hosts, self.ptrs, self.ttl = directory, hosts, ptrs or {}, ttl
        self.ip = private_address()
        self.proc: subprocess.Popen | None = None
        self.log = directory / "dnsmasq.log"

    def start(self) -> Dnsmasq:
        exe = shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        args = [exe, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                "--no-hosts", "--no-poll", "--bind-interfaces", f"--listen-address={self.ip}",
                "--port=53", "--user=root", "--pid-file", f"--local-ttl={self.ttl}",
                f"--neg-ttl={self.ttl}", "--local=/test/", "--local=/in-addr.arpa/",
                "--local=/ip6.arpa/", "--log-queries", f"--log-facility={self.log}"]
        for name, addrs in self.hosts.items():
            args += [f"--host-record={name},{addr}" for addr in addrs]
        for ip, name in self.ptrs.items():
            args.append(f"--ptr-record={_reverse(ip)},{name}")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        wait_until(lambda: self.answers() or self.proc.poll() is not None, 10,
                   "dnsmasq answering")
        assert self.proc.poll() is None, f"dnsmasq exited: {self.proc.stderr.read()!r}"
        return self

    def answers(self) -> bool:
        """Does it answer a query (any answer) on its address?"""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.2)
            s.sendto(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                     b"\x04ping\x04test\x00\x00\x01\x00\x01", (self.ip, 53))
            try:
                return bool(s.recv(512))
            except OSError:
                return False

    def queries(self) -> list[str]:
        """The names it was asked for, in order (from its query log)."""
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [line.split("query[", 1)[1].split("] ", 1)[1].split(" ", 1)[0]
                for line in text.splitlines() if "query[" in line]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _reverse(ip: str) -> str:
    import ipaddress
    return ipaddress.ip_address(ip).reverse_pointer


class SilentDns:
    """A name server that never answers: it reads and counts every query."""

    def __init__(self):
        self.ip = private_address()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.ip, 53))
        self.sock.settimeout(0.2)
        self.count = 0
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> SilentDns:
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stopping:
            try:
                self.sock.recv(4096)
                self.count += 1
            except OSError:
                continue

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(5)
        self.sock.close()


def resolv_conf(directory: Path, server: str, options: str = "timeout:1 attempts:1") -> Path:
    path = directory / "resolv.conf"
    path.write_text(f"nameserver {server}\noptions {options}\n")
    return path


def private_etc(files: dict[str, Path]) -> list[str]:
    """argv prefix: run the rest in a private mount namespace with `files` bind-mounted over
    the /etc paths they name ({"/etc/hosts": Path(...)})."""
    mounts = " && ".join(f"mount --bind {src} {dst}" for dst, src in files.items())
    return ["unshare", "-m", "--propagation", "private", "--", "sh", "-c",
            f"{mounts} && exec \"$@\"", "sh"]


def etc_file(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    path.chmod(0o644)
    return path


def temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="superd-dns-"))
