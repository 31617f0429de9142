"""Blocking client: `with LstmClient(addr) as c, c.session() as s: y = s.step(x)`."""

import threading
import time
from collections.abc import Iterable, Iterator

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import messages
from client.channel import Credentials, open_channel
from client.errors import LstmError
from client.multiplexer import Multiplexer
from client.resume import DEFAULT_RETRY, FETCH, RetryPolicy, StreamLedger, applied_before, may_have_applied, take_retry
from client.tracing import trace_metadata


class LstmClient:
    """`address`: host:port, several ip:port separated by commas (failover in that order), or a gRPC
    target such as dns:///name:port. `timeout`: seconds per operation, retries included; `retry`:
    backoff on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server says when to retry (never sooner than it
    says); with `credentials` (TLS roots, client certificate, token) the channel is TLS. `model`: "NAME[:VERSION]"
    of the model calls are for (empty: the server's only or default model; no version: its current one), unless
    a call names another. A call that fails for good raises LstmError, with the server's error details.
    """

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = None,
                 retry: RetryPolicy = DEFAULT_RETRY, credentials: Credentials | None = None, model: str = ""):
        messages.model_ref(model)  # a malformed reference fails here, not at the first call
        self.model = model
        self._channel = open_channel(grpc, address, credentials)
        self.stub = pb_grpc.LstmServiceStub(self._channel)
        self.timeout = timeout
        self.retry = retry
        self._answers_kept: int | None = None

    def __enter__(self) -> "LstmClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def call(self, method, request):
        """A unary call, retried with backoff on UNAVAILABLE or a RetryInfo (every lstmserve call is safe to
        repeat); LstmError when it fails for good."""
        attempts = self.retry.start(self.timeout)
        while True:
            try:
                return method(request, timeout=attempts.remaining(), metadata=trace_metadata())
            except grpc.RpcError as error:
                time.sleep(attempts.delay_after(error))

    def info(self, model: str | None = None) -> pb.ModelInfo:
        return self.call(self.stub.GetModelInfo, messages.info_request(self.model if model is None else model))

    def models(self) -> list[pb.ModelVersionStatus]:
        """Every model and version the server knows: state (and why), sizes, live sessions, which is default."""
        return list(self.call(self.stub.ListModels, pb.ListModelsRequest()).models)

    def answers_kept(self, model: str | None = None) -> int:
        """How many unanswered requests a resumable stream may have out (the server's answers_kept)."""
        if self._answers_kept is None:
            self._answers_kept = max(1, self.info(model).answers_kept)
        return self._answers_kept

    def health(self, service: str = "") -> str:
        """The standard gRPC health status by name: SERVING, NOT_SERVING, ..."""
        response = health_pb2_grpc.HealthStub(self._channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self.timeout, metadata=trace_metadata())
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def predict(self, inputs, h0=None, c0=None, model: str | None = None) -> messages.Prediction:
        """Whole sequences `inputs[seq_len, batch, input]`, statelessly, from `(h0, c0)` or zeros."""
        request = messages.predict_request(inputs, h0, c0, self.model if model is None else model)
        return messages.prediction(self.call(self.stub.Predict, request))

    def multiplexer(self, max_in_flight: int = 2) -> Multiplexer:
        """Many application sessions stepping over one StreamColumns stream (see client/multiplexer.py)."""
        return Multiplexer(self, max_in_flight)

    def session(self, h0=None, c0=None, session_id: str | None = None, model: str | None = None) -> "Session":
        """Opens a session (from `(h0, c0)` `[layers, hidden]` or zeros) on `model`, or re-attaches to
        `session_id` (on the model version it began on)."""
        model = self.model if model is None else model
        self.answers_kept(model)  # learnt up front, so a stream's deadline covers only the stream
        if session_id is None:
            info = self.call(self.stub.CreateSession, messages.create_request(h0, c0, model))
        else:
            info = self.call(self.stub.GetSession, pb.SessionRef(session_id=session_id))
        return Session(self, info.session_id, info.last_sequence_number)


class Session:
    """A server-side (h, c) that carries forward across calls; numbers each request for exactly-once."""

    def __init__(self, client: LstmClient, session_id: str, last_sequence_number: int = 0):
        self._client = client
        self.id = session_id
        self._next_seq = last_sequence_number + 1
        # (method, request): numbered requests that may or may not have been applied (left unanswered by an
        # abandoned stream, or failed on a lost connection or a deadline), re-sent before the next one
        self._unsettled: list[tuple] = []
        self._failed: tuple | None = None  # the entry of _unsettled left by the caller's own last call (take_retry)
        # a stream whose generator is not closed yet: one left by `break` while the caller still holds it
        self._open_stream: tuple[StreamLedger, threading.Condition] | None = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, x) -> np.ndarray:
        """`x[input]` -> `y[output]`, or `x[T, input]` -> `y[T, output]`."""
        self._end_open_stream()
        request, single = messages.step_request(self.id, self._next_seq, x)
        response = self._numbered_call(self._client.stub.Step, request)
        return messages.step_outputs(response, single)

    def stream(self, xs: Iterable, timeout: float | None = None) -> Iterator[np.ndarray]:
        """Streams each x (one step `[input]` or a chunk `[T, input]`) and yields its output as it arrives.

        A broken stream is resumed: the client reconnects with backoff and re-sends what was not answered, so
        every output arrives once, in order. `timeout` bounds the whole stream, resumptions included.
        """
        self._settle()
        ledger = StreamLedger(self.id, self._next_seq, xs, self._client.answers_kept())
        attempts = self._client.retry.start(timeout)
        turn, fetching = threading.Condition(), threading.Lock()
        self._open_stream = (ledger, turn)
        call, broken, last_applied = None, False, None
        try:
            while not ledger.finished:
                try:
                    if broken:
                        if last_applied is None:
                            last_applied = self._client.stub.GetSession(
                                pb.SessionRef(session_id=self.id), timeout=attempts.remaining(),
                                metadata=trace_metadata()).last_sequence_number
                        with turn:
                            ledger.rewind(last_applied)
                            turn.notify_all()
                    broken, last_applied = True, None  # until the call ends with every request answered
                    call = self._client.stub.Stream(_requests(ledger, turn, fetching),
                                                    timeout=attempts.remaining(), metadata=trace_metadata())
                    for response in call:
                        with turn:
                            output = ledger.answer(response)
                            turn.notify_all()
                        attempts.progressed()
                        yield output
                except grpc.RpcError as error:
                    call and call.cancel()
                    last_applied = applied_before(error)
                    time.sleep(attempts.delay_after(error))
            if ledger.input_error:
                raise ledger.input_error
        except messages.StepError as error:
            ledger.abandon()
            ledger.next_seq = error.sequence_number  # nothing from there on was applied
            raise
        finally:
            if call:
                call.cancel()
            if self._open_stream and self._open_stream[0] is ledger:  # not taken over by a later request
                self._end_open_stream()

    @property
    def next_sequence_number(self) -> int:
        """The number this session's next state-changing request takes."""
        return self._next_seq

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """`(h, c)`, each `[num_layers, hidden]`, after every step answered so far."""
        ref = pb.SessionRef(session_id=self.id)
        return messages.state(self._client.call(self._client.stub.GetState, ref))

    def reset(self, h=None, c=None) -> None:
        self._end_open_stream()
        request = messages.reset_request(self.id, self._next_seq, h, c)
        self._numbered_call(self._client.stub.ResetSession, request)

    def info(self) -> pb.SessionInfo:
        return self._client.call(self._client.stub.GetSession, pb.SessionRef(session_id=self.id))

    def close(self) -> None:
        self._client.call(self._client.stub.CloseSession, pb.SessionRef(session_id=self.id))

    def _end_open_stream(self) -> None:
        """Abandons the stream not closed yet, if any: its unanswered requests are to be settled, and numbering
        goes on after its last."""
        if self._open_stream is None:
            return
        (ledger, turn), self._open_stream = self._open_stream, None
        with turn:
            # also stops a request generator waiting for room
            self._unsettled = [(self._client.stub.Step, request) for request in ledger.abandon()]
            self._next_seq = ledger.next_seq  # under `turn`: an input read meanwhile is numbered, never sent
            turn.notify_all()

    def _settle(self) -> None:
        """Applies, once, what may or may not have been applied (unanswered), so numbering goes on without a gap."""
        self._end_open_stream()
        while self._unsettled:
            self._client.call(*self._unsettled[0])
            self._unsettled.pop(0)

    def _numbered_call(self, method, request):
        """A state-changing call under the next number (a retry keeps it). If it fails without an answer from
        the server, it may have been applied: it is settled before the next request, which never reuses its
        number with other inputs; the same call again is its retry, under its number (see take_retry)."""
        retried = take_retry(self._unsettled, self._failed, method, request)
        try:
            self._settle()  # what failed before it
        except Exception:
            if retried is not None:
                self._unsettled.append(retried)  # still unsettled, still the caller's to retry
            raise
        self._failed = None
        request = request if retried is None else retried[1]
        try:
            response = self._client.call(method, request)
        except LstmError as error:
            if may_have_applied(error):
                self._failed = (method, request)
                self._unsettled.append(self._failed)
                self._next_seq += 0 if retried is not None else 1
            raise
        self._next_seq += 0 if retried is not None else 1
        return response


def _requests(ledger: StreamLedger, turn: threading.Condition, fetching: threading.Lock):
    """One call's requests, sent while the window has room; gRPC reads them on its own thread."""
    generation = ledger.generation
    while True:
        with turn:
            turn.wait_for(lambda: ledger.ready(generation))
            request = ledger.next_request(generation)
        if request is None:
            return
        if request is FETCH:
            with fetching:  # the caller's inputs may block (a terminal): never while holding `turn`
                x = ledger.next_input()
                with turn:
                    ledger.queue(x)
            continue
        yield request
