"""Admission and overload for one service: limits that pause, never switch off (SPEC §4).

Two kinds of answer. `admit()` decides about one connection that passed the service's stages:
refuse it (refuse-mode instances, per-source, max_children) and say why. `paused` stops the
listener from being polled at all, so connections wait in the kernel backlog: queue-mode
instances, an empty rate bucket, back-off and running out of fds. Every pause ends by itself:
a freed slot, a timer.

Back-off is for loops no client can cause: a handler that cannot be started (its program is
gone, not executable, its user cannot be switched to), and a `wait` handler that exits without
taking what was waiting on its socket (inetd's "looping" service). How a nowait handler exits
is its own affair: many real ones exit non-zero after every session (sshd -i, rsync on a bad
greeting), each run uses up one client's connection, and there is no loop to break.

A Limits is given what it needs, not its service: a clock, a timer function, how many of its
handlers are active, whether max_children (or max_sessions) leaves room, and whom to tell when
`paused` changes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from superd.config import Service
from superd.loop import Timer

FD_BACKOFF_FIRST, FD_BACKOFF_MAX = 0.1, 5.0


def _always() -> str | None:
    return None


class Limits:
    def __init__(self, config: Service, *, active: Callable[[], int], clock: Callable[[], float],
                 call_later: Callable[[float, Callable[[], None]], Timer],
                 changed: Callable[[], None], warn: Callable[[str], None]):
        self.active, self.clock, self.call_later = active, clock, call_later
        self.changed, self.warn = changed, warn
        self.room: Callable[[], str | None] = _always  # max_children/max_sessions: a refusal
        self.paused: str | None = None
        self.timer: Timer | None = None
        self.per_peer: Counter[str] = Counter()
        self.failures = 0  # starts that failed in a row
        self.backoff = 0.0  # the current back-off step, in seconds (0: none)
        self.fd_backoff = 0.0
        self.tokens: float | None = None  # None: no rate (yet)
        self.refilled = clock()
        self.configure(config, _always)

    def configure(self, config: Service, room: Callable[[], str | None]) -> None:
        self.config = config
        self.room = room
        if config.rate:
            self.capacity = float(config.rate[0])
            self.per_second = config.rate[0] / config.rate[1]
            # a reload keeps what the bucket holds (an empty one too): no fresh burst
            self.tokens = (min(self.tokens, self.capacity) if self.tokens is not None
                           else self.capacity)
        if self.paused == "service_limit" and not self.full():
            self.resume()

    # -- per connection ----------------------------------------------------------------------

    def admit(self, peer: str) -> str | None:
        """None to go ahead (and the slot is taken), else the FAIL reason."""
        cfg = self.config
        if cfg.instances is not None and self.active() >= cfg.instances:
            return "service_limit"
        if cfg.per_source is not None and self.per_peer[peer] >= cfg.per_source:
            return "per_source_limit"
        full = self.room()
        if full is not None:
            return full
        self.per_peer[peer] += 1
        if cfg.rate:
            self.take_token()
        if (cfg.on_limit == "queue" and cfg.instances is not None
                and self.active() + 1 >= cfg.instances):
            self.pause("service_limit")  # the slot granted now is the last one
        return None

    def full(self) -> bool:
        return self.config.instances is not None and self.active() >= self.config.instances

    # -- slots coming back -------------------------------------------------------------------

    def freed(self, peer: str = "") -> None:
        if self.per_peer[peer] > 1:
            self.per_peer[peer] -= 1
        else:
            self.per_peer.pop(peer, None)
        if self.paused == "service_limit" and not self.full():
            self.resume()

    def failed(self) -> None:
        """A handler could not be started, or a wait handler looped: after `backoff.after`
        of those in a row, pause the service, `first` seconds doubling up to `max`."""
        policy = self.config.backoff
        self.failures += 1
        if policy is None or self.failures < policy.after:
            return
        self.backoff = min(policy.most, self.backoff * 2 if self.backoff else policy.first)
        self.warn(f"BACKOFF: {self.config.name} {self.backoff:g}s")
        self.pause("backoff", self.backoff)

    def succeeded(self) -> None:
        """A handler started (and, for wait, took its work): the loop, if any, is over."""
        self.failures = 0
        self.backoff = 0.0

    def backoff_left(self) -> dict[str, float] | None:
        """For `superd status`: the back-off step and the seconds left of it."""
        if self.paused != "backoff" or self.timer is None:
            return None
        return {"seconds": self.backoff, "left": round(max(0.0, self.timer.when - self.clock()), 1)}

    def out_of_fds(self, error: OSError, what: str = "accept") -> None:
        """An fd could not be had for this service: pause it, 0.1 s doubling up to 5 s."""
        self.fd_backoff = min(FD_BACKOFF_MAX, self.fd_backoff * 2 or FD_BACKOFF_FIRST)
        self.warn(f"{self.config.name}: {what}: {error.strerror}; pausing {self.fd_backoff:g}s")
        self.pause("fds", self.fd_backoff)

    def accepted_ok(self) -> None:
        self.fd_backoff = 0.0

    # -- rate --------------------------------------------------------------------------------

    def take_token(self) -> None:
        self.tokens = self._refill() - 1
        if self.tokens < 1:
            self.pause("rate", (1 - self.tokens) / self.per_second)

    def _refill(self) -> float:
        now = self.clock()
        self.tokens = min(self.capacity, (self.tokens or 0.0)
                          + (now - self.refilled) * self.per_second)
        self.refilled = now
        return self.tokens

    # -- pausing -----------------------------------------------------------------------------

    def pause(self, reason: str, seconds: float | None = None) -> None:
        """Stop polling the listener for `reason`; a back-off under way is never cut short
        by another pause (it lasts its step, then the other reason is looked at again)."""
        if self.paused == "backoff" and reason != "backoff" and self.timer is not None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.paused = reason
        if seconds is not None:
            self.timer = self.call_later(seconds, self.resume)
        self.changed()

    def resume(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        reason, self.paused = self.paused, None
        tokens = self._refill() if reason == "backoff" and self.config.rate else 1.0
        if tokens < 1:
            self.pause("rate", (1 - tokens) / self.per_second)  # (not cut by the back-off)
            return
        if reason != "service_limit" and self.config.on_limit == "queue" and self.full():
            self.paused = "service_limit"
        self.changed()
