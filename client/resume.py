"""Retries and stream resumption, shared by the blocking and the asyncio clients.

Both clients run the same loop around these pieces; only how they wait (threads or the event loop) differs.
"""

import collections
import dataclasses
import random
import time

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb

from client.errors import LstmError
from client.messages import StepError, as_steps, step_outputs, step_request

# Not applied, or answered again on retry. CANCELLED: a stopping server cancels the calls it still has
# (this client cancels only calls it has given up on, and never retries those).
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})
# grpc.aio reports a write on a broken connection with this status made up on the client, not UNAVAILABLE
_AIO_BROKEN_WRITE = (grpc.StatusCode.INTERNAL, "Internal error from Core")


def retryable(error: LstmError) -> bool:
    """Also a limit the server says waiting helps with (RetryInfo: a rate limit, a full queue): nothing of a
    refused request was applied."""
    return error.code() in RETRYABLE or (error.code(), error.details()) == _AIO_BROKEN_WRITE or (
        error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None)


def applied_before(error: grpc.RpcError) -> int | None:
    """The session's last applied number when the error that broke a stream tells it: an in-band refusal of
    request n (answers come in order) means every request before n was answered, and none from n on was applied
    (each later one is a gap). None: ask the server. Not asking matters under a rate limit, where GetSession would
    take the token the retry waited for, and the re-sent request would be refused again."""
    return error.sequence_number - 1 if isinstance(error, StepError) else None


def may_have_applied(error: LstmError) -> bool:
    """Whether a state-changing request that failed for good may have been applied all the same: the client
    stopped waiting (its deadline) or lost the connection, rather than the server refusing it (a StepError is
    the server's answer, in-band)."""
    if isinstance(error, StepError):
        return False
    return error.code() == grpc.StatusCode.DEADLINE_EXCEEDED or (
        retryable(error) and error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED)


def take_retry(unsettled: list[tuple], failed: tuple | None, method, request) -> tuple | None:
    """`failed`, the `(method, request)` of the caller's last call that failed without the server's answer, taken out
    of `unsettled` when `request` repeats it (same call and inputs, under a later number): the caller's retry of it.
    It is sent under its own number, so it applies once whether or not the failed call was applied. Only that call
    can be retried so: what an abandoned stream left unsettled was never the caller's to retry, and a new step with
    the same inputs as one of those is a new step. None when `request` is new."""
    if failed is None or not unsettled or unsettled[-1] is not failed or failed[0] is not method:
        return None
    earlier = type(request)()
    earlier.CopyFrom(failed[1])
    earlier.sequence_number = request.sequence_number
    return unsettled.pop() if earlier == request else None


def lost_steps(details: str) -> LstmError:
    """The server's session is behind what this client saw acknowledged (e.g. an old snapshot restored)."""
    return LstmError(grpc.StatusCode.DATA_LOSS, details)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full jitter for UNAVAILABLE (and RESOURCE_EXHAUSTED with a RetryInfo), never
    sooner than the server's RetryInfo asks; `give_up_after` seconds without progress."""

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    give_up_after: float = 60.0

    def start(self, timeout: float | None = None) -> "Attempts":
        return Attempts(self, None if timeout is None else time.monotonic() + timeout)


DEFAULT_RETRY = RetryPolicy()


class Attempts:
    """The retries of one operation: how long to wait before the next try, or the error to give up with."""

    def __init__(self, policy: RetryPolicy, deadline: float | None):
        self._policy = policy
        self._deadline = deadline
        self.progressed()

    def progressed(self) -> None:
        """The operation moved forward (e.g. an answer arrived): back off from the start again."""
        self._backoff = self._policy.initial_backoff
        self._give_up_at = time.monotonic() + self._policy.give_up_after

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline (None: no deadline), for the next call's timeout."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def delay_after(self, error: grpc.RpcError) -> float:
        """Seconds to wait before retrying after `error`, at least the server's RetryInfo; raises it, as an
        LstmError with its details, when it is final or time is up (also when the server's wait alone would
        outlast the deadline: its answer, with that wait, says more than DEADLINE_EXCEEDED)."""
        error = LstmError.of(error)
        server_wait = error.retry_after or 0.0
        if not retryable(error) or self._outlasts(server_wait):
            raise error
        delay = max(random.uniform(0, self._backoff), server_wait)
        self._backoff = min(self._backoff * self._policy.multiplier, self._policy.max_backoff)
        if self._deadline is not None and time.monotonic() + delay >= self._deadline:
            raise LstmError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"deadline reached while retrying after {error.code().name}: {error.details()}",
            )
        if time.monotonic() + delay >= self._give_up_at:
            raise error
        return delay

    def _outlasts(self, wait: float) -> bool:
        """Whether waiting `wait` seconds would pass the deadline or the time to give up."""
        ends = self._give_up_at if self._deadline is None else min(self._deadline, self._give_up_at)
        return wait > 0 and time.monotonic() + wait >= ends


FETCH = object()  # StreamLedger.next_request: read the caller's next input first


class StreamLedger:
    """One session's stream: numbers its requests and keeps those not yet answered, to re-send after a break.

    A request is *unanswered* once handed to a call and until its answer arrives; after a break, `rewind`
    queues every unanswered request again, oldest first. Re-sending one the server already applied is safe:
    the server answers it from the answers it keeps (`answers_kept`), so the window of unanswered requests
    never exceeds that. `generation` counts breaks, so a dead call's request generator knows to stop.
    """

    def __init__(self, session_id: str, first_seq: int, xs, window: int):
        self._session_id = session_id
        self._inputs = iter(xs)
        self.next_seq = first_seq
        self.window = window
        self.generation = 0
        self.exhausted = False
        self.input_error: Exception | None = None  # what reading the caller's inputs raised: it ends them
        self._to_send: collections.deque = collections.deque()  # (seq, request, single), numbered, not sent
        self._unanswered: collections.deque = collections.deque()  # sent on the current call

    @property
    def finished(self) -> bool:
        return self.exhausted and not self._to_send and not self._unanswered

    def ready(self, generation: int) -> bool:
        """Whether the request generator of call `generation` can go on: a break, or room in the window."""
        return generation != self.generation or len(self._unanswered) < self.window

    def next_request(self, generation: int):
        """Once ready: the request to send, FETCH when an input is needed, or None when the call is done."""
        if generation != self.generation or (self.exhausted and not self._to_send):
            return None
        return self.take() if self._to_send else FETCH

    def next_input(self) -> tuple[np.ndarray, bool] | None:
        """The caller's next input as `as_steps` has it, or None at the end. Kept apart from `queue` because it
        may block (inputs read from a terminal), and must not hold up answers meanwhile. An error the inputs
        raise, or an input that is not numbers, ends them, to be raised to the caller once the earlier inputs are
        answered: raised here, on the thread or task that writes the requests, it would end the call as
        UNKNOWN, or be lost."""
        try:
            x = next(self._inputs, None)
            return None if x is None else as_steps(x)
        except Exception as error:
            self.input_error = error
            return None

    def queue(self, steps: tuple[np.ndarray, bool] | None) -> None:
        """Numbers an input from `next_input` (None: the end of the inputs) and queues its request."""
        if steps is None:
            self.exhausted = True
            return
        request, _ = step_request(self._session_id, self.next_seq, steps[0])
        self._to_send.append((self.next_seq, request, steps[1]))
        self.next_seq += 1

    def take(self) -> pb.StepRequest:
        """The oldest queued request, now unanswered on the current call."""
        entry = self._to_send.popleft()
        self._unanswered.append(entry)
        return entry[1]

    def answer(self, response: pb.StepResponse) -> np.ndarray:
        """Outputs for the oldest unanswered request; StepError when the server answered it with an error."""
        seq, _, single = self._unanswered[0]
        if response.sequence_number != seq:
            raise lost_steps(f"answer for request {response.sequence_number} arrived when {seq} was expected")
        outputs = step_outputs(response, single)
        self._unanswered.popleft()
        return outputs

    def rewind(self, last_applied: int) -> None:
        """After a break, given the server's last applied number: queue every unanswered request again."""
        pending = self._unanswered + self._to_send
        first = pending[0][0] if pending else self.next_seq
        if last_applied < first - 1:
            raise lost_steps(
                f"session {self._session_id} has applied up to request {last_applied}, but request "
                f"{first - 1} was acknowledged; the server lost acknowledged steps"
            )
        self._to_send, self._unanswered = pending, collections.deque()
        self.generation += 1

    def abandon(self) -> list[pb.StepRequest]:
        """Ends the stream early: the requests numbered and not answered, which the session must still settle
        (re-sent with their numbers, they are applied once, whether or not the server got them before)."""
        self.generation += 1
        pending = [request for _, request, _ in self._unanswered + self._to_send]
        self._unanswered.clear()
        self._to_send.clear()
        return pending
