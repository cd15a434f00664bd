"""Helpers for tests/test_systemd.py: a real systemd booted with systemd-nspawn, and fd plumbing.

The container: a Debian root made once with ``debootstrap --variant=minbase`` and cached under
/var/cache/superd-test-root (override: $SUPERD_TEST_ROOT_CACHE), booted with
``systemd-nspawn --register=no --keep-unit --volatile=overlay -b`` so every boot starts from the
pristine cached root (changes go to a tmpfs overlay and vanish at halt). It shares the host's
network, so a port superd opens inside answers on the host's loopback. Commands run inside with
``nsenter -t <pid of the container's systemd> -a``.

Every wait here is bounded by a deadline.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from superd_testlib import REPO, descendants, wait_until

CACHE = Path(os.environ.get("SUPERD_TEST_ROOT_CACHE", "/var/cache/superd-test-root"))
# What the root holds. procps: /bin/kill for ExecReload (minbase has none) and ps. python3: the
# interpreter of a venv made from the system's Python (/usr/bin/python3 is not bound in; a pyenv
# build is, see interpreter_binds()).
ROOT_PACKAGES = "systemd,dbus,procps,python3"
ROOT_STAMP = f"superd-test-root v1 {ROOT_PACKAGES}"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
INSIDE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "LANG": "C.UTF-8", "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "TERM": "dumb"}


def nspawn_missing() -> str | None:
    """Why the container test cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, debootstrap)"
    for tool in ("systemd-nspawn", "debootstrap", "nsenter"):
        if shutil.which(tool) is None:
            return (f"{tool} not installed (apt-get install systemd-container debootstrap)")
    return None


def debian_suite() -> str:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return "bookworm"
    m = re.search(r"^VERSION_CODENAME=\"?(\w+)\"?$", text, re.M)
    return m[1] if m else "bookworm"


def debian_mirror(suite: str) -> str:
    """The host's own Debian mirror (deb822 sources first, then sources.list), else Debian's."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    try:
        for stanza in deb822.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            suites = fields.get("Suites", "").split()
            if suite in suites and "deb" in fields.get("Types", "").split():
                return fields["URIs"].split()[0]
    except OSError:
        pass
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                return parts[1]
    except OSError:
        pass
    return DEFAULT_MIRROR


class RootLock:
    """An exclusive lock on the cached root: one build, one container at a time."""

    def __init__(self, timeout: float = 600.0):
        CACHE.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(CACHE / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        end = time.monotonic() + timeout
        for _ in range(int(timeout / 0.2) + 10):
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > end:
                    break
                time.sleep(0.2)
        os.close(self.fd)
        raise AssertionError(f"{CACHE}/.lock still held by someone else after {timeout}s")

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def container_root(timeout: float = 900.0) -> Path:
    """The cached Debian root, made with debootstrap when missing (caller holds RootLock)."""
    suite = debian_suite()
    root = CACHE / suite
    stamp = root / ".superd-test-root"
    try:
        if stamp.read_text() == ROOT_STAMP:
            return root
    except OSError:
        pass
    tmp = CACHE / f"{suite}.tmp"
    for old in (tmp, root):
        if old.exists():
            shutil.rmtree(old)
    mirror = debian_mirror(suite)
    log = CACHE / "debootstrap.log"
    with open(log, "wb") as out:
        r = subprocess.run(["debootstrap", "--variant=minbase", f"--include={ROOT_PACKAGES}",
                            suite, str(tmp), mirror], stdin=subprocess.DEVNULL, stdout=out,
                           stderr=subprocess.STDOUT, timeout=timeout)
    assert r.returncode == 0, (f"debootstrap {suite} from {mirror} failed ({r.returncode}):\n"
                               + log.read_text(errors="replace")[-3000:])
    (tmp / ".superd-test-root").write_text(ROOT_STAMP)
    os.rename(tmp, root)
    return root


def dependency_debs(root: Path, packages: list[str], timeout: float = 600) -> Path:
    """A folder of the .debs `packages` need on `root` (only what root lacks), downloaded by
    the host's apt (from the host's mirror) against root's dpkg status; cached by package
    list and root. The container's apt has no network: install from these files."""
    status = root / "var" / "lib" / "dpkg" / "status"
    key = hashlib.sha256((" ".join(sorted(packages)) + "\n").encode()
                         + status.read_bytes()).hexdigest()[:16]
    folder = CACHE / f"debs-{key}"
    if (folder / ".complete").exists():
        return folder
    tmp = CACHE / f"debs-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "partial").mkdir(parents=True)
    cmd = ["apt-get", "-q", "-y", "--no-install-recommends", "--download-only",
           "-o", f"Dir::State::status={status}", "-o", f"Dir::Cache::archives={tmp}",
           "-o", "Debug::NoLocking=1", "install", *packages]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:  # the host's package lists may be missing or stale: refresh once
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=timeout)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"downloading {packages} failed:\n{r.stdout[-2000:]}{r.stderr}"
    shutil.rmtree(tmp / "partial")
    (tmp / ".complete").write_text(" ".join(packages) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    os.rename(tmp, folder)
    return folder


DEBS_INSIDE = "/srv/superd-debs"
APT_OFFLINE = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", "Dir::Etc::SourceParts=/dev/null"]


def install_debs(box: Container, files: list[str], timeout: float = 600) -> str:
    """`apt-get install` of .deb files inside (paths as the container sees them), with no apt
    sources at all: what they need must be among them or already installed. Its output."""
    r = box.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *APT_OFFLINE, "install",
                 "-y", "-q", "--no-install-recommends", *files], check=False, timeout=timeout)
    assert r.returncode == 0, f"apt-get install in the container:\n{r.stdout[-3000:]}{r.stderr}"
    return r.stdout


def venv_debian_packages() -> list[str]:
    """The Debian packages this venv takes superd's dependencies from, when it was made with
    --system-site-packages from Debian's python3 (bash .ci/setup): the container needs them
    too, as the venv is bound in but /usr is the container's own."""
    names = []
    for module in ("yaml", "systemd", "daemon"):
        spec = importlib.util.find_spec(module)
        origin = spec.origin if spec is not None else None
        if origin and origin.startswith("/usr/lib/python3/dist-packages/"):
            r = subprocess.run(["dpkg-query", "-S", origin], capture_output=True, text=True,
                               timeout=30)
            if r.returncode == 0:
                names.append(r.stdout.split(":")[0])
    return sorted(set(names))


def _ns_pid1(pid: int) -> bool:
    """Is `pid` (a host pid) PID 1 of a pid namespace below ours?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) >= 2 and ids[-1] == "1"
    except OSError:
        pass
    return False


class Container:
    """A booted systemd (PID 1 of its own namespaces) on a volatile overlay of the cached root."""

    def __init__(self, root: Path, workdir: Path, binds_ro: list[tuple[str, str]]):
        self.root, self.workdir, self.binds_ro = root, workdir, binds_ro
        self.proc: subprocess.Popen | None = None
        self.init_pid = 0
        self.console = workdir / "nspawn.console"

    def boot(self, timeout: float = 60.0) -> Container:
        cmd = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet",
               "--volatile=overlay", "-D", str(self.root)]
        cmd += [f"--bind-ro={src}:{dst}" for src, dst in self.binds_ro]
        cmd += ["-b"]
        self._console = open(self.console, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._console,
                                     stderr=subprocess.STDOUT, start_new_session=True)

        def init_pid() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n"
                                     + self.console.read_text(errors="replace")[-3000:])
            found = [p for p in descendants(self.proc.pid) if _ns_pid1(p)]
            return found[0] if found else None

        self.init_pid = wait_until(init_pid, timeout, "the container's PID 1")
        end = time.monotonic() + timeout
        # `is-system-running --wait` needs PID 1's bus socket first; it exists within ~0.3 s.
        for _ in range(int(timeout / 0.1) + 10):
            r = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                         timeout=max(1.0, end - time.monotonic()))
            state = r.stdout.strip()
            if state in ("running", "degraded"):
                return self
            if time.monotonic() > end or self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"container did not finish booting: {state!r} {r.stderr}\n"
                             + self.console.read_text(errors="replace")[-3000:])

    def run(self, cmd: list[str], check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess:
        """Run `cmd` inside the container (all its namespaces); returns the completed process."""
        r = subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", *cmd], env=INSIDE_ENV,
                           input=input, capture_output=True, text=True, timeout=timeout)
        if check:
            assert r.returncode == 0, (f"inside the container: {cmd} exited {r.returncode}\n"
                                       f"stdout: {r.stdout}\nstderr: {r.stderr}")
        return r

    def journal(self, *args: str) -> str:
        """`journalctl -b ARGS` of this boot, after asking journald to take in what is queued."""
        self.run(["journalctl", "--sync"], check=False, timeout=30)
        return self.run(["journalctl", "-b", "--no-pager", "-q", *args], check=False,
                        timeout=30).stdout

    def processes(self) -> list[tuple[int, str]]:
        """(pid, command line) of every process inside (pids as the container sees them)."""
        out = self.run(["ps", "-e", "-o", "pid=,args="]).stdout
        procs = []
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if pid.isdigit():
                procs.append((int(pid), args.strip()))
        return procs

    def halt(self, timeout: float = 30.0) -> None:
        """SIGTERM to nspawn: the container's systemd powers off cleanly. SIGKILL if it hangs."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._console.close()


# --------------------------------------------------------------------------------------------
# handing sockets to a child the way systemd does


def interpreter_binds() -> list[tuple[str, str]]:
    """What the container needs, at the same paths, to run the venv's `superd` console script:
    the repository (editable install), the venv if it lives elsewhere, and the base Python
    (a pyenv build under /root/.pyenv, say) unless it is the system's own under /usr."""
    binds = [(str(REPO), str(REPO))]
    paths = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix)}
    for p in sorted(paths):
        if p == "/usr" or p.startswith("/usr/"):
            continue
        if p == str(REPO) or p.startswith(str(REPO) + "/"):
            continue
        binds.append((p, p))
    return binds
