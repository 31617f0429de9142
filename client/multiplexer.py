"""Multiplexers: many application sessions stepping over one StreamColumns stream (`client.multiplexer()`).

Each application session calls `step(x)` and gets its outputs, as with a session of its own; the steps that wait at
the same time are packed into one StepColumns message (one per shape [T, input]), so a thousand sessions cost a message,
not a thousand requests. Each session numbers its steps, so a step re-sent after a broken stream is answered again
and never applied twice; a step the server refuses raises StepError (an LstmError) in that session only, unless the
server says when to retry it (a rate limit, a full queue): then it is retried, as a unary call is.
This module holds the blocking multiplexer; aio_multiplexer.py the asyncio one.
"""

import concurrent.futures
import threading
import time

import grpc
import numpy as np

from client.columns import ColumnStep, Packer
from client.errors import LstmError
from client.messages import StepError, as_steps
from client.resume import may_have_applied
from client.tracing import trace_metadata

DEFAULT_MAX_ENTRIES = 4096  # the server's default max_batch_entries, for servers that do not say theirs
CLOSED = "the multiplexer is closed"


class Multiplexer:
    """The blocking multiplexer of an LstmClient: `with client.multiplexer() as mux: s = mux.session()`, then
    `s.step(x)` from any number of threads. `max_in_flight`: messages sent and not answered yet; the steps that
    arrive meanwhile wait, and go in the next message together."""

    def __init__(self, client, max_in_flight: int = 2):
        self._client = client
        self._packer = Packer(client.info().batching.max_batch_entries or DEFAULT_MAX_ENTRIES)
        self._max_in_flight = max_in_flight
        self._turn = threading.Condition()
        self._closed, self._generation = False, 0
        self._thread = threading.Thread(target=self._run, name="lstmserve-multiplexer", daemon=True)
        self._thread.start()

    def __enter__(self) -> "Multiplexer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def session(self, h0=None, c0=None, session_id: str | None = None) -> "MultiplexedSession":
        """Opens a session (from `(h0, c0)` or zeros), or re-attaches to `session_id`, stepped through this one."""
        return MultiplexedSession(self, self._client.session(h0, c0, session_id))

    def close(self) -> None:
        """Sends what is waiting, waits for the answers, then ends the stream."""
        with self._turn:
            self._closed = True
            self._turn.notify_all()
        self._thread.join()

    def step(self, session_id: str, seq: int, steps: np.ndarray) -> np.ndarray:
        """Request `seq` of a session: `steps[T, input]` -> outputs `[T, output]`; raises StepError if refused.
        A refusal that says when to retry (a rate limit, a full queue) is retried as a unary call's is."""
        attempts = self._client.retry.start(self._client.timeout)
        while True:
            try:
                return self._step_once(session_id, seq, steps, attempts.remaining())
            except StepError as refused:
                time.sleep(attempts.delay_after(refused))

    def _step_once(self, session_id: str, seq: int, steps: np.ndarray, timeout: float | None) -> np.ndarray:
        done = concurrent.futures.Future()
        with self._turn:
            if self._closed:
                raise LstmError(grpc.StatusCode.CANCELLED, CLOSED)
            self._packer.add(ColumnStep(session_id, seq, steps, done))
            self._turn.notify_all()
        try:
            return done.result(timeout)
        except TimeoutError:
            raise late(self._client.timeout) from None

    def _run(self) -> None:
        """Keeps one call open, re-opening it after a break and re-sending what was not answered."""
        attempts = self._client.retry.start()
        while True:
            with self._turn:
                self._packer.rewind()  # what a broken call left unanswered is sent again, first
                # a call is opened for something to send: after a refusal for good, never again and again
                self._turn.wait_for(lambda: self._closed or self._packer.pending)
                if self._closed and not self._packer.pending:
                    return
                generation = self._generation
            try:
                for response in self._client.stub.StreamColumns(self._requests(generation),
                                                                metadata=trace_metadata()):
                    with self._turn:
                        results = self._packer.answered(response)
                        self._turn.notify_all()
                    attempts.progressed()
                    deliver(results)
            except grpc.RpcError as error:
                with self._turn:
                    self._generation += 1  # the broken call's request generator stops
                    self._turn.notify_all()
                attempts = self._after_break(error, attempts)

    def _after_break(self, error: grpc.RpcError, attempts):
        """Waits before a retry (then what was not answered is sent again); or fails all of it, for good."""
        try:
            time.sleep(attempts.delay_after(error))
        except LstmError as final:
            with self._turn:
                fail_all(self._packer.drop_all(), final)
            return self._client.retry.start()
        return attempts

    def _requests(self, generation: int):
        """One call's messages, sent while fewer than max_in_flight are unanswered; gRPC reads them on its own
        thread. Ends (half-closing the call) once closed with nothing left to send."""
        while True:
            with self._turn:
                self._turn.wait_for(lambda: self._generation != generation or self._closed or (
                    self._packer.pending and len(self._packer.in_flight) < self._max_in_flight))
                if self._generation != generation or not self._packer.pending:
                    return
                messages = self._packer.take()
            yield from messages


class MultiplexedSession:
    """An application session stepped through a multiplexer; one step at a time (callers of one session wait
    their turn). State, info and close go to the server directly."""

    def __init__(self, mux, session):
        self._mux = mux
        self._session = session
        self.id = session.id
        self._next_seq = session.next_sequence_number
        self._unsettled: tuple[int, np.ndarray] | None = None  # (seq, steps) lost with the stream: maybe applied
        self._turn = threading.Lock()

    def __enter__(self) -> "MultiplexedSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, x) -> np.ndarray:
        """`x[input]` -> `y[output]`, or `x[T, input]` -> `y[T, output]`."""
        steps, single = as_steps(x)
        with self._turn:
            retried = retry_of(self._unsettled, steps)
            if self._unsettled is not None and retried is None:  # re-sent with its inputs: its number is never reused
                self._mux.step(self.id, *self._unsettled)
            self._unsettled = None
            seq = self._next_seq if retried is None else retried
            try:
                outputs = self._mux.step(self.id, seq, steps)
            except LstmError as error:
                if may_have_applied(error):
                    self._unsettled = (seq, steps)
                    self._next_seq += 0 if retried is not None else 1
                raise
            self._next_seq += 0 if retried is not None else 1
        return outputs[0] if single else outputs

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return self._session.state()

    def close(self) -> None:
        self._session.close()


def retry_of(unsettled: tuple[int, np.ndarray] | None, steps: np.ndarray) -> int | None:
    """The number of the session's step that failed without the server's answer when `steps` repeats its inputs:
    the caller's retry of it, sent under that number (applied once either way). None: a new step."""
    if unsettled is None or not np.array_equal(unsettled[1], steps):
        return None
    return unsettled[0]


def late(timeout: float) -> LstmError:
    """A step unanswered within the client's timeout; it stays queued, and may still be applied."""
    return LstmError(grpc.StatusCode.DEADLINE_EXCEEDED, f"the step was not answered within {timeout} s")


def deliver(results) -> None:
    for step, result in results:
        _settle(step.done, result)


def fail_all(steps, error: Exception) -> None:
    for step in steps:
        _settle(step.done, error)


def _settle(done, result) -> None:
    if done.done():
        return
    if isinstance(result, Exception):
        done.set_exception(result)
    else:
        done.set_result(result)
