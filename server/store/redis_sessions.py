"""Sessions kept in Redis by durability mode, so another replica can take them over.

`every-step`: a batch's new states are written (one pipeline per batch) before any of its steps is
acknowledged. `checkpoint`: a session's state is written once N steps are unwritten, whatever is
unwritten is written every `checkpoint_interval` seconds (so also soon after a stream goes idle), and
everything at shutdown; a crash loses at most what was applied since the last write. Every write is fenced by
the session's lease, so a replica that lost a session can never overwrite newer state.
"""

import asyncio
import logging
import time
from collections.abc import Iterable

from server.logsafe import fingerprint
from server.policies import Durability
from server.store.record import RecordRejected, SessionRecord
from server.store.redis_store import Lease, RedisStateStore
from server.store.seam import LiveSession, RecordOf, SessionGone, SessionMoved, StoreUnavailable

log = logging.getLogger(__name__)


class RedisSessionStore:
    """The SessionStore of replicas that share sessions through Redis; holds this replica's leases."""

    wants_commits = True
    local = False

    def __init__(self, redis: RedisStateStore, durability: Durability, model: str, checkpoint_every: int,
                 checkpoint_interval: float, metrics, clock=time.monotonic):
        self.redis = redis
        self.durability = durability
        self._model = model
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self.maintenance_period = min(redis.lease_ttl / 3, checkpoint_interval)
        self._metrics = metrics
        self._clock = clock
        self._leases: dict[str, Lease] = {}
        self._renewed: dict[str, float] = {}
        self._written: dict[str, int] = {}  # session id -> steps_applied of its newest record written
        self._writing: dict[str, int] = {}  # session id -> steps_applied of its checkpoint in flight
        self._last_checkpoint = clock()
        self._reading: dict[str, asyncio.Future] = {}  # session id -> its record being read
        self._taking: dict[str, asyncio.Future] = {}  # session id -> its owner taking it over
        self._background: set[asyncio.Task] = set()

    def restore(self, accept) -> int:
        return 0  # sessions are taken over one by one, on their first request here

    async def load(self, session_id: str, owner: str) -> SessionRecord | None:
        """Concurrent requests share the reads, but each is judged by its own principal: another principal's
        request (who learnt the id) neither takes the session's lease nor decides what the owner's request
        is answered."""
        record = await _shared(self._reading, session_id, lambda: self._stored(session_id))
        if record is None or record.owner != owner:
            return None
        return await _shared(self._taking, session_id, lambda: self._take_over(session_id, owner))

    async def _stored(self, session_id: str) -> SessionRecord | None:
        """The session's record if it is one this engine carries on: of its model, and readable (a corrupt one is
        logged and taken for none: the session cannot be resumed from it)."""
        try:
            record = await self._guard(self.redis.load(session_id))
        except RecordRejected as error:
            log.warning("session %s: refused its stored record: %s", fingerprint(session_id), error)
            return None
        return record if record is not None and record.model == self._model else None

    async def _take_over(self, session_id: str, owner: str) -> SessionRecord | None:
        lease = await self._guard(self.redis.acquire(session_id))
        record = await self._stored(session_id)  # it may have moved on while we waited
        if record is None or record.owner != owner:
            await self.redis.release(lease)
            return None
        self._hold(lease, record.steps_applied)
        log.info("took over session %s at sequence number %d", fingerprint(session_id), record.last_applied_seq)
        return record

    async def refresh(self, session_id: str) -> SessionRecord | None:
        """Re-takes a lease that may have lapsed; a lease of a new holder means another replica may have written."""
        if self._clock() - self._renewed.get(session_id, 0.0) < self.redis.lease_ttl / 2:
            return None
        lease = await self._guard(self.redis.acquire(session_id))
        if self._continued(lease):
            return None
        record = await self._stored(session_id)
        if record is None:  # or unreadable, or of another model (carried onto another version there)
            await self.redis.release(lease)
            raise SessionGone(f"session {session_id} ended on another replica, or moved to another version there")
        self._hold(lease, record.steps_applied)
        return record

    def _continued(self, lease: Lease) -> bool:
        """Holds `lease` in place of the session's old one if no other holder came in between (held all along, or
        lapsed and taken again with the very next fence): then nothing newer than the live state is stored, though
        the stored checkpoint may well be older."""
        old = self._leases.get(lease.session_id)
        if old is None or not (lease.fence == old.fence or lease.made and lease.fence == old.fence + 1):
            return False
        self._leases[lease.session_id] = lease
        self._renewed[lease.session_id] = self._clock()
        return True

    async def _taken_again(self, session_id: str) -> bool:
        """A lapsed lease (after a store outage, a stall) taken again at once, if nobody held the session since."""
        lease = await self._guard(self.redis.take(session_id))
        if lease is None:
            return False
        if self._continued(lease):
            return True
        if lease.made:  # taken just now, for nothing: another replica took the session meanwhile and let it go
            await self.redis.release(lease)
        return False

    async def created(self, record: SessionRecord) -> None:
        """The lease is taken anew: a session carried from another engine of this process is held by this replica
        already, under a fence whose writes still in flight (the other engine's, naming its model) must not land
        over this record."""
        self._hold(await self._guard(self.redis.acquire(record.session_id, anew=True)), written=-1)
        await self._write([record], exact=True)

    def takes(self, session_id: str, steps_applied: int) -> bool:
        return self.durability is Durability.EVERY_STEP or \
            steps_applied - self._checkpointed(session_id) >= self._checkpoint_every

    async def commit(self, records: list[SessionRecord]) -> list[StoreUnavailable | None]:
        if self.durability is Durability.EVERY_STEP:
            return await self._write(records)
        due = [r for r in records if self.takes(r.session_id, r.steps_applied)]
        if due:  # written in the background: checkpoint mode acknowledges without waiting for the store
            self._writing.update((r.session_id, r.steps_applied) for r in due)
            self._in_background(self._write_checkpoints(due))
        return [None] * len(records)

    def _checkpointed(self, session_id: str) -> int:
        """The steps of the session's latest checkpoint, written or in flight: a write in flight counts, or every step
        while the store is slow to answer would start another write of the same session, and a checkpoint mode
        under load would write as often as every-step mode, just when the store has least room for it."""
        return max(self._written.get(session_id, 0), self._writing.get(session_id, 0))

    async def _write_checkpoints(self, records: list[SessionRecord]) -> None:
        """A failed checkpoint no longer counts: the session's next step makes it due again."""
        try:
            await self._write(records)
        finally:
            for record in records:
                if self._writing.get(record.session_id) == record.steps_applied:
                    del self._writing[record.session_id]

    async def release(self, session_id: str, delete: bool) -> None:
        lease = self._forget(session_id)
        if lease is not None:
            try:
                await self.redis.release(lease, delete=delete)
            except StoreUnavailable:
                self._metrics.state_store_errors.inc()  # the lease expires by itself

    async def maintain(self, live: Iterable[LiveSession], record_of: RecordOf) -> list[str]:
        """Renews the leases of sessions in use or with unwritten steps (a checkpoint under a lapsed lease would be
        fenced out), then writes what checkpoints are due."""
        live = list(live)
        in_use = [s.session_id for s in live if s.session_id in self._leases and
                  (s.idle_for <= self.redis.lease_ttl or s.steps_applied != self._written.get(s.session_id))]
        held = await self._guard(self.redis.renew([self._leases[sid] for sid in in_use]))
        now, lost = self._clock(), []
        for session_id, ok in zip(in_use, held):
            if ok:
                self._renewed[session_id] = now
            elif not await self._taken_again(session_id):
                self._forget(session_id)
                lost.append(session_id)
        if now - self._last_checkpoint >= self._checkpoint_interval:
            self._last_checkpoint = now
            lost_ids = set(lost)
            records = (record_of(s.session_id) for s in self._unwritten(live) if s.session_id not in lost_ids)
            await self._write([record for record in records if record is not None])  # None: closed meanwhile
        return lost

    async def hand_over(self, records: list[SessionRecord]) -> None:
        """Last checkpoints, then every lease released so other replicas take over at once."""
        for task in list(self._background):
            task.cancel()
        try:
            await self._write([r for r in records if r.steps_applied != self._written.get(r.session_id)])
            for record in records:
                await self.release(record.session_id, delete=False)
        except StoreUnavailable:
            log.warning("state store unreachable at shutdown; leases will expire by themselves")

    def _unwritten(self, live: list[LiveSession]) -> list[LiveSession]:
        return [s for s in live if s.steps_applied != self._written.get(s.session_id) and s.session_id in self._leases]

    def _hold(self, lease: Lease, written: int) -> None:
        self._leases[lease.session_id] = lease
        self._renewed[lease.session_id] = self._clock()
        self._written[lease.session_id] = written

    def _forget(self, session_id: str) -> Lease | None:
        self._renewed.pop(session_id, None)
        self._written.pop(session_id, None)
        self._writing.pop(session_id, None)
        return self._leases.pop(session_id, None)

    def _in_background(self, write) -> None:
        """Counted in flight from before the step that made it due is acknowledged until the store answers: a
        kill -9 meanwhile may lose the steps it carries (docs/state-store.md)."""
        task = asyncio.ensure_future(write)
        self._background.add(task)
        self._metrics.checkpoint_writes_in_flight.inc()
        task.add_done_callback(self._answered)

    def _answered(self, task: asyncio.Task) -> None:
        self._background.discard(task)
        self._metrics.checkpoint_writes_in_flight.dec()

    async def _write(self, records: list[SessionRecord], exact: bool = False) -> list[StoreUnavailable | None]:
        """Per record: None when stored (or a newer state of ours is), else the error to answer with. `exact`: the
        records themselves must be stored, or the error is raised; a newer state stored is another replica's then
        (a session carried over here from a stale copy)."""
        writes = [(r, self._leases[r.session_id]) for r in records if r.session_id in self._leases]
        try:
            results = await self._guard(self.redis.save(writes))
        except StoreUnavailable as error:
            if exact:
                raise
            return [error] * len(records)
        by_id = {record.session_id: (result, lease) for (record, lease), result in zip(writes, results)}
        errors = []
        for record in records:
            result, lease = by_id.get(record.session_id, (0, None))  # no lease: given up meanwhile, as if fenced out
            if result == 1:
                # writes of one session may be in flight together, and answered in another order than Redis ran
                # them: an older one answered last must not make the session look due again
                self._written[record.session_id] = max(record.steps_applied, self._written.get(record.session_id, -1))
                self._renewed[record.session_id] = self._clock()  # a write extends the lease too
                errors.append(None)
            elif result == -1 and not exact:
                errors.append(None)  # an overlapping write of ours already stored a newer state
            else:
                if lease is not None and self._leases.get(record.session_id) is lease:  # not one taken again since
                    log.warning("session %s is held by another replica; giving it up", fingerprint(record.session_id))
                    self._forget(record.session_id)  # the next request here takes it over again, or waits for it
                errors.append(SessionMoved("the session moved to another replica; retry the request"))
        if exact and (error := next((e for e in errors if e is not None), None)):
            raise error
        return errors

    async def _guard(self, operation):
        try:
            return await operation
        except StoreUnavailable:
            self._metrics.state_store_errors.inc()
            raise


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
