"""The one seam between the engine and wherever sessions are kept beyond this process's memory.

The engine holds one `SessionStore` and never asks which: memory only (`MemoryStore`, every operation free),
a snapshot directory (`server.store.snapshot`), or Redis shared by replicas (`server.store.redis_sessions`).
"""

from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from server.store.record import SessionRecord


class StoreUnavailable(Exception):
    """The state store cannot be reached, or another replica holds the session for longer than we wait."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class SessionMoved(StoreUnavailable):
    """This replica's claim on the session was lost: another replica (or a store restart) took it."""


class SessionGone(Exception):
    """A live session whose stored record was deleted elsewhere (closed or expired on another replica)."""


class LiveSession(NamedTuple):
    """What maintain() needs to know of a live session, without copying its state."""

    session_id: str
    idle_for: float  # seconds since its last request; 0 while it has requests queued
    steps_applied: int


RecordOf = Callable[[str], SessionRecord | None]  # a live session's id -> its record now; None once closed


class SessionStore(Protocol):
    """What the engine needs of stored sessions. Errors: StoreUnavailable (and SessionMoved), RecordRejected."""

    maintenance_period: float | None  # seconds between maintain() calls; None: never needed
    # Sessions are kept nowhere else while this process runs: load() and refresh() never find anything, so a
    # session not live here does not exist (the columnar path looks sessions up without awaiting them).
    local: bool

    def restore(self, accept: Callable[[list[SessionRecord]], None]) -> int:
        """At start, before any request: hands the sessions to bring back to `accept` (all or none; it raises to
        refuse them); returns how many were accepted."""

    async def load(self, session_id: str, owner: str) -> SessionRecord | None:
        """A session of `owner` not live here yet, taken over; None when there is none to take."""

    async def refresh(self, session_id: str) -> SessionRecord | None:
        """Before a live session's request: a newer record if another process wrote one, else None;
        SessionGone if the session ended elsewhere."""

    async def created(self, record: SessionRecord) -> None:
        """A session new to this engine (opened, or carried over from another version's engine of this process):
        claimed and written, naming this engine's model, before it is acknowledged or takes a request here."""

    async def commit(self, records: list[SessionRecord]) -> list[StoreUnavailable | None]:
        """A batch's new states, before their requests are answered: per record None (may be acknowledged) or
        the error to answer with. SessionMoved: the session lives elsewhere now."""

    @property
    def wants_commits(self) -> bool:
        """Whether commit() needs records at all (building them is skipped when not)."""

    def takes(self, session_id: str, steps_applied: int) -> bool:
        """Whether commit() takes the session's record once it has applied `steps_applied` steps: only those
        records are built and passed (a record copies the state and the kept answers)."""

    async def release(self, session_id: str, delete: bool) -> None:
        """This process stops holding the session; `delete` ends it everywhere (closed, expired, evicted)."""

    async def maintain(self, live: Iterable[LiveSession], record_of: RecordOf) -> list[str]:
        """Periodic upkeep (claims, background writes); returns the ids of sessions now held elsewhere."""

    async def hand_over(self, records: list[SessionRecord]) -> None:
        """At shutdown, with every live session's record: keep what must outlive this process."""


class MemoryStore:
    """Sessions live and die with the process: every operation is free."""

    maintenance_period = None
    wants_commits = False
    local = True

    def restore(self, accept: Callable[[list[SessionRecord]], None]) -> int:
        return 0

    async def load(self, session_id: str, owner: str) -> SessionRecord | None:
        return None

    async def refresh(self, session_id: str) -> SessionRecord | None:
        return None

    async def created(self, record: SessionRecord) -> None:
        pass

    async def commit(self, records: list[SessionRecord]) -> list[StoreUnavailable | None]:
        return [None] * len(records)

    def takes(self, session_id: str, steps_applied: int) -> bool:
        return False

    async def release(self, session_id: str, delete: bool) -> None:
        pass

    async def maintain(self, live: Iterable[LiveSession], record_of: RecordOf) -> list[str]:
        return []

    async def hand_over(self, records: list[SessionRecord]) -> None:
        pass
