"""Who gets in: each owner's request rate, each owner's session quota, the server's session capacity (by count and
by state bytes) and what a full server does (refuse, or evict). It only decides; the engine acts on the answer."""

import time
from collections.abc import Callable
from typing import NamedTuple

from server.engine.errors import LimitExceeded
from server.engine.limits import EngineLimits
from server.engine.rate_limit import RateLimiter
from server.engine.sessions import Session, SessionTable
from server.policies import FullPolicy


class Eviction(NamedTuple):
    """A session to close so that a new one fits; `limit` names the setting that needed the room."""

    session: Session
    limit: str


class SharedQuotas:
    """What the engines of one server (one per model version) count together: each principal's request rate and
    sessions, and the server's sessions, whichever model they are on."""

    def __init__(self, limits: EngineLimits, clock=time.monotonic):
        self.rate = RateLimiter(limits.rate_limit, limits.rate_limit_burst, clock)
        self._tables: list[SessionTable] = []

    def count_in(self, table: SessionTable) -> Callable[[], None]:
        """Counts an engine's sessions from now on; returns what stops counting them (when the engine stops)."""
        self._tables.append(table)

        def stop_counting() -> None:
            if table in self._tables:  # an engine may be stopped twice (a failed start, then shutdown)
                self._tables.remove(table)
        return stop_counting

    def owned(self, owner: str, sessions: SessionTable) -> int:
        """Live sessions of `owner`: in `sessions` and in every other engine's table."""
        return sessions.count(owner) + sum(table.count(owner) for table in self._tables if table is not sessions)

    def total(self, sessions: SessionTable) -> int:
        """Live sessions: in `sessions` and in every other engine's table."""
        return len(sessions) + sum(len(table) for table in self._tables if table is not sessions)


class Admission:
    """Decisions on requests and new sessions, each an answer or LimitExceeded naming the setting. `capacity`:
    the most live sessions, which the state pool never grows past."""

    def __init__(self, limits: EngineLimits, state_bytes: int, clock=time.monotonic,
                 shared: SharedQuotas | None = None):
        self._limits = limits
        self.shared = shared or SharedQuotas(limits, clock)  # its own when the engine is alone
        by_bytes = limits.max_state_bytes // state_bytes
        self.capacity = min(limits.max_sessions, by_bytes)
        self._capacity_limit = "max_sessions" if limits.max_sessions <= by_bytes else "max_state_bytes"
        if self.capacity < 1:
            raise LimitExceeded(f"max_state_bytes={limits.max_state_bytes} cannot hold one session's state "
                                f"({state_bytes} bytes)", "max_state_bytes")

    def admit_request(self, owner: str) -> None:
        """Takes one request of `owner` from its rate limit, or raises LimitExceeded."""
        self.shared.rate.admit(owner)

    def room_for_session(self, owner: str, sessions: SessionTable) -> list[Eviction]:
        """What to evict so that one more session of `owner` fits beside `sessions` (often nothing), or
        LimitExceeded when it cannot fit: under the refuse policy, or with nobody idle to evict."""
        evictions = []
        owned = self.shared.owned(owner, sessions)  # on every model
        if owned >= self._limits.max_sessions_per_owner:
            evictions.append(self._evict_or_refuse(sessions, owner, LimitExceeded(
                f"this client already has {owned} sessions (max_sessions_per_owner="
                f"{self._limits.max_sessions_per_owner}); close one first", "max_sessions_per_owner")))
        # a session evicted for the owner's quota also frees its place in the server
        if full := self._full(sessions, freed=len(evictions)):
            limit, most = full
            evictions.append(self._evict_or_refuse(sessions, None, LimitExceeded(
                f"the server holds its most sessions, {most} ({limit}={getattr(self._limits, limit)}); "
                "close unused sessions or retry later", limit)))
        return evictions

    def _full(self, sessions: SessionTable, freed: int) -> tuple[str, int] | None:
        """(the setting, its number of sessions) when one more session does not fit: this engine's pool, or
        max_sessions counted on every model."""
        if len(sessions) - freed >= self.capacity:
            return self._capacity_limit, self.capacity
        if self.shared.total(sessions) - freed >= self._limits.max_sessions:
            return "max_sessions", self._limits.max_sessions
        return None

    def room_for(self, count: int, live: int) -> None:
        """Raises LimitExceeded unless `count` more sessions (restored ones, all or none) fit beside `live`."""
        if count > self.capacity - live:
            raise LimitExceeded(f"{count} sessions do not fit: {self._capacity_limit} allows {self.capacity}",
                                self._capacity_limit)

    def _evict_or_refuse(self, sessions: SessionTable, owner: str | None, refusal: LimitExceeded) -> Eviction:
        """The least recently used idle session (of `owner`, when given) under the evict policy; else `refusal`."""
        evicting = self._limits.full_policy == FullPolicy.EVICT
        victim = sessions.least_recently_used_idle(owner) if evicting else None
        if victim is None:
            raise refusal
        return Eviction(victim, refusal.limit)
