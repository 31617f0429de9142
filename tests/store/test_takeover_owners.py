"""Taking a session over from a real redis-server: each concurrent request is judged by its own principal."""

import asyncio

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, LimitExceeded, SessionNotFound
from server.metrics import Metrics
from server.store import Durability, RedisSessionStore, RedisStateStore, model_identity
from tests.fakes import FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.integration

SESSIONS = 24


async def replica(redis_url: str, name: str, **limits) -> Engine:
    redis = RedisStateStore(redis_url, name, lease_ttl=5.0, state_ttl=60, lease_wait=0.1)
    metrics, runtime = Metrics(CollectorRegistry()), FakeRuntime()
    store = RedisSessionStore(redis, Durability.EVERY_STEP, model_identity(runtime.metadata), 100, 5.0, metrics)
    engine = Engine(runtime, limits_with(**limits), metrics, store=store)
    await engine.start()
    return engine


@pytest.mark.parametrize("stranger_first", [True, False], ids=["stranger-first", "owner-first"])
async def test_the_owner_always_gets_its_session_whatever_request_races_it(redis_url, stranger_first):
    first = await replica(redis_url, "first")
    states = {}
    for n in range(SESSIONS):
        sid = (await first.create_session(owner="alice")).session_id
        await (await first.step(sid, np.full((1, 2), n, np.float32), owner="alice"))[1]
        states[sid] = await first.get_state(sid, owner="alice")
    await first.stop()  # hands every lease over: the next replica takes the sessions at once
    second = await replica(redis_url, "second")
    try:
        for sid, (seq, h, c) in states.items():
            stranger = second.step(sid, np.ones((1, 2), np.float32), owner="mallory")
            owner = second.get_state(sid, owner="alice")
            racing = (stranger, owner) if stranger_first else (owner, stranger)
            results = await asyncio.gather(*racing, return_exceptions=True)
            strangers, owners = results if stranger_first else results[::-1]
            assert isinstance(strangers, SessionNotFound), strangers
            got_seq, got_h, got_c = owners
            assert got_seq == seq
            np.testing.assert_array_equal(got_h, h)
            np.testing.assert_array_equal(got_c, c)
        for sid, (seq, h, _) in states.items():  # nothing the strangers sent was applied
            assert (await second.get_session(sid, owner="alice")).last_sequence_number == seq
            np.testing.assert_array_equal((await second.get_state(sid, owner="alice"))[1], h)
    finally:
        await second.stop()


async def test_a_corrupt_stored_record_is_refused_as_not_found_not_an_internal_error(redis_url):
    first = await replica(redis_url, "first")
    sid = (await first.create_session(owner="alice")).session_id
    await first.stop()
    second = await replica(redis_url, "second")
    try:
        damage = RedisStateStore(redis_url, "damage", lease_ttl=5.0, state_ttl=60, lease_wait=0.1)
        await damage._redis.hset(f"lstmserve:{{{sid}}}:state", "record", b"\x05\x00\x00\x00{oops")
        await damage.close()
        with pytest.raises(SessionNotFound):
            await second.get_state(sid, owner="alice")
    finally:
        await second.stop()


async def test_a_takeover_refused_for_want_of_room_leaves_the_session_to_other_replicas_at_once(redis_url):
    first = await replica(redis_url, "first")
    sids = [(await first.create_session(owner="alice")).session_id for _ in range(2)]
    await first.stop()
    full, other = await replica(redis_url, "full", max_sessions=1), await replica(redis_url, "other")
    try:
        await full.get_state(sids[0], owner="alice")  # taken over: this replica is full now
        with pytest.raises(LimitExceeded):
            await full.get_state(sids[1], owner="alice")
        assert (await other.get_state(sids[1], owner="alice"))[0] == 0  # not held for a lease_ttl by `full`
    finally:
        await full.stop()
        await other.stop()
