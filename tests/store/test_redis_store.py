"""Leases, fencing and compare-and-set against a real redis-server."""

import asyncio

import numpy as np
import pytest

from server.store import KeptAnswer, Lease, RedisStateStore, SessionRecord, StoreUnavailable

pytestmark = pytest.mark.integration

SID = "AAAAAAAAAAAAAAAAAAAAAA"


@pytest.fixture
async def stores(redis_url):
    """Two replicas' stores, and a fresh key space."""
    made = [RedisStateStore(redis_url, f"replica-{name}", lease_ttl=0.3, state_ttl=60, lease_wait=0.1)
            for name in "ab"]
    await made[0]._redis.flushdb()
    yield made
    for store in made:
        await store.close()


def record(seq: int, value: float = 0.0) -> SessionRecord:
    state = np.full((1, 3), value, np.float32)
    kept = KeptAnswer(seq, np.full((1, 3), seq, np.float32), bytes([seq]) * 8)
    return SessionRecord(SID, "alice", "m@1", 1700000000.5, seq, seq, state, state, (kept,))


async def test_record_round_trips(stores):
    a, _ = stores
    lease = await a.acquire(SID)
    assert await a.save([(record(3, 1.5), lease)]) == [1]
    loaded = await a.load(SID)
    assert (loaded.owner, loaded.model, loaded.last_applied_seq, loaded.steps_applied) == ("alice", "m@1", 3, 3)
    assert loaded.created_at == 1700000000.5
    np.testing.assert_array_equal(loaded.h, np.full((1, 3), 1.5))
    np.testing.assert_array_equal(loaded.answers[-1].answer, np.full((1, 3), 3))
    assert loaded.answers[-1].digest == bytes([3]) * 8  # a replay after a takeover is checked against it


async def test_a_held_lease_makes_the_other_replica_wait_then_give_up_with_a_retry_hint(stores):
    a, b = stores
    await a.acquire(SID)
    with pytest.raises(StoreUnavailable, match="another replica") as error:
        await b.acquire(SID)
    assert 0 < error.value.retry_after <= 0.3


async def test_an_expired_lease_passes_to_the_next_replica_with_a_higher_fence(stores):
    a, b = stores
    first = await a.acquire(SID)
    b._lease_wait = 2.0
    second = await b.acquire(SID)  # waits for a's lease to lapse
    assert second.fence > first.fence


async def test_a_stale_replica_cannot_overwrite_newer_state(stores):
    a, b = stores
    lease_a = await a.acquire(SID)
    assert await a.save([(record(1), lease_a)]) == [1]
    b._lease_wait = 2.0
    lease_b = await b.acquire(SID)
    assert await b.save([(record(2, 9.0), lease_b)]) == [1]
    assert await a.save([(record(5, -1.0), lease_a)]) == [0]  # fenced out
    assert (await a.load(SID)).last_applied_seq == 2


async def test_compare_and_set_refuses_an_older_sequence_number(stores):
    a, _ = stores
    lease = await a.acquire(SID)
    assert await a.save([(record(4), lease)]) == [1]
    assert await a.save([(record(3), lease)]) == [-1]
    assert (await a.load(SID)).last_applied_seq == 4


async def test_a_lease_taken_anew_by_its_holder_fences_out_writes_under_its_old_fence(stores):
    a, _ = stores
    old = await a.acquire(SID)
    new = await a.acquire(SID, anew=True)  # a session carried to another engine of the same replica
    assert new.fence > old.fence
    assert await a.save([(record(1), new)]) == [1]
    assert await a.save([(record(1, -1.0), old)]) == [0]  # the same sequence number: only the fence tells
    np.testing.assert_array_equal((await a.load(SID)).h, np.zeros((1, 3)))


async def test_release_with_delete_removes_the_session_but_only_for_the_holder(stores):
    a, b = stores
    lease = await a.acquire(SID)
    await a.save([(record(1), lease)])
    await b.release(Lease(SID, lease.fence), delete=True)  # not b's lease: nothing happens
    assert await a.load(SID) is not None
    await a.release(lease, delete=True)
    assert await a.load(SID) is None


async def test_unreachable_store_is_reported_as_unavailable(tmp_path):
    store = RedisStateStore(f"unix://{tmp_path}/nothing.sock", "r", lease_ttl=1, state_ttl=1, lease_wait=0)
    with pytest.raises(StoreUnavailable, match="unreachable"):
        await store.acquire(SID)
    await store.close()


async def test_a_fence_is_never_handed_out_twice_while_the_session_is_stored(redis_url):
    """A replica that takes its lapsed lease again trusts its live state only when the fence is its old one; the
    fence counter must outlive every lease it numbered, or a replica can get its old fence back after another
    one wrote newer state (seen: the counter expired `state_ttl` after the first acquire of a busy session)."""
    a, b = (RedisStateStore(redis_url, f"replica-{name}", lease_ttl=0.5, state_ttl=1.0, lease_wait=2.0)
            for name in "ab")
    await a._redis.flushdb()
    await a.acquire(SID)
    held = await a.acquire(SID, anew=True)  # as after a takeover: a's fence is not the first
    assert await a.save([(record(1), held)]) == [1]
    for _ in range(3):  # a busy session: its lease renewed, then written again, stored for state_ttl more
        await asyncio.sleep(0.2)
        assert await a.renew([held]) == [True]
    assert await a.save([(record(2), held)]) == [1]
    await asyncio.sleep(0.6)  # a's lease lapsed (idle for longer than lease_ttl); its state is still stored
    assert (await b.load(SID)).last_applied_seq == 2
    taken = await b.acquire(SID)
    assert await b.save([(record(3), taken)]) == [1]
    await b.release(taken)
    again = await a.acquire(SID)
    assert again.fence not in (held.fence, taken.fence)
    for store in (a, b):
        await store.close()
