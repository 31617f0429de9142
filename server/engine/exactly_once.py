"""The sequence-number rules that make every state-changing request apply exactly once, in order."""

import asyncio
from collections.abc import Callable

from server.engine.errors import LimitExceeded, SequenceError
from server.engine.scheduler import Scheduler, StepAnswer
from server.engine.sessions import Session, SessionTable


class ExactlyOnce:
    """Number n+1 is applied after n only; a number already applied is answered again, never applied twice."""

    def __init__(self, scheduler: Scheduler, table: SessionTable, answers_kept: int, max_queued_requests: int,
                 in_flight: Callable[[Session, int, bytes], asyncio.Future | None] = lambda *request: None):
        self._scheduler = scheduler
        self._table = table
        self._answers_kept = answers_kept
        self._max_queued_requests = max_queued_requests
        self._in_flight = in_flight  # (session, seq, digest) -> the answer of a request run outside the queue

    def submit(self, session: Session, seq: int, digest: bytes, make_work) -> tuple[int, asyncio.Future]:
        """Queues `make_work(future, seq)` behind the session's others, or answers a retry; seq 0 takes the next
        number. `digest` is the request's inputs', kept to tell a retry from a reused number."""
        loop = asyncio.get_running_loop()
        if seq == 0:
            seq = session.last_assigned_seq + 1
        elif seq <= session.last_assigned_seq:
            return seq, self._answer_again(session, seq, digest, loop)
        elif seq != session.last_assigned_seq + 1:
            raise SequenceError(f"sequence number {seq} skips ahead; expected {session.last_assigned_seq + 1}",
                                session.last_assigned_seq + 1)
        if self._scheduler.queued >= self._max_queued_requests:
            raise LimitExceeded(f"the server's queue is full (max_queued_requests={self._max_queued_requests})"
                                "; retry with backoff", "max_queued_requests", self._scheduler.room_expected_in)
        future = loop.create_future()
        self._scheduler.enqueue(session, make_work(future, seq))
        session.last_assigned_seq = seq
        self._table.touch(session)
        return seq, future

    def _answer_again(self, session: Session, seq: int, digest: bytes, loop) -> asyncio.Future:
        """A retried request: the queued original's future, the kept answer, or the answer of the original that a
        columnar message runs now. A number reused with other inputs is refused: answering it would hand back
        another request's outputs."""
        expected = session.last_assigned_seq + 1
        for work in session.pending or ():
            if work.seq == seq:
                check_same_inputs(seq, work.digest, digest, expected)
                return work.retried()
        kept = self._scheduler.kept.answer_of(session, seq)
        if kept is not None:
            check_same_inputs(seq, kept.digest, digest, expected)
            future = loop.create_future()
            future.set_result(StepAnswer(kept.answer, None))
            return future
        flying = self._in_flight(session, seq, digest)
        if flying is not None:
            return flying
        raise SequenceError(f"sequence number {seq} was applied earlier and only the answers of the last "
                            f"{self._answers_kept} requests are kept; expected {expected}", expected)


def check_same_inputs(seq: int, applied: bytes | None, retried: bytes, expected: int) -> None:
    if applied is not None and applied != retried:
        raise SequenceError(f"sequence number {seq} was already applied with other inputs; a retry must resend "
                            "the same inputs, and a new request takes the next sequence number", expected)
