"""The pre-start stages a connection may pass before admission, and which a service has.

A stage is a small class with the `pipeline.Stage` shape: `check` answers at once or WAITs,
`expired` says what a passed deadline means, `cancel` undoes what a waiting check set up.
`build()` makes a service's list once, from its table entry, in the order they run: a new
stage is one class here and one line in `build()`.
"""

from __future__ import annotations

from superd.access import Network, allowed
from superd.config import Service
from superd.pipeline import Connection, Done, Stage, Waiting


class Access:
    """only_from / no_access: the most specific matching rule decides (refused: `address`)."""

    name = "access"
    deadline = 0.0  # never waits

    def __init__(self, only_from: tuple[Network, ...], no_access: tuple[Network, ...]):
        self.only_from, self.no_access = only_from, no_access

    def check(self, conn: Connection, done: Done) -> str | None | Waiting:
        return None if allowed(conn.peer, self.only_from, self.no_access) else "address"

    def expired(self, conn: Connection) -> str | None:
        return None

    def cancel(self, conn: Connection) -> None:
        pass


def build(config: Service) -> tuple[Stage, ...]:
    """The stages of `config`'s connections, in the order they run."""
    stages: list[Stage] = []
    if config.only_from or config.no_access:
        stages.append(Access(config.only_from, config.no_access))
    return tuple(stages)
