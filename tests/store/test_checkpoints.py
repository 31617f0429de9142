"""Checkpoint mode against a real redis-server whose writes the test holds back: a checkpoint in flight counts, so a
slow store gets one write per --checkpoint-every steps, not one per step; a failed one is due again at once."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.policies import Durability
from server.store import RedisStateStore, SessionRecord, StoreUnavailable
from server.store.redis_sessions import RedisSessionStore

pytestmark = pytest.mark.integration

SID = "AAAAAAAAAAAAAAAAAAAAAA"
EVERY = 5


class HeldWrites(RedisStateStore):
    """The real store, with each write waiting until the test lets it go (or fails it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.writes: list[int] = []  # steps_applied of each record written, in the order the writes began
        self.gate = asyncio.Event()
        self.gate.set()
        self.failing = False

    async def save(self, writes):
        self.writes.extend(record.steps_applied for record, _ in writes)
        await self.gate.wait()
        if self.failing:
            raise StoreUnavailable("the test's store is down")
        return await super().save(writes)


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


async def answered(registry: CollectorRegistry) -> None:
    """Until the store has answered every background write (they run on after commit() returns)."""
    async with asyncio.timeout(10):
        while registry.get_sample_value("lstmserve_checkpoint_writes_in_flight"):
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
