"""End of session (runs last: pytest takes files in name order).

No daemon is still alive, no daemon left zombie children while it ran (checked at each
daemon's teardown, before its SIGTERM), every daemon exited as expected, no handler outlived its
daemon, and none of the ports the tests used is still listening (/proc/net/tcp, tcp6, udp, udp6).
"""

from __future__ import annotations

import superd_testlib as lib


def test_session_left_nothing_behind():
    lib.FINAL_CHECK["done"] = True
    problems = lib.check_session()
    assert not problems, "\n".join(problems)
