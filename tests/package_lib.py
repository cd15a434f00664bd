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
APT_OFFLINE = sl.APT_OFFLINE


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


def boot_with_package(root: Path, workdir: Path, deb: Path, deps: Path) -> sl.Container:
    """Boot a container and install superd's .deb and `deps` with apt, with no sources."""
    box = sl.Container(root, workdir, [(str(deb.parent), INSIDE_DEB),
                                       (str(deps), sl.DEBS_INSIDE)])
    box.boot()
    # fail2ban is here for fail2ban-regex only: its daemon would start a jail (and firewall
    # rules in the network namespace the container shares with the host).
    box.run(["systemctl", "mask", "fail2ban.service"])
    files = sorted(f"{sl.DEBS_INSIDE}/{p.name}" for p in deps.glob("*.deb"))
    box.install_log = sl.install_debs(box, [*files, f"{INSIDE_DEB}/{deb.name}"])
    return box
