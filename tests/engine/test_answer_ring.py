"""The pooled ring of kept answers: what a session gets back, across positions, chunks, slot reuse and loads."""

import numpy as np
import pytest

from server.engine.answer_ring import CHUNK, AnswerRing
from server.engine.sessions import Session
from server.store import KeptAnswer

pytestmark = pytest.mark.unit

KEEP = 4
OUTPUT = 3


def session(slot: int, last_applied: int = 0, kept_since: int = 0) -> Session:
    return Session(id="s", slot=slot, owner="", created_at=0.0, last_used=0.0, last_applied_seq=last_applied,
                   kept_since=kept_since)


def digest(seq: int) -> bytes:
    return bytes([seq % 256]) * 8


def apply(ring: AnswerRing, sessions: list[Session], steps: int = 1) -> np.ndarray:
    """One batch: each session's next request, answered with outputs that name the slot and the number."""
    seqs = np.array([s.last_applied_seq + 1 for s in sessions], np.int64)
    outputs = np.stack([np.full((steps, OUTPUT), s.slot * 1000 + seq, np.float32)
                        for s, seq in zip(sessions, seqs.tolist())])
    ring.put_batch(np.array([s.slot for s in sessions], np.int64), seqs, [digest(int(n)) for n in seqs], outputs)
    for s, seq in zip(sessions, seqs.tolist()):
        s.last_applied_seq = seq
    return outputs


@pytest.mark.parametrize("steps", [1, 3])
def test_the_latest_answers_are_kept_with_their_digests_and_older_ones_are_not(steps):
    ring, sessions = AnswerRing(KEEP), [session(0), session(5), session(CHUNK + 2)]  # two chunks in one batch
    for _ in range(10):
        apply(ring, sessions, steps)
    for s in sessions:
        assert ring.answer_of(s, 6) is None  # 10 - KEEP: overwritten
        for seq in range(7, 11):
            kept = ring.answer_of(s, seq)
            assert kept.seq == seq and kept.digest == digest(seq)
            np.testing.assert_array_equal(kept.answer, np.full((steps, OUTPUT), s.slot * 1000 + seq))
        assert [k.seq for k in ring.answers_of(s)] == [7, 8, 9, 10]
        assert ring.answer_of(s, 11) is None  # not applied yet


def test_a_kept_answer_is_a_copy_the_next_requests_do_not_change():
    ring, s = AnswerRing(KEEP), session(1)
    apply(ring, [s])
    kept = ring.answer_of(s, 1)
    for _ in range(KEEP):
        apply(ring, [s])
    np.testing.assert_array_equal(kept.answer, np.full((1, OUTPUT), 1001))


def test_a_reset_keeps_no_outputs():
    ring, s = AnswerRing(KEEP), session(2)
    apply(ring, [s])
    ring.put_batch(np.array([2]), np.array([2]), [digest(2)], None)
    s.last_applied_seq = 2
    assert ring.answer_of(s, 2) == KeptAnswer(2, None, digest(2))
    assert ring.answer_of(s, 1).answer is not None


def test_a_new_session_in_a_reused_slot_never_gets_its_predecessors_answers():
    ring, old = AnswerRing(KEEP), session(3)
    for _ in range(3):
        apply(ring, [old])
    ring.release(3)
    new = session(3)
    assert ring.answers_of(new) == () and ring.answer_of(new, 1) is None
    apply(ring, [new])
    assert [k.seq for k in ring.answers_of(new)] == [1]
    np.testing.assert_array_equal(ring.answer_of(new, 1).answer, np.full((1, OUTPUT), 3001))


def test_loading_a_record_keeps_its_answers_only_even_with_gaps():
    ring, earlier = AnswerRing(KEEP), session(4)
    for _ in range(8):
        apply(ring, [earlier])  # entries 5..8 at this slot, which a loaded session must not see
    loaded = session(4, last_applied=8)
    answers = (KeptAnswer(6, np.ones((1, OUTPUT), np.float32), None), KeptAnswer(8, None, digest(8)))
    ring.load(loaded, 8, answers)
    kept = ring.answers_of(loaded)
    assert [(k.seq, k.digest) for k in kept] == [(6, None), (8, digest(8))]
    np.testing.assert_array_equal(kept[0].answer, answers[0].answer)
    assert kept[1].answer is None
    assert ring.answer_of(loaded, 7) is None and ring.answer_of(loaded, 5) is None


def test_the_answers_of_a_commit_end_with_the_one_being_committed():
    ring, s = AnswerRing(KEEP), session(0)
    for _ in range(5):
        apply(ring, [s])
    latest = KeptAnswer(6, np.zeros((1, OUTPUT), np.float32), digest(6))
    assert [k.seq for k in ring.answers_of(s, latest)] == [3, 4, 5, 6]
