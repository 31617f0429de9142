"""Session limits with a fake runtime: per owner, by state bytes, refuse or evict, each counted in metrics."""

import asyncio
import dataclasses

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, LimitExceeded, SessionNotFound
from server.metrics import EVICTING_LIMITS, REFUSING_LIMITS, Metrics
from server.settings import Settings
from tests.fakes import FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.unit

SLOT_BYTES = 2 * 1 * 3 * 4  # (h, c) of the fake's one layer of 3 float32


async def started(**limits) -> tuple[Engine, CollectorRegistry]:
    registry = CollectorRegistry()
    engine = Engine(FakeRuntime(), limits_with(initial_capacity=2, **limits), Metrics(registry))
    await engine.start()
    return engine, registry


def refusals(registry, limit: str) -> float:
    return registry.get_sample_value("lstmserve_limit_refusals_total", {"limit": limit})


def evictions(registry, limit: str) -> float:
    return registry.get_sample_value("lstmserve_sessions_evicted_total", {"limit": limit})


def test_every_limit_is_exported_at_zero_before_its_first_refusal_or_eviction():
    registry = Metrics(CollectorRegistry()).registry
    settings = {field.name for field in dataclasses.fields(Settings)}
    assert set(EVICTING_LIMITS) <= set(REFUSING_LIMITS) <= settings
    assert all(registry.get_sample_value("lstmserve_limit_refusals_total", {"limit": limit}) == 0
               for limit in REFUSING_LIMITS)
    assert all(registry.get_sample_value("lstmserve_sessions_evicted_total", {"limit": limit}) == 0
               for limit in EVICTING_LIMITS)


async def test_sessions_per_owner_are_limited_without_touching_other_owners():
    engine, registry = await started(max_sessions_per_owner=2)
    try:
        mine = [(await engine.create_session(owner="alice")).session_id for _ in range(2)]
        with pytest.raises(LimitExceeded, match="max_sessions_per_owner=2"):
            await engine.create_session(owner="alice")
        await engine.create_session(owner="bob")  # another owner is not affected
        assert refusals(registry, "max_sessions_per_owner") == 1
        await engine.close_session(mine[0], owner="alice")
        await engine.create_session(owner="alice")  # a closed session frees its place
    finally:
        await engine.stop()


async def test_state_memory_in_bytes_caps_the_pool_and_the_refusal_names_it():
    engine, registry = await started(max_state_bytes=5 * SLOT_BYTES + 1)
    try:
        for _ in range(5):
            await engine.create_session()
        with pytest.raises(LimitExceeded, match=f"max_state_bytes={5 * SLOT_BYTES + 1}"):
            await engine.create_session()
        assert refusals(registry, "max_state_bytes") == 1
    finally:
        await engine.stop()


async def test_evict_policy_closes_the_least_recently_used_idle_session():
    engine, registry = await started(max_sessions=3, full_policy="evict")
    try:
        a, b, c = [(await engine.create_session()).session_id for _ in range(3)]
        await (await engine.step(a, np.ones((1, 2), np.float32)))[1]  # a is now the most recently used
        await engine.create_session()
        with pytest.raises(SessionNotFound):
            await engine.get_session(b)
        await engine.get_session(a), await engine.get_session(c)
        assert evictions(registry, "max_sessions") == 1
        assert refusals(registry, "max_sessions") == 0
    finally:
        await engine.stop()


async def test_evict_policy_never_evicts_a_session_with_work_in_flight():
    engine, registry = await started(max_sessions=1, full_policy="evict")
    try:
        busy = (await engine.create_session()).session_id
        engine.runtime.gate.clear()
        step = (await engine.step(busy, np.ones((1, 2), np.float32)))[1]
        with pytest.raises(LimitExceeded, match="max_sessions=1"):
            await engine.create_session()
        engine.runtime.gate.set()
        assert float((await step).outputs[0, 0]) == 2.0
        assert refusals(registry, "max_sessions") == 1
    finally:
        await engine.stop()


async def test_per_owner_eviction_takes_the_owners_own_oldest_session():
    engine, _ = await started(max_sessions_per_owner=2, full_policy="evict")
    try:
        other = (await engine.create_session(owner="bob")).session_id
        first, second = [(await engine.create_session(owner="alice")).session_id for _ in range(2)]
        await engine.create_session(owner="alice")
        with pytest.raises(SessionNotFound):
            await engine.get_session(first, owner="alice")
        await engine.get_session(second, owner="alice"), await engine.get_session(other, owner="bob")
    finally:
        await engine.stop()


async def test_queue_limit_refusal_is_counted():
    engine, registry = await started(max_queued_requests=2)
    try:
        sid = (await engine.create_session()).session_id
        engine.runtime.gate.clear()
        futures = [(await engine.step(sid, np.ones((1, 2), np.float32)))[1] for _ in range(2)]
        with pytest.raises(LimitExceeded, match="max_queued_requests=2"):
            await engine.step(sid, np.ones((1, 2), np.float32))
        engine.runtime.gate.set()
        await asyncio.gather(*futures)
        assert refusals(registry, "max_queued_requests") == 1
        assert (await engine.get_session(sid)).steps_applied == 2
    finally:
        await engine.stop()


async def test_a_budget_smaller_than_one_session_stops_start_up():
    with pytest.raises(LimitExceeded, match="cannot hold one session"):
        Engine(FakeRuntime(), limits_with(max_state_bytes=SLOT_BYTES - 1), Metrics(CollectorRegistry()))
