"""Snapshots: a round trip keeps every session exactly; a corrupt or foreign file is refused whole."""

import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, SequenceError, SessionNotFound
from server.metrics import Metrics
from server.store import SnapshotStore, model_identity, snapshot
from tests.fakes import FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.unit


async def engine_with(directory, runtime=None, **limits) -> Engine:
    """An engine keeping its sessions in a snapshot in `directory`, started (so restored from it)."""
    runtime = runtime or FakeRuntime()
    store = SnapshotStore(directory, model_identity(runtime.metadata))
    engine = Engine(runtime, limits_with(**limits), Metrics(CollectorRegistry()), store=store)
    await engine.start()
    return engine


async def saved_sessions(directory) -> dict:
    """Three sessions with different histories saved to `directory`; returns what each looked like."""
    engine = await engine_with(directory)
    expected = {}
    for n in range(3):
        sid = (await engine.create_session(owner=f"owner{n}")).session_id
        answers = []
        for seq in range(1, n + 2):
            _, answer = await engine.step(sid, np.full((n + 1, 2), seq, np.float32), seq=seq, owner=f"owner{n}")
            answers.append((await answer).outputs)
        expected[sid] = (
            f"owner{n}",
            await engine.get_state(sid, owner=f"owner{n}"),
            answers,
            await engine.get_session(sid, owner=f"owner{n}"),
        )
    await engine.stop()  # writes the snapshot
    assert (directory / snapshot.FILE_NAME).exists()
    return expected


async def test_round_trip_restores_state_numbers_and_answers(tmp_path):
    expected = await saved_sessions(tmp_path)
    engine = await engine_with(tmp_path, FakeRuntime())
    try:
        assert not (tmp_path / snapshot.FILE_NAME).exists()  # never loaded twice
        for sid, (owner, (seq, h, c), answers, view) in expected.items():
            got_seq, got_h, got_c = await engine.get_state(sid, owner=owner)
            assert got_seq == seq
            np.testing.assert_array_equal(got_h, h)
            np.testing.assert_array_equal(got_c, c)
            restored = await engine.get_session(sid, owner=owner)
            assert (restored.steps_applied, restored.created_at) == (view.steps_applied, view.created_at)
            # the last answer is replayed, not recomputed, and only for the same inputs (kept with it)
            with pytest.raises(SequenceError, match=f"sequence number {seq} was already applied with other"):
                await engine.step(sid, np.full((len(answers), 2), 99, np.float32), seq=seq, owner=owner)
            _, replayed = await engine.step(sid, np.full((len(answers), 2), seq, np.float32), seq=seq, owner=owner)
            replay = (await replayed).outputs
            np.testing.assert_array_equal(replay, answers[-1])
            after = (await (await engine.step(sid, np.ones((1, 2), np.float32), seq=seq + 1, owner=owner))[1]).outputs
            assert float(after[0, 0]) == float(h[0, 0]) + 2.0  # the fake adds the step's input sum
    finally:
        await engine.stop()


def corrupt_payload(path):
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def bad_magic(path):
    path.write_bytes(b"something-else" + path.read_bytes()[len(snapshot.MAGIC) :])


def future_version(path):
    current = f'"version": {snapshot.VERSION}'.encode()
    path.write_bytes(path.read_bytes().replace(current, f'"version": {snapshot.VERSION + 1}'.encode(), 1))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (corrupt_payload, "checksum mismatch"),
        (truncate, "checksum mismatch"),
        (bad_magic, "not an lstmserve snapshot"),
        (future_version, f"format version {snapshot.VERSION + 1}"),
    ],
)
async def test_damaged_snapshot_is_refused_whole_with_a_log_line(tmp_path, caplog, damage, reason):
    expected = await saved_sessions(tmp_path)
    damage(tmp_path / snapshot.FILE_NAME)
    with caplog.at_level(logging.ERROR, logger="server.store.snapshot"):
        engine = await engine_with(tmp_path)
    try:
        assert f"refused snapshot {tmp_path / snapshot.FILE_NAME}: {reason}" in caplog.text
        await assert_none_restored(engine, expected)
        assert list(tmp_path.glob(f"{snapshot.FILE_NAME}.rejected-*"))  # kept for a person to inspect
    finally:
        await engine.stop()


async def assert_none_restored(engine, expected: dict) -> None:
    for sid, (owner, *_) in expected.items():
        with pytest.raises(SessionNotFound):
            await engine.get_session(sid, owner=owner)


async def test_snapshot_of_another_model_is_refused(tmp_path, caplog):
    expected = await saved_sessions(tmp_path)
    with caplog.at_level(logging.ERROR, logger="server.store.snapshot"):
        engine = await engine_with(tmp_path, FakeRuntime(hidden_size=4))
    try:
        assert "written for model" in caplog.text and "'hidden_size': 4" in caplog.text
        await assert_none_restored(engine, expected)
    finally:
        await engine.stop()


async def test_snapshot_larger_than_the_limits_is_not_half_loaded(tmp_path, caplog):
    expected = await saved_sessions(tmp_path)
    with caplog.at_level(logging.ERROR, logger="server.store.snapshot"):
        engine = await engine_with(tmp_path, max_sessions=2)
    try:
        assert "3 sessions do not fit: max_sessions allows 2" in caplog.text
        await assert_none_restored(engine, expected)
    finally:
        await engine.stop()


def test_no_snapshot_means_an_empty_start(tmp_path):
    restored = []
    assert SnapshotStore(tmp_path, model_identity(FakeRuntime().metadata)).restore(restored.extend) == 0
    assert restored == []
