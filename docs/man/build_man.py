"""Build the man pages from their reStructuredText sources when the package is built.

setuptools runs this (pyproject.toml: [tool.setuptools.cmdclass]) as part of `build_py`, which
every way of building runs: `pip install .`, `pip install -e .`, `python3 -m build` and
Debian's pybuild. The pages are written under build/man/ and added to the distribution's
data files, so an installed wheel has them in PREFIX/share/man/manN/, where man-db finds them
for any PREFIX/bin on PATH (a venv's share/man, /usr/share/man for the Debian package).

docutils' rst2man writer is pure Python (PyPI's docutils, Debian's python3-docutils): no
compiler, and nothing outside what pip and dpkg-buildpackage already run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
# FILE.N.rst -> FILE.N: the section is the last part of the page's name.
PAGE = re.compile(r"^(?P<name>.+)\.(?P<section>[1-8])\.rst$")


def pages() -> list[tuple[Path, str, str]]:
    """(source, page file name, section) of every page under docs/man."""
    out = []
    for src in sorted(HERE.glob("*.rst")):
        m = PAGE.match(src.name)
        if m:
            out.append((src, f"{m['name']}.{m['section']}", m["section"]))
    return out


def build_date() -> str:
    """The date a page shows: $SOURCE_DATE_EPOCH (set by dpkg-buildpackage from
    debian/changelog, so the package builds reproducibly), else today."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    return time.strftime("%Y-%m-%d", time.gmtime(int(epoch) if epoch.isdigit() else None))


def render(src: Path, dest: Path, version: str) -> None:
    """One page through docutils' man page writer; any docutils warning fails the build.

    The sources leave out the date and version, which change with every release: they are
    added here, after `:Manual section:`, as docinfo fields."""
    try:
        from docutils.core import publish_string
        from docutils.writers import manpage
    except ImportError:
        raise SystemExit("superd: building the man pages needs docutils "
                         "(pip: docutils; Debian: python3-docutils)") from None
    text = src.read_text(encoding="utf-8")
    text, n = re.subn(r"^(:Manual section: .*)$",
                      rf"\1\n:Date: {build_date()}\n:Version: superd {version}", text,
                      count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"{src}: no ':Manual section:' line")
    page = publish_string(text, source_path=str(src), writer=manpage.Writer(),
                          settings_overrides={"report_level": 2, "halt_level": 2,
                                              "output_encoding": "utf-8"})
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(tidy(page))


def tidy(page: bytes) -> bytes:
    """Two habits of docutils' writer that `mandoc -T lint` warns about and groff ignores:
    a paragraph break (`.sp`) right after a heading (where the heading has made one), and
    `.ft C` for literal blocks (docutils before 0.20; `CR` is the same constant-width font
    under a name both groff and mandoc know)."""
    out: list[bytes] = []
    for line in page.split(b"\n"):
        if line == b".sp" and out and out[-1].startswith((b".SH ", b".SS ")):
            continue
        out.append(b".ft CR" if line == b".ft C" else line)
    return b"\n".join(out)


def build_all(mandir: Path, version: str) -> list[tuple[str, Path]]:
    """Render every page into MANDIR/manN/; returns (section, page) pairs."""
    out = []
    for src, name, section in pages():
        dest = mandir / f"man{section}" / name
        render(src, dest, version)
        out.append((section, dest))
    return out


class BuildPy(build_py):
    """`build_py`, then the man pages, which the install step copies as data files."""

    def run(self) -> None:
        super().run()
        build_base = Path(self.get_finalized_command("build").build_base)
        data = dict(self.distribution.data_files or [])
        for section, dest in build_all(build_base / "man", self.distribution.get_version()):
            files = data.setdefault(f"share/man/man{section}", [])
            if os.fspath(dest) not in files:
                files.append(os.fspath(dest))
        self.distribution.data_files = sorted(data.items())
        if getattr(self, "editable_mode", False):
            # `pip install -e .`: setuptools' editable_wheel looks for data files with
            # distribution.has_data(), which does not exist, so it never installs them
            # (setuptools 64 to 80 at least). Installing them here puts them into the
            # editable wheel's .data directory all the same; if setuptools runs it later
            # after all, run_command() knows it has already run.
            self.run_command("install_data")


if __name__ == "__main__":
    # python3 docs/man/build_man.py MANDIR [VERSION]: render the pages into MANDIR/manN/
    # (.ci/setup uses it for the checkout's own venv; see the editable note above).
    import sys
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: build_man.py MANDIR [VERSION]")
    version = sys.argv[2] if len(sys.argv) == 3 else "(checkout)"
    for _, page in build_all(Path(sys.argv[1]), version):
        print(page)
