"""Drains with a real Engine (FakeRuntime): a draining version's life until it is unloaded or wanted again."""

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, SessionNotFound, VersionRetired
from server.metrics import Metrics
from server.models.drain import Drains
from server.models.registry import ModelRegistry
from server.models.repository import scan
from server.models.versions import Version, VersionState
from tests.fakes import FakeRuntime, HeldStore
from tests.limits import limits_with
from tests.models.repository_files import add_version, write_config

pytestmark = pytest.mark.unit


async def test_a_version_wanted_again_right_after_its_last_session_closed_is_not_unloaded():
    """Its last session's close asks for its unload (a task, run at the loop's next turn); a reload that wants the
    version again may revive it before then: it serves on, and is not unloaded READY under its new sessions."""
    tasks, unloaded = [], []

    def spawn(coroutine) -> asyncio.Task:
        tasks.append(asyncio.ensure_future(coroutine))
        return tasks[-1]

    drains = Drains(300.0, spawn, lambda v, engine: unloaded.append(v.version))
    engine = Engine(FakeRuntime(), limits_with(), Metrics(CollectorRegistry()))
    await engine.start()
    v = Version("m", 1, Path("m/1/model.pt"), (), VersionState.READY, engine=engine)
    engine.on_session_closed(lambda session_id, owner: drains.after_close(v, session_id, owner))
    try:
        last = (await engine.create_session()).session_id
        drains.retire(v, "left the version policy")
        await engine.close_session(last)  # the version has no session left: its unload is asked
        assert drains.revive(v)  # a roll-back, before that unload ran
        await asyncio.gather(*tasks, return_exceptions=True)  # the unload, and the drain timeout it cancelled
        assert (v.state, v.engine, unloaded) == (VersionState.READY, engine, [])
        assert (await engine.create_session()).session_id  # it takes new sessions again
    finally:
        for task in tasks:
            task.cancel()
        await engine.stop()


async def test_a_version_rolled_back_to_while_its_drain_timeout_ends_its_sessions_is_loaded_anew(tmp_path):
    """Its sessions are being ended (the store is still asked to release them) when a reload wants it again: too
    late to take it back as it is; its last session's close has unloaded it already, so it is loaded anew."""
    add_version(tmp_path, "m", 1, seed=1)
    store, limits = HeldStore(), limits_with()
    registry = ModelRegistry(lambda: scan(tmp_path), lambda runtime, limits: Engine(
        runtime, limits, Metrics(CollectorRegistry()), store=store), limits, drain_timeout=0.01)
    await registry.start()
    try:
        leftover = (await registry.engine("m").create_session()).session_id
        released = store.hold("release", leftover)
        add_version(tmp_path, "m", 2, seed=2)
        await registry.reload()  # version 1 drains; its drain timeout ends its session and awaits the store
        await store.waiting.wait()
        write_config(tmp_path, "m", version_policy={"specific": {"versions": [1]}})
        reload = asyncio.ensure_future(registry.reload())  # the roll-back
        await asyncio.sleep(0.05)
        released.set()
        await reload
        assert {s.version: (s.state, s.is_default) for s in registry.statuses()} == {
            1: (VersionState.READY, True), 2: (VersionState.UNAVAILABLE, False)}  # 2 had no session: unloaded
    finally:
        await registry.stop()


async def test_a_session_ended_by_a_drain_timeout_is_told_so_to_its_owner_only(tmp_path):
    """Another principal who learnt its id is answered as for any session that does not exist: neither that it
    existed nor which version it ran on."""
    add_version(tmp_path, "m", 1, seed=1)
    registry = ModelRegistry(lambda: scan(tmp_path), lambda runtime, limits: Engine(
        runtime, limits, Metrics(CollectorRegistry())), limits_with(), drain_timeout=0.01)
    await registry.start()
    try:
        ended = (await registry.engine("m").create_session(owner="alice")).session_id
        add_version(tmp_path, "m", 2, seed=2)
        await registry.reload()
        while registry.live_engine(ended) is not None:
            await asyncio.sleep(0.01)  # version 1's drain timeout ends the session
        with pytest.raises(VersionRetired, match="version 1 of model m"):
            await registry.engine_of_session(ended, owner="alice")
        with pytest.raises(SessionNotFound) as refused:  # by the current version, which has no such session
            await (await registry.engine_of_session(ended, owner="mallory")).get_session(ended, owner="mallory")
        assert "version" not in str(refused.value)
    finally:
        await registry.stop()
