"""Sessions kept in a shared state store: taking them over, writing them, renewing their leases.

A part of Engine kept in its own module; it uses the engine's session table, state pool and scheduler.
"""

import asyncio
import logging

import torch

from server.engine.errors import SessionNotFound
from server.engine.persistence import Durability
from server.engine.sessions import KeptAnswer, Session
from server.logsafe import fingerprint
from server.store import SessionMoved, StoreUnavailable

log = logging.getLogger(__name__)


class StoreBackedSessions:
    """Engine's methods for sessions in a shared state store, used only when `self._persistence` is set."""

    async def _attach(self, session_id: str, owner: str) -> Session | None:
        """Takes over `owner`'s session from the store. Concurrent requests share the reads, but each is judged
        by its own principal: another principal's request (who learnt the id) neither takes the session's
        lease nor decides what the owner's request is answered."""
        record = await _shared(self._peeking, session_id, lambda: self._persistence.peek(session_id))
        if record is None or record.owner != owner:
            return None
        return await _shared(self._attaching, session_id, lambda: self._take_over(session_id, owner))

    async def _take_over(self, session_id: str, owner: str) -> Session | None:
        record = await self._persistence.take_over(session_id, owner)
        if record is None:
            return None
        self._check_accepting()
        session = self._sessions.find(session_id) or self._sessions.add(
            self._pool.allocate(*self._initial_state(None, None)), owner, session_id)
        self._load(session, record)
        log.info("took over session %s at sequence number %d", fingerprint(session_id), record.seq)
        return session

    def _load(self, session: Session, record) -> None:
        self._pool.write(session.slot, torch.from_numpy(record.h), torch.from_numpy(record.c))
        session.last_applied_seq = session.last_assigned_seq = record.seq
        session.steps_applied = record.steps_applied
        session.answers = None
        session.remember(KeptAnswer(record.seq, record.answer, record.answer_digest), self.limits.answers_kept)

    async def _persist(self, sessions, works, h_n, c_n, answers) -> list:
        h, c = h_n.cpu().numpy(), c_n.cpu().numpy()
        records = [self._persistence.record(session, h[:, i], c[:, i],
                                            KeptAnswer(work.seq, None if answers is None else answers[i], work.digest),
                                            steps=session.steps_applied + work.steps)
                   for i, (session, work) in enumerate(zip(sessions, works))]
        errors = await self._persistence.after_batch(sessions, records)
        for session, error in zip(sessions, errors):
            if isinstance(error, SessionMoved):  # our copy is stale: the next request fetches the stored one
                self._close(session, error)
                await self._persistence.forget(session, delete=False)
        if self._persistence.durability is Durability.CHECKPOINT:
            due = self._persistence.due_for_checkpoint(sessions, records)
            if due:  # written in the background: checkpoint mode acknowledges without waiting for the store
                self._tasks.append(asyncio.ensure_future(self._checkpoint_later(due, records)))
        return errors

    async def _checkpoint_later(self, sessions: list[Session], records) -> None:
        try:
            by_id = {r.session_id: r for r in records}
            await self._persistence.checkpoint(sessions, [by_id[s.id] for s in sessions])
        except StoreUnavailable:
            pass  # retried by the maintenance loop
        finally:
            self._tasks.remove(asyncio.current_task())

    async def _checkpoint(self, sessions: list[Session]) -> None:
        records = [self._persistence.record(s, *(t.numpy() for t in self._pool.read(s.slot)),
                                            s.kept_answer(s.last_applied_seq)) for s in sessions]
        await self._persistence.checkpoint(sessions, records)

    async def _maintain_store_forever(self) -> None:
        """Renews the leases of sessions in use and writes checkpoints; drops sessions another replica took."""
        persistence = self._persistence
        period = min(persistence.store.lease_ttl / 3, persistence.checkpoint_interval)
        last_checkpoint = self._clock()
        while True:
            await asyncio.sleep(period)
            try:
                for session in await persistence.renew(self._sessions.recently_used(
                        self._clock() - persistence.store.lease_ttl)):
                    self._close(session, SessionNotFound(f"session {session.id} moved to another replica"))
                    await persistence.forget(session, delete=False)
                if self._clock() - last_checkpoint >= persistence.checkpoint_interval:
                    last_checkpoint = self._clock()
                    await self._checkpoint(persistence.unwritten(self._sessions))
            except StoreUnavailable:
                continue  # counted by Persistence; the store reconnects by itself

    async def _hand_over_all(self) -> None:
        """At shutdown: last checkpoints, then every lease released so other replicas take over at once."""
        sessions = list(self._sessions)
        try:
            await self._checkpoint(self._persistence.unwritten(sessions))
            for session in sessions:
                await self._persistence.forget(session, delete=False)
        except StoreUnavailable:
            log.warning("state store unreachable at shutdown; leases will expire by themselves")


async def _shared(in_flight: dict, key: str, start):
    """`await start()`, or the result of the same call already in flight for `key`."""
    future = in_flight.get(key)
    if future is None:
        future = in_flight[key] = asyncio.ensure_future(start())
    try:
        return await asyncio.shield(future)
    finally:
        if in_flight.get(key) is future:
            del in_flight[key]
