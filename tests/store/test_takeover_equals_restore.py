"""A session taken over from Redis and the same session restored from a snapshot are the same session."""

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine
from server.metrics import Metrics
from server.store import Durability, RedisSessionStore, RedisStateStore, SnapshotStore, model_identity, snapshot
from server.testing.redis_server import redis_server
from tests.fakes import FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.integration

OWNER = "alice"


async def redis_engine(url: str, replica: str) -> Engine:
    runtime, metrics = FakeRuntime(), Metrics(CollectorRegistry())
    redis = RedisStateStore(url, replica, lease_ttl=5.0, state_ttl=60, lease_wait=0.1)
    store = RedisSessionStore(redis, Durability.EVERY_STEP, model_identity(runtime.metadata), 100, 5.0, metrics)
    engine = Engine(runtime, limits_with(answers_kept=3), metrics, store=store)
    await engine.start()
    return engine


async def snapshot_engine(directory) -> Engine:
    runtime = FakeRuntime()
    store = SnapshotStore(directory, model_identity(runtime.metadata))
    engine = Engine(runtime, limits_with(answers_kept=3), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    return engine


def inputs(seq: int) -> np.ndarray:
    return np.full((seq % 2 + 1, 2), seq, np.float32)


async def seen(engine: Engine, sid: str) -> tuple:
    """Everything a client can learn of a session without changing it, kept answers included."""
    view = await engine.get_session(sid, owner=OWNER)
    seq, h, c = await engine.get_state(sid, owner=OWNER)
    replays = [(await (await engine.step(sid, inputs(n), seq=n, owner=OWNER))[1]).outputs.tolist()
               for n in range(seq - 2, seq + 1)]
    return view.created_at, view.steps_applied, seq, h.tolist(), c.tolist(), replays


async def test_a_takeover_keeps_what_a_restore_keeps(tmp_path):
    with redis_server(tmp_path) as redis:
        first = await redis_engine(redis.url, "first")
        sid = (await first.create_session(owner=OWNER)).session_id
        for seq in range(1, 6):
            await (await first.step(sid, inputs(seq), seq=seq, owner=OWNER))[1]
        original = await first.get_session(sid, owner=OWNER)
        await first.stop()  # leases handed over; the record stays in Redis
        stored = await RedisStateStore(redis.url, "reader", 5.0, 60, 0.1).load(sid)
        snapshot.write(tmp_path / snapshot.FILE_NAME, model_identity(FakeRuntime().metadata), [stored])

        taker = await redis_engine(redis.url, "second")
        restorer = await snapshot_engine(tmp_path)
        try:
            taken_over, restored = await seen(taker, sid), await seen(restorer, sid)
        finally:
            await taker.stop()
            await restorer.stop()
    assert taken_over == restored
    created_at, steps, seq, *_, replays = taken_over
    assert (steps, seq) == (2 + 1 + 2 + 1 + 2, 5)
    assert created_at == original.created_at  # a takeover no longer restarts the session's clock
    assert len(replays) == 3  # the last three answers (answers_kept=3) replay on both
