"""A session carried onto another model version by one replica, as another replica that still holds it live on
the old version sees it (real redis-server)."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.store import (
    Durability,
    RedisSessionStore,
    RedisStateStore,
    SessionGone,
    SessionRecord,
    StoreUnavailable,
)

pytestmark = pytest.mark.integration

SID = "AAAAAAAAAAAAAAAAAAAAAA"


def replica(redis_url: str, name: str, model: str) -> RedisSessionStore:
    redis = RedisStateStore(redis_url, name, lease_ttl=0.3, state_ttl=60, lease_wait=2.0)
    return RedisSessionStore(redis, Durability.EVERY_STEP, model, 100, 60.0, Metrics(CollectorRegistry()))


def record(model: str, seq: int) -> SessionRecord:
    state = np.full((1, 3), seq, np.float32)
    return SessionRecord(SID, "alice", model, 1700000000.5, seq, seq, state, state)


async def test_a_record_of_another_model_version_is_never_loaded_into_a_live_session(redis_url):
    old, new = replica(redis_url, "replica-a", "m@1"), replica(redis_url, "replica-b", "m@2")
    await old.redis._redis.flushdb()
    await old.created(record("m@1", 0))
    await new.created(record("m@2", 4))  # replica b carried it onto m@2 once a's lease lapsed (idle session)
    await new.release(SID, delete=False)
    with pytest.raises(SessionGone):  # it lives on m@2 now: its state means nothing to m@1
        await old.refresh(SID)
    for store in (old, new):
        await store.redis.close()


async def test_a_takeover_waiting_for_the_lease_refuses_a_record_carried_onto_another_version_meanwhile(redis_url):
    holder, carrier = replica(redis_url, "replica-b", "m@1"), replica(redis_url, "replica-b", "m@2")
    taker = replica(redis_url, "replica-c", "m@1")
    await holder.redis._redis.flushdb()
    await holder.created(record("m@1", 0))
    taking = asyncio.ensure_future(taker.load(SID, "alice"))  # reads an m@1 record, then waits for the lease
    await asyncio.sleep(0.1)
    await carrier.created(record("m@2", 4))  # replica b carries it onto its m@2 engine meanwhile
    await carrier.release(SID, delete=False)
    assert await taking is None
    for store in (holder, carrier, taker):
        await store.redis.close()


async def test_a_stale_record_carried_onto_another_version_is_refused_not_taken_for_stored(redis_url):
    """A replica's retired-version engine still holds the session live at sequence number 2; another replica
    took it over meanwhile and stored sequence number 5. Carrying the stale copy onto the current version must
    fail (the session stays put and is refreshed), not pass for stored over the newer state."""
    old, new, other = (replica(redis_url, "replica-b", "m@1"), replica(redis_url, "replica-b", "m@2"),
                       replica(redis_url, "replica-a", "m@1"))
    await old.redis._redis.flushdb()
    await old.created(record("m@1", 2))
    assert (await other.load(SID, "alice")).last_applied_seq == 2  # once b's lease lapsed
    assert await other.commit([record("m@1", 5)]) == [None]
    await other.release(SID, delete=False)
    with pytest.raises(StoreUnavailable):
        await new.created(record("m@2", 2))
    assert (await new.redis.load(SID)).last_applied_seq == 5
    for store in (old, new, other):
        await store.redis.close()
