"""Helpers for tests/test_package.py: the Debian package built from this checkout, the
Debian packages it needs, and a container (a real systemd, tests/systemd_lib.py) with all of
it installed the way an admin installs it, offline.

- The .deb: $SUPERD_DEB (what `bash .ci/run` built with .ci/package a moment before), else
  built here by .ci/package into a temporary directory.
- Its dependencies, and what the tests use beside it (rsyslog, fail2ban, man-db): what the
  cached root lacks, downloaded on the host by apt from the host's mirror, resolved against
  the root's own dpkg status, and cached under the root cache (a few MB).
- The container boots on a volatile overlay of the cached root, so the root stays clean;
  apt inside has no sources at all: every package comes from those files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import systemd_lib as sl
from superd_testlib import REPO

# What the tests use inside besides superd: rsyslog behind journald, fail2ban-regex, man.
EXTRA_PACKAGES = ("rsyslog", "fail2ban", "man-db")
INSIDE_DEB = "/srv/superd-deb"
INSIDE_DEPS = "/srv/superd-deps"
APT_OFFLINE = ["-o", "Dir::Etc::SourceList=/dev/null", "-o", "Dir::Etc::SourceParts=/dev/null"]


def package_tools_missing() -> str | None:
    """Why the package cannot be built here, or None."""
    for tool in ("dpkg-buildpackage", "dh", "lintian", "apt-get"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (bash .ci/setup --test installs the build tools)"
    return None


def built_deb(workdir: Path) -> Path:
    """The superd .deb to test: $SUPERD_DEB, else one built now from this checkout."""
    given = os.environ.get("SUPERD_DEB")
    if given:
        path = Path(given).resolve()
        assert path.is_file(), f"SUPERD_DEB={given}: no such file"
        return path
    why = package_tools_missing()
    assert why is None, why
    out = workdir / "deb"
    r = subprocess.run(["bash", str(REPO / ".ci" / "package"), str(out)], capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, f".ci/package failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return Path(r.stdout.strip().splitlines()[-1])


def deb_depends(deb: Path) -> list[str]:
    """The package names of a .deb's Depends (alternatives and versions dropped)."""
    text = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                          text=True, timeout=30, check=True).stdout
    return [re.split(r"[\s(:]", part.split("|")[0].strip())[0]
            for part in text.split(",") if part.strip()]


def dependency_debs(root: Path, packages: list[str], timeout: float = 600) -> Path:
    """A folder of the .debs `packages` need on `root` (only what root lacks), downloaded by
    the host's apt against root's dpkg status. Cached by package list and root."""
    status = root / "var" / "lib" / "dpkg" / "status"
    key = hashlib.sha256((" ".join(sorted(packages)) + "\n").encode()
                         + status.read_bytes()).hexdigest()[:16]
    folder = sl.CACHE / f"debs-{key}"
    if (folder / ".complete").exists():
        return folder
    tmp = sl.CACHE / f"debs-{key}.tmp"
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


def boot_with_package(root: Path, workdir: Path, deb: Path, deps: Path) -> sl.Container:
    """Boot a container and install superd's .deb and `deps` with apt, with no sources."""
    box = sl.Container(root, workdir, [(str(deb.parent), INSIDE_DEB), (str(deps), INSIDE_DEPS)])
    box.boot()
    # fail2ban is here for fail2ban-regex only: its daemon would start a jail (and firewall
    # rules in the network namespace the container shares with the host).
    box.run(["systemctl", "mask", "fail2ban.service"])
    files = sorted(f"{INSIDE_DEPS}/{p.name}" for p in deps.glob("*.deb"))
    r = box.run(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", *APT_OFFLINE, "install",
                 "-y", "-q", "--no-install-recommends", *files, f"{INSIDE_DEB}/{deb.name}"],
                check=False, timeout=600)
    assert r.returncode == 0, f"apt-get install in the container:\n{r.stdout[-3000:]}{r.stderr}"
    box.install_log = r.stdout
    return box
