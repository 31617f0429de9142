"""asyncio client: `async with AsyncLstmClient(addr) as c, c.session() as s: y = await s.step(x)`."""

import asyncio
from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import messages
from client.aio_multiplexer import AsyncMultiplexer
from client.channel import Credentials, open_channel
from client.errors import LstmError
from client.resume import DEFAULT_RETRY, FETCH, RetryPolicy, StreamLedger, applied_before, may_have_applied, take_retry
from client.tracing import trace_metadata


class AsyncLstmClient:
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
        self._channel = open_channel(grpc.aio, address, credentials)
        self.stub = pb_grpc.LstmServiceStub(self._channel)
        self.timeout = timeout
        self.retry = retry
        self._answers_kept: int | None = None

    async def __aenter__(self) -> "AsyncLstmClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def call(self, method, request):
        """A unary call, retried with backoff on UNAVAILABLE or a RetryInfo (every lstmserve call is safe to
        repeat); LstmError when it fails for good."""
        attempts = self.retry.start(self.timeout)
        while True:
            try:
                return await method(request, timeout=attempts.remaining(), metadata=trace_metadata())
            except grpc.RpcError as error:
                await asyncio.sleep(attempts.delay_after(error))

    async def info(self, model: str | None = None) -> pb.ModelInfo:
        request = messages.info_request(self.model if model is None else model)
        return await self.call(self.stub.GetModelInfo, request)

    async def models(self) -> list[pb.ModelVersionStatus]:
        """Every model and version the server knows: state (and why), sizes, live sessions, which is default."""
        return list((await self.call(self.stub.ListModels, pb.ListModelsRequest())).models)

    async def answers_kept(self, model: str | None = None) -> int:
        """How many unanswered requests a resumable stream may have out (the server's answers_kept)."""
        if self._answers_kept is None:
            self._answers_kept = max(1, (await self.info(model)).answers_kept)
        return self._answers_kept

    async def predict(self, inputs, h0=None, c0=None, model: str | None = None) -> messages.Prediction:
        request = messages.predict_request(inputs, h0, c0, self.model if model is None else model)
        return messages.prediction(await self.call(self.stub.Predict, request))

    def multiplexer(self, max_in_flight: int = 2) -> AsyncMultiplexer:
        """Many application sessions stepping over one StreamColumns stream, started by `async with`."""
        return AsyncMultiplexer(self, max_in_flight)

    def session(self, h0=None, c0=None, session_id: str | None = None, model: str | None = None
                ) -> "AsyncSession":
        """A session opened on `async with` (or `await session.open()`) on `model`, closed on leaving it; or
        `session_id` re-attached (on the model version it began on)."""
        return AsyncSession(self, h0, c0, session_id, self.model if model is None else model)


class AsyncSession:
    def __init__(self, client: AsyncLstmClient, h0=None, c0=None, session_id: str | None = None, model: str = ""):
        self._client = client
        self._model = model
        self._initial_state = (h0, c0)
        self.id = session_id
        self._next_seq = 1
        self._unsettled: list[tuple] = []  # (method, request) that may have been applied: as in Session
        self._failed: tuple | None = None  # as in Session
        # a stream whose generator is not closed yet: leaving `async for` does not close it (the garbage
        # collector has it closed later, on the event loop)
        self._open_stream: tuple[StreamLedger, asyncio.Condition] | None = None

    async def __aenter__(self) -> "AsyncSession":
        return await self.open()

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def open(self) -> "AsyncSession":
        await self._client.answers_kept(self._model)  # learnt up front: a stream's deadline covers only the stream
        if self.id is None:
            info = await self._client.call(self._client.stub.CreateSession,
                                           messages.create_request(*self._initial_state, self._model))
        else:
            info = await self._client.call(self._client.stub.GetSession, pb.SessionRef(session_id=self.id))
        self.id, self._next_seq = info.session_id, info.last_sequence_number + 1
        return self

    async def step(self, x) -> np.ndarray:
        await self._end_open_stream()
        request, single = messages.step_request(self.id, self._next_seq, x)
        response = await self._numbered_call(self._client.stub.Step, request)
        return messages.step_outputs(response, single)

    async def stream(self, xs: Iterable, timeout: float | None = None) -> AsyncIterator[np.ndarray]:
        """Streams each x and yields its output as it arrives; resumed after a break like `Session.stream`."""
        await self._settle()
        ledger = StreamLedger(self.id, self._next_seq, xs, await self._client.answers_kept())
        attempts = self._client.retry.start(timeout)
        turn = asyncio.Condition()
        self._open_stream = (ledger, turn)
        call, writer, broken, last_applied = None, None, False, None
        try:
            while not ledger.finished:
                try:
                    if broken:
                        if last_applied is None:
                            last_applied = (await self._client.stub.GetSession(
                                pb.SessionRef(session_id=self.id), timeout=attempts.remaining(),
                                metadata=trace_metadata())).last_sequence_number
                        async with turn:
                            ledger.rewind(last_applied)
                            turn.notify_all()
                    broken, last_applied = True, None  # until the call ends with every request answered
                    call = self._client.stub.Stream(timeout=attempts.remaining(), metadata=trace_metadata())
                    writer = asyncio.create_task(_write(call, ledger, turn))
                    while (response := await call.read()) is not grpc.aio.EOF:
                        async with turn:
                            output = ledger.answer(response)
                            turn.notify_all()
                        attempts.progressed()
                        yield output
                except grpc.RpcError as error:
                    call.cancel()
                    last_applied = applied_before(error)
                    await asyncio.sleep(attempts.delay_after(error))
            if ledger.input_error:
                raise ledger.input_error
        except messages.StepError as error:
            ledger.abandon()
            ledger.next_seq = error.sequence_number  # nothing from there on was applied
            raise
        finally:
            if call:
                call.cancel()
                writer.cancel()
            if self._open_stream and self._open_stream[0] is ledger:  # not taken over by a later request
                await self._end_open_stream()

    @property
    def next_sequence_number(self) -> int:
        """The number this session's next state-changing request takes."""
        return self._next_seq

    async def state(self) -> tuple[np.ndarray, np.ndarray]:
        ref = pb.SessionRef(session_id=self.id)
        return messages.state(await self._client.call(self._client.stub.GetState, ref))

    async def reset(self, h=None, c=None) -> None:
        await self._end_open_stream()
        await self._numbered_call(self._client.stub.ResetSession, messages.reset_request(self.id, self._next_seq, h, c))

    async def info(self) -> pb.SessionInfo:
        return await self._client.call(self._client.stub.GetSession, pb.SessionRef(session_id=self.id))

    async def close(self) -> None:
        await self._client.call(self._client.stub.CloseSession, pb.SessionRef(session_id=self.id))

    async def _end_open_stream(self) -> None:
        """Abandons the stream not closed yet, if any: its unanswered requests are to be settled, and numbering
        goes on after its last."""
        if self._open_stream is None:
            return
        (ledger, turn), self._open_stream = self._open_stream, None
        async with turn:
            self._unsettled = [(self._client.stub.Step, request) for request in ledger.abandon()]
            self._next_seq = ledger.next_seq
            turn.notify_all()  # its writer, if still waiting for room, ends

    async def _settle(self) -> None:
        """Applies, once, what may or may not have been applied (unanswered), so numbering goes on without a gap."""
        await self._end_open_stream()
        while self._unsettled:
            await self._client.call(*self._unsettled[0])
            self._unsettled.pop(0)

    async def _numbered_call(self, method, request):
        """`Session._numbered_call`: a call that failed without the server's answer is settled before the next."""
        retried = take_retry(self._unsettled, self._failed, method, request)
        try:
            await self._settle()  # what failed before it
        except Exception:
            if retried is not None:
                self._unsettled.append(retried)  # still unsettled, still the caller's to retry
            raise
        self._failed = None
        request = request if retried is None else retried[1]
        try:
            response = await self._client.call(method, request)
        except LstmError as error:
            if may_have_applied(error):
                self._failed = (method, request)
                self._unsettled.append(self._failed)
                self._next_seq += 0 if retried is not None else 1
            raise
        self._next_seq += 0 if retried is not None else 1
        return response


async def _write(call, ledger: StreamLedger, turn: asyncio.Condition) -> None:
    """Sends one call's requests while the window has room. A write that fails is not reported here: the
    call's status, read by the caller, says why (an iterator of requests would turn it into INTERNAL)."""
    generation = ledger.generation
    try:
        while True:
            async with turn:
                await turn.wait_for(lambda: ledger.ready(generation))
                request = ledger.next_request(generation)
                if request is FETCH:
                    ledger.queue(ledger.next_input())
                    continue
            if request is None:
                break
            await call.write(request)
        await call.done_writing()
    except (grpc.RpcError, asyncio.InvalidStateError):
        pass
