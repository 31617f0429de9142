"""The sessions live in this process: their table, their states in the pool, and the store that keeps them
beyond it (taking a session over on its first request here, refreshing it, handing it over at the end)."""

import asyncio
import time
from collections.abc import Callable

import torch

from server.engine.admission import Admission
from server.engine.errors import EngineError, InvalidInput, SessionNotFound, StateUnavailable
from server.engine.scheduler import Scheduler
from server.engine.sessions import Session, SessionTable, check_session_id, record_of
from server.engine.state_pool import StatePool
from server.engine.validation import check_tensor
from server.store import LiveSession, SessionGone, SessionRecord, SessionStore, StoreUnavailable


class LiveSessions:
    def __init__(self, pool: StatePool, store: SessionStore, scheduler: Scheduler, admission: Admission,
                 model: str, clock=time.monotonic):
        self.table = SessionTable(clock)
        self.pool = pool
        self._store = store
        self._scheduler = scheduler
        self._admission = admission
        self._model = model
        self._clock = clock
        self._close_listeners: list[Callable[[str, str], None]] = []

    def __len__(self) -> int:
        return len(self.table)

    @property
    def commits(self) -> bool:
        """Whether new states go to the store before they are acknowledged (the batch loop's commit)."""
        return self._store.wants_commits

    async def find(self, session_id: str, owner: str, accepting: Callable[[], None]) -> Session:
        """`owner`'s session, from the store if it is kept there but not live here yet (`accepting()` raises
        when no session may be taken over now). Another owner's session is reported exactly like one that does
        not exist."""
        session = self.table.find(session_id)
        if session is not None and session.owner == owner and (session.busy or self._store.local):
            return session  # the store has nothing newer to offer: the common case, kept free of its calls
        with store_errors():
            if session is None:
                record = await self._store.load(session_id, owner)
                # concurrent requests of the owner share one takeover: the first to get here adopts the record
                session = self.table.find(session_id) or (record and await self._adopt(record, accepting))
            elif session.owner == owner and not session.busy:
                try:
                    record, gone = await self._store.refresh(session_id), False
                except SessionGone:
                    record, gone = None, True
                if self.table.find(session_id) is not session:
                    session = None  # closed while the store answered: its slot may be another session's now
                elif gone:
                    self.close(session, SessionNotFound(f"session {session_id} was closed elsewhere", session_id))
                    session = None
                elif record is not None and not session.busy:
                    # busy: a request that refreshed alongside this one loaded the record and queued work on it,
                    # whose numbering and state loading it again would take back
                    self._load(session, record)
        if session is None or session.owner != owner:
            raise _not_found(session_id)
        return session

    async def find_many(self, session_ids: list[str], owner: str, accepting: Callable[[], None],
                        skip: dict) -> list:
        """`find` of each id, its refusal (an EngineError) in place of a session that cannot be had. With a local
        store: one pass over the table, awaiting nothing. Else one `find` each, but for the indices in `skip`."""
        if not self._store.local:
            found = [None if i in skip else await _found_or_error(self.find(session_id, owner, accepting))
                     for i, session_id in enumerate(session_ids)]
            # a session found early may have been closed (its slot freed) while a later one was awaited
            return [_not_found(session_ids[i]) if type(s) is Session and self.table.find(s.id) is not s else s
                    for i, s in enumerate(found)]
        found = self.table.find_many(session_ids)
        for i, session in enumerate(found):
            if session is None or (type(session) is Session and session.owner != owner):
                found[i] = _not_found(session_ids[i])
        return found

    async def open(self, owner: str, h: torch.Tensor, c: torch.Tensor) -> Session:
        """A new session, handed to the store before it is acknowledged."""
        session = self.table.add(self.pool.allocate(h, c), owner)
        await self._created(session)
        return session

    async def take(self, record: SessionRecord) -> None:
        """Makes a session of another engine of this process live here, stored under this engine's model before
        it takes a request here: a replica that takes it over after a crash takes it onto this engine's model."""
        self._import([record])
        await self._created(self.table.find(record.session_id))

    async def _created(self, session: Session) -> None:
        """Hands a session new here to the store; it is not live here when the store cannot take it."""
        try:
            with store_errors():
                await self._store.created(self.record(session))
        except Exception:
            self.table.remove(session)
            self._scheduler.release(session.slot)  # its state's and the kept answers a taken session brought
            raise

    def close(self, session: Session, error: Exception) -> None:
        """Ends a session here; its queued requests fail with `error`."""
        self._scheduler.fail_pending(session, error)
        self.table.remove(session)
        if session.in_flight:
            session.closed = True
        else:
            self._scheduler.release(session.slot)
        for listener in self._close_listeners:
            listener(session.id, session.owner)

    async def end(self, session: Session, error: Exception) -> None:
        """Ends a session everywhere (closed, expired, evicted)."""
        self.close(session, error)
        await self._store.release(session.id, delete=True)

    async def let_go(self, session: Session, error: Exception) -> None:
        """Ends a session here only: another engine of this process took it, and its claim in the store."""
        self.close(session, error)
        await self._store.release(session.id, delete=False)

    async def end_all(self, error: Exception) -> list[str]:
        """Ends every session everywhere; all are gone here before the first is released from the store."""
        ended = list(self.table)
        for session in ended:
            self.close(session, error)
        for session in ended:
            await self._store.release(session.id, delete=True)
        return [session.id for session in ended]

    def on_closed(self, listener: Callable[[str, str], None]) -> None:
        self._close_listeners.append(listener)

    def record(self, session: Session) -> SessionRecord:
        h, c = self.pool.read(session.slot)
        return record_of(session, self._model, h.cpu().numpy(), c.cpu().numpy(),
                         self._scheduler.kept.answers_of(session))

    def restore(self) -> None:
        self._store.restore(self._import)

    async def hand_over(self) -> None:
        await self._store.hand_over([self.record(s) for s in self.table])

    async def maintain_forever(self) -> None:
        """Lets the store renew its claims and write checkpoints; drops sessions another replica took."""
        if not self._store.maintenance_period:
            return
        while True:
            await asyncio.sleep(self._store.maintenance_period)
            now = self._clock()
            live = [LiveSession(s.id, 0.0 if s.busy else now - s.last_used, s.steps_applied) for s in self.table]
            try:
                lost = await self._store.maintain(live, self._record_if_live)
            except StoreUnavailable:
                continue  # counted by the store, which reconnects by itself
            for session_id in lost:
                if session := self.table.find(session_id):
                    self.close(session, SessionNotFound(f"session {session_id} moved to another replica",
                                                        session_id))

    def _record_if_live(self, session_id: str) -> SessionRecord | None:
        """The store asks after awaiting itself: the session may have been closed meanwhile."""
        session = self.table.find(session_id)
        return None if session is None else self.record(session)

    async def _adopt(self, record: SessionRecord, accepting: Callable[[], None]) -> Session:
        """Makes a session taken over live here; one refused here (no room, draining) is given up in the store at
        once, or other replicas would wait for its claim to lapse."""
        try:
            accepting()
            self._import([record])
        except Exception:
            await self._store.release(record.session_id, delete=False)
            raise
        return self.table.find(record.session_id)

    def _import(self, records: list[SessionRecord]) -> None:
        """Makes stored sessions live, all or none: every record is checked before the first one is added."""
        self._admission.room_for(len(records), len(self.table))
        for r in records:
            check_session_id(r.session_id)
            check_tensor("h", r.h, self.pool.slot_shape, allow_nonfinite=True)
            check_tensor("c", r.c, self.pool.slot_shape, allow_nonfinite=True)
            if self.table.find(r.session_id):
                raise InvalidInput(f"session {r.session_id} is already live")
        for r in records:
            slot = self.pool.allocate(torch.from_numpy(r.h), torch.from_numpy(r.c))
            self._load(self.table.add(slot, r.owner, r.session_id, r.created_at), r)

    def _load(self, session: Session, record: SessionRecord) -> None:
        """Replaces a live session's state and numbering with those of a stored record."""
        self.pool.write(session.slot, torch.from_numpy(record.h), torch.from_numpy(record.c))
        session.last_applied_seq = session.last_assigned_seq = record.last_applied_seq
        session.steps_applied = record.steps_applied
        self._scheduler.kept.load(session, record.last_applied_seq, record.answers)


def _not_found(session_id: str) -> SessionNotFound:
    """Another owner's session is reported exactly like one that does not exist."""
    return SessionNotFound(f"session {session_id} does not exist (closed, expired or never created)", session_id)


async def _found_or_error(finding):
    try:
        return await finding
    except EngineError as refusal:
        return refusal


class _StoreErrors:
    """`with`: the store's own errors, as the engine's. A class, not a generator context manager: it is
    entered on every step, where a generator's setup showed in py-spy's profile (issue 12)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, StoreUnavailable):
            raise StateUnavailable(str(error), error.retry_after) from error


_STORE_ERRORS = _StoreErrors()


def store_errors() -> _StoreErrors:
    """The store's own errors, as the engine's."""
    return _STORE_ERRORS
