"""Checks shared by the parsers of the table (fields.py, sockopts.py): a raw YAML value in, the
value out, or ValueError with a sentence a user can act on."""

from __future__ import annotations

import grp
import pwd
from typing import Any


class Missing(ValueError):
    """What the table names is not on the machine (yet): a user, a group, a program, a
    directory, a handler's module. Unlike a mistake in the table, it can go away by itself
    (a package installed, a user created), so superd tries such a service again."""


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


def integer(value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a whole number, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{value} is out of range ({low} to {high})")
    return value


def user_entry(value: Any) -> pwd.struct_passwd:
    """A user by name or number (looked up at load, so a typo shows in `superd check`). A
    YAML boolean is neither: `user: true` must not run as uid 1, `group: false` as root."""
    if isinstance(value, bool):
        raise ValueError(f"no such user {value!r} (a name or a number, not true or false)")
    try:
        return pwd.getpwuid(value) if isinstance(value, int) else pwd.getpwnam(str(value))
    except (KeyError, OverflowError):
        raise Missing(f"no such user {value!r}") from None


def group_entry(value: Any) -> grp.struct_group:
    if isinstance(value, bool):
        raise ValueError(f"no such group {value!r} (a name or a number, not true or false)")
    try:
        return grp.getgrgid(value) if isinstance(value, int) else grp.getgrnam(str(value))
    except (KeyError, OverflowError):
        raise Missing(f"no such group {value!r}") from None
