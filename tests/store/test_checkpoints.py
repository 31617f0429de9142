"""Checkpoint mode against a real redis-server whose writes the test holds back: a checkpoint in flight counts, so a
slow store gets one write per --checkpoint-every steps, not one per step; a failed one is due again at once."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.policies import Durability
from server.store import LiveSession, RedisStateStore, SessionRecord, StoreUnavailable
from server.store.redis_sessions import RedisSessionStore

pytestmark = pytest.mark.integration

SID = "AAAAAAAAAAAAAAAAAAAAAA"
EVERY = 5


class HeldWrites(RedisStateStore):
    """The real store, with each write waiting until the test lets it go (or fails it); one write, named by the
    steps of its first record, can also be held before it reaches Redis or after, with its answer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[int] = []  # steps_applied of each record written, in the order the writes began
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing = False
        self.held_before: dict[int, asyncio.Event] = {}
        self.held_after: dict[int, asyncio.Event] = {}

    async def save(self, writes):
        steps = writes[0][0].steps_applied
        self.writes.extend(record.steps_applied for record, _ in writes)
        await self.gate.wait()
        if self.failing:
            raise StoreUnavailable("the test's store is down")
        if steps in self.held_before:
            await self.held_before[steps].wait()
        answers = await super().save(writes)
        if steps in self.held_after:
            await self.held_after[steps].wait()
        return answers


@pytest.fixture
async def checkpointing(redis_url):
    redis = HeldWrites(redis_url, "replica-a", lease_ttl=5.0, state_ttl=60, lease_wait=0.1)
    await redis._redis.flushdb()
    registry = CollectorRegistry()
    store = RedisSessionStore(redis, Durability.CHECKPOINT, "m@1", EVERY, 3600.0, Metrics(registry))
    await store.created(record(0))
    redis.writes.clear()
    yield store, redis, registry
    redis.gate.set()
    await redis.close()


def record(steps: int) -> SessionRecord:
    state = np.full((1, 3), steps, np.float32)
    return SessionRecord(SID, "alice", "m@1", 1700000000.5, steps, steps, state, state)


async def settled() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


async def answered(registry: CollectorRegistry, but: int = 0) -> None:
    """Until the store has answered every background write but `but` (they run on after commit() returns)."""
    async with asyncio.timeout(10):
        while registry.get_sample_value("lstmserve_checkpoint_writes_in_flight") > but:
            await asyncio.sleep(0.01)


async def test_a_checkpoint_in_flight_counts_so_a_slow_store_is_not_written_every_step(checkpointing):
    store, redis, registry = checkpointing
    redis.gate.clear()  # the store is slow: the write at step 5 is not answered yet
    for steps in range(1, 10):
        assert await store.commit([record(steps)]) == [None]  # acknowledged without waiting
        await settled()
    assert redis.writes == [EVERY]
    redis.gate.set()
    for steps in range(10, 12):
        await store.commit([record(steps)])
        await settled()
    assert redis.writes == [EVERY, 2 * EVERY]
    await answered(registry)
    assert (await redis.load(SID)).steps_applied == 2 * EVERY


async def test_a_failed_checkpoint_is_due_again_at_the_next_step(checkpointing):
    store, redis, registry = checkpointing
    redis.failing = True
    for steps in range(1, 7):
        await store.commit([record(steps)])
        await settled()
    assert redis.writes == [EVERY, EVERY + 1]  # step 5's write failed, so step 6 is still 5 past the last one
    redis.failing = False
    await store.commit([record(7)])
    await settled()
    assert redis.writes == [EVERY, EVERY + 1, EVERY + 2]
    await answered(registry)
    assert (await redis.load(SID)).steps_applied == EVERY + 2


async def commit_steps(store: RedisSessionStore, steps: range) -> None:
    for step in steps:
        await store.commit([record(step)])
        await settled()


async def test_an_older_checkpoint_answered_last_does_not_make_the_session_due_again(checkpointing):
    store, redis, registry = checkpointing
    redis.held_after[EVERY] = asyncio.Event()  # step 5's write is stored, its answer comes after step 10's
    await commit_steps(store, range(1, 2 * EVERY + 1))
    assert redis.writes == [EVERY, 2 * EVERY]
    await answered(registry, but=1)  # step 10's
    redis.held_after[EVERY].set()
    await answered(registry)
    await commit_steps(store, range(2 * EVERY + 1, 2 * EVERY + 2))
    assert redis.writes == [EVERY, 2 * EVERY]  # step 11 is 1 past the last write, not 6
    assert (await redis.load(SID)).steps_applied == 2 * EVERY


async def test_an_older_checkpoint_landing_last_leaves_the_newer_one_stored(checkpointing):
    store, redis, registry = checkpointing
    redis.held_before[EVERY] = asyncio.Event()  # step 5's write reaches Redis after step 10's
    await commit_steps(store, range(1, 2 * EVERY + 1))
    assert redis.writes == [EVERY, 2 * EVERY]
    await answered(registry, but=1)  # step 10's
    redis.held_before[EVERY].set()
    await answered(registry)
    assert (await redis.load(SID)).steps_applied == 2 * EVERY  # refused by the compare on the sequence number
    await commit_steps(store, range(2 * EVERY + 1, 2 * EVERY + 2))
    assert redis.writes == [EVERY, 2 * EVERY]


async def test_a_session_gone_quiet_keeps_its_lease_until_its_last_steps_are_checkpointed(redis_url):
    """Steps acknowledged just before a stream went quiet are written at the next checkpoint, however long the
    checkpoint interval is next to the lease: a checkpoint fenced out by the session's own lapsed lease left them
    unwritten, and the next request here loaded the older checkpoint over them."""
    now = [0.0]
    redis = RedisStateStore(redis_url, "replica-a", lease_ttl=0.3, state_ttl=60, lease_wait=0.1)
    await redis._redis.flushdb()
    store = RedisSessionStore(redis, Durability.CHECKPOINT, "m@1", EVERY, 1.5, Metrics(CollectorRegistry()),
                              clock=lambda: now[0])
    await store.created(record(0))
    assert await store.commit([record(3)]) == [None]  # not due yet: written at the next checkpoint
    while now[0] < 2.0:  # quiet since: maintain() runs every maintenance_period
        await asyncio.sleep(store.maintenance_period)
        now[0] += store.maintenance_period
        assert await store.maintain([LiveSession(SID, now[0], 3)], lambda _: record(3)) == []
    assert (await redis.load(SID)).steps_applied == 3
    await redis.close()


async def test_a_lease_that_lapsed_with_nobody_else_taking_it_keeps_the_live_state(redis_url):
    """Acknowledged steps not checkpointed yet are this replica's alone while no other replica took the session:
    taking the lapsed lease again (after a stall or a short Redis outage) must not load the older checkpoint
    over them, which sent the session back to its last checkpoint's numbering with no failure at all."""
    redis = RedisStateStore(redis_url, "replica-a", lease_ttl=0.3, state_ttl=60, lease_wait=0.1)
    await redis._redis.flushdb()
    registry = CollectorRegistry()
    store = RedisSessionStore(redis, Durability.CHECKPOINT, "m@1", EVERY, 3600.0, Metrics(registry))
    await store.created(record(0))
    assert await store.commit([record(3)]) == [None]  # acknowledged, not due yet
    await asyncio.sleep(0.4)  # no upkeep ran meanwhile: the lease lapsed, and nobody took the session
    assert await store.refresh(SID) is None  # the live state (3 steps) goes on
    assert await store.commit([record(5)]) == [None]  # due: written under the lease taken again
    await answered(registry)
    assert (await redis.load(SID)).steps_applied == 5
    await redis.close()


async def test_a_write_fenced_out_under_a_lease_since_taken_again_does_not_give_the_session_up(redis_url):
    redis = HeldWrites(redis_url, "replica-a", lease_ttl=0.3, state_ttl=60, lease_wait=0.1)
    await redis._redis.flushdb()
    registry = CollectorRegistry()
    store = RedisSessionStore(redis, Durability.CHECKPOINT, "m@1", EVERY, 3600.0, Metrics(registry))
    await store.created(record(0))
    redis.held_before[EVERY] = asyncio.Event()
    assert await store.commit([record(EVERY)]) == [None]  # its checkpoint waits before reaching Redis
    await asyncio.sleep(0.4)  # the lease lapses meanwhile
    assert await store.refresh(SID) is None  # taken again by this replica
    redis.held_before[EVERY].set()
    await answered(registry)  # fenced out: it was sent under the lapsed lease
    assert await store.commit([record(2 * EVERY)]) == [None]
    await answered(registry)
    assert (await redis.load(SID)).steps_applied == 2 * EVERY  # written under the lease taken again
    await redis.close()


async def test_upkeep_after_a_lapse_with_nobody_else_taking_the_session_keeps_it_live(redis_url):
    """After a Redis outage longer than lease_ttl every renewal fails: a session nobody else took is this
    replica's still, with steps acknowledged since its checkpoint; closing it as lost would drop them."""
    redis = RedisStateStore(redis_url, "replica-a", lease_ttl=0.3, state_ttl=60, lease_wait=0.1)
    await redis._redis.flushdb()
    registry = CollectorRegistry()
    store = RedisSessionStore(redis, Durability.CHECKPOINT, "m@1", EVERY, 3600.0, Metrics(registry))
    await store.created(record(0))
    assert await store.commit([record(3)]) == [None]  # acknowledged, not due yet
    await asyncio.sleep(0.4)  # no upkeep got through meanwhile: the lease lapsed
    assert await store.maintain([LiveSession(SID, 0.0, 3)], lambda _: record(3)) == []
    assert await store.commit([record(5)]) == [None]
    await answered(registry)
    assert (await redis.load(SID)).steps_applied == 5
    await redis.close()
