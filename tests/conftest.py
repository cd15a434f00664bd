"""Fixtures for the superd black-box suite.

- ``rsyslog`` (session): a private rsyslogd listening on its own unix socket.
- ``superd`` (function): a factory; ``superd(services)`` writes a table into tmp_path, starts
  ``python -m superd run -c TABLE`` with NOTIFY_SOCKET and waits for READY=1. Every daemon it
  made is checked for zombie children, stopped with SIGTERM (must exit 0) at teardown.
- ``new_daemon`` (function): same, but returns an unstarted Superd (for bad tables etc.).
- the session ends with a check that no daemon is alive and no test port is still listening.

The in-process tests (tests/unit/, tests/test_structure.py) run first: they take seconds and
name a broken rule before any daemon starts; tests/test_zz_session.py stays last.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import superd_testlib as lib  # noqa: E402


def pytest_collection_modifyitems(items):
    """In-process tests first (stable sort: otherwise in the usual name order)."""
    def daemonless(item) -> bool:
        path = str(item.path)
        return f"{os.sep}unit{os.sep}" in path or path.endswith("test_structure.py")
    items.sort(key=lambda item: not daemonless(item))


@pytest.fixture(scope="session")
def rsyslog(tmp_path_factory):
    r = lib.Rsyslog(tmp_path_factory.mktemp("rsyslog"))
    r.start()
    yield r
    r.stop()


def _short_dir(tmp_path, n: int):
    return tmp_path / f"d{n}"


@pytest.fixture
def new_daemon(request, tmp_path, rsyslog):
    made: list[lib.Superd] = []

    def make() -> lib.Superd:
        d = lib.Superd(_short_dir(tmp_path, len(made)), rsyslog, request.node.nodeid)
        made.append(d)
        return d

    yield make
    for d in made:
        d.finish()


@pytest.fixture
def superd(new_daemon):
    """superd(services, **kw) -> a running Superd (READY=1 received)."""

    def start(services=None, **kw) -> lib.Superd:
        return new_daemon().start(services, **kw)

    return start


@pytest.fixture(scope="module")
def module_daemon(request, tmp_path_factory, rsyslog):
    """For modules that share one daemon: module_daemon(services) -> running Superd."""
    made: list[lib.Superd] = []

    def start(services=None, **kw) -> lib.Superd:
        d = lib.Superd(tmp_path_factory.mktemp("mod"), rsyslog, request.node.nodeid)
        made.append(d)
        return d.start(services, **kw)

    yield start
    for d in made:
        d.finish()


@pytest.fixture(scope="session", autouse=True)
def _session_leftovers():
    """If tests/test_zz_session.py did not run, still check the session at its end."""
    yield
    if not lib.FINAL_CHECK["done"] and lib.ALL_DAEMONS:
        problems = lib.check_session()
        assert not problems, "end of session:\n" + "\n".join(problems)
