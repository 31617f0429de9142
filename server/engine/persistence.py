"""Keeps sessions in a shared state store by durability mode, so another replica can take them over.

`every-step`: a batch's new states are written (one pipeline per batch) before any of its steps is
acknowledged. `checkpoint`: a session's state is written once N steps are unwritten, whatever is
unwritten is written every `checkpoint_interval` seconds (so also soon after a stream goes idle), and
everything at shutdown; a crash loses at most what was applied since the last write. Every write is fenced by
the session's lease, so a replica that lost a session can never overwrite newer state.
"""

import enum
import logging
import time

import numpy as np

from server.engine.sessions import KeptAnswer, Session
from server.store import Lease, SessionMoved, SessionRecord, StoreUnavailable

log = logging.getLogger(__name__)


class Durability(enum.StrEnum):
    NONE = "none"
    CHECKPOINT = "checkpoint"
    EVERY_STEP = "every-step"


class Persistence:
    def __init__(self, store, durability: Durability, model_id: str, checkpoint_every: int,
                 checkpoint_interval: float, metrics, clock=time.monotonic):
        self.store = store
        self.durability = durability
        self._model_id = model_id
        self._checkpoint_every = checkpoint_every
        self.checkpoint_interval = checkpoint_interval
        self._metrics = metrics
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._renewed: dict[str, float] = {}
        self._written: dict[str, int] = {}  # session id -> steps_applied of its last record written

    def record(self, session: Session, h: np.ndarray, c: np.ndarray, kept: KeptAnswer | None = None, steps=None):
        """The record of `session` with state (h, c) after request `kept.seq` (its last applied one if None)."""
        return SessionRecord(session.id, session.owner, self._model_id,
                             session.last_applied_seq if kept is None else kept.seq,
                             session.steps_applied if steps is None else steps, h, c,
                             None if kept is None else kept.answer, None if kept is None else kept.digest)

    async def adopt_new(self, session: Session, h: np.ndarray, c: np.ndarray) -> None:
        """Takes the lease of a new session and writes its initial state."""
        self._leases[session.id] = await self._guard(self.store.acquire(session.id))
        self._renewed[session.id] = self._clock()
        await self._write([self.record(session, h, c)], [session])

    async def peek(self, session_id: str) -> SessionRecord | None:
        """The stored record of a session of this model, without taking it; None if there is none."""
        record = await self._guard(self.store.load(session_id))
        return record if record is not None and record.model == self._model_id else None

    async def take_over(self, session_id: str, owner: str) -> SessionRecord | None:
        """The stored record of `owner`'s session under a fresh lease; None if there is none (any more)."""
        lease = await self._guard(self.store.acquire(session_id))
        record = await self._guard(self.store.load(session_id))  # it may have moved on while we waited
        if record is None or record.owner != owner:
            await self.store.release(lease)
            return None
        self._leases[session_id] = lease
        self._renewed[session_id] = self._clock()
        return record

    async def revalidate(self, session: Session) -> SessionRecord | None:
        """Re-takes a lease that may have lapsed; returns the stored record if another replica wrote meanwhile."""
        if self._clock() - self._renewed.get(session.id, 0.0) < self.store.lease_ttl / 2:
            return None
        old = self._leases.get(session.id)
        lease = await self._guard(self.store.acquire(session.id))
        self._leases[session.id] = lease
        self._renewed[session.id] = self._clock()
        if old is not None and old.fence == lease.fence:
            return None
        return await self._guard(self.store.load(session.id))

    async def after_batch(self, sessions: list[Session], records: list[SessionRecord]) -> list[Exception | None]:
        """Per session, None if its new state may be acknowledged, else the error to answer with."""
        if self.durability is Durability.EVERY_STEP:
            return await self._write(records, sessions, raise_errors=False)
        return [None] * len(sessions)

    def due_for_checkpoint(self, sessions: list[Session], records: list[SessionRecord]) -> list[Session]:
        """Sessions whose new records leave at least `checkpoint_every` steps unwritten."""
        return [s for s, r in zip(sessions, records)
                if r.steps_applied - self._written.get(s.id, 0) >= self._checkpoint_every]

    def unwritten(self, sessions) -> list[Session]:
        return [s for s in sessions if s.steps_applied > self._written.get(s.id, 0) or s.id not in self._written]

    async def checkpoint(self, sessions: list[Session], records: list[SessionRecord]) -> None:
        await self._write(records, sessions, raise_errors=False)

    async def renew(self, sessions: list[Session]) -> list[Session]:
        """Extends the leases of sessions in use; returns those whose lease was lost to another replica."""
        leases = [self._leases[s.id] for s in sessions if s.id in self._leases]
        held = await self._guard(self.store.renew(leases))
        now = self._clock()
        lost = []
        for session, ok in zip(sessions, held):
            if ok:
                self._renewed[session.id] = now
            else:
                lost.append(session)
        return lost

    async def forget(self, session: Session, delete: bool) -> None:
        """Gives up a session's lease; `delete` also removes its stored state (a closed session)."""
        lease = self._leases.pop(session.id, None)
        self._renewed.pop(session.id, None)
        self._written.pop(session.id, None)
        if lease is not None:
            try:
                await self.store.release(lease, delete=delete)
            except StoreUnavailable:
                self._metrics.state_store_errors.inc()  # the lease expires by itself

    async def _write(self, records, sessions, raise_errors: bool = True) -> list[Exception | None]:
        writes = [(r, self._leases[s.id]) for r, s in zip(records, sessions)]
        try:
            results = await self._guard(self.store.save(writes))
        except StoreUnavailable as error:
            if raise_errors:
                raise
            return [error] * len(records)
        errors = []
        for session, record, result in zip(sessions, records, results):
            if result == 1:
                self._written[session.id] = record.steps_applied
                self._renewed[session.id] = self._clock()  # a write extends the lease too
                errors.append(None)
            elif result == -1:
                errors.append(None)  # an overlapping write of ours already stored a newer state
            else:
                log.warning("session %s… is held by another replica; giving it up", session.id[:6])
                errors.append(SessionMoved("the session moved to another replica; retry the request"))
        return errors

    async def _guard(self, operation):
        try:
            return await operation
        except StoreUnavailable:
            self._metrics.state_store_errors.inc()
            raise
