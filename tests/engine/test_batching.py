"""Batch formation as a pure function."""

import collections

import numpy as np
import pytest

from server.engine.batching import take_batch
from server.engine.sessions import Session, Work

pytestmark = pytest.mark.unit


def session_with_head(name: str, steps: int) -> Session:
    session = Session(id=name, slot=0, owner="", created_at=0.0, last_used=0.0)
    session.pending = collections.deque([Work(1, None, inputs=np.zeros((steps, 2), np.float32))])
    return session


def test_takes_at_most_max_batch_size_in_arrival_order():
    ready = collections.deque(session_with_head(f"s{i}", 1) for i in range(5))
    batch = take_batch(ready, 3)
    assert [s.id for s in batch] == ["s0", "s1", "s2"]
    assert [s.id for s in ready] == ["s3", "s4"]


def test_batches_only_the_oldest_requests_length_and_keeps_others_in_place():
    ready = collections.deque([session_with_head("a", 2), session_with_head("b", 1),
                               session_with_head("c", 2), session_with_head("d", 5)])
    batch = take_batch(ready, 10)
    assert [s.id for s in batch] == ["a", "c"]
    assert [s.id for s in ready] == ["b", "d"]
    assert [s.id for s in take_batch(ready, 10)] == ["b"]


def test_empty_queue_gives_empty_batch():
    assert take_batch(collections.deque(), 4) == []
