"""`lstmserve.v1.LstmService`: decode, call the engine, encode. No model or session logic here."""

import asyncio

from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from server.engine import Draining, Engine
from server.transport.errors import status_for, streaming, unary
from server.transport.messages import optional_tensor, session_info


class LstmServicer(pb_grpc.LstmServiceServicer):
    def __init__(self, engine: Engine, stream_window: int):
        self._engine = engine
        self._stream_window = stream_window  # requests read ahead of the answers sent, per stream

    @unary
    async def GetModelInfo(self, request, context):
        m, limits = self._engine.runtime.metadata, self._engine.limits
        return pb.ModelInfo(
            name=m.name, version=m.version, input_size=m.input_size, hidden_size=m.hidden_size,
            num_layers=m.num_layers, output_size=m.output_size, dtype=m.dtype,
            idle_timeout_seconds=limits.idle_timeout, answers_kept=limits.answers_kept,
            batching=pb.BatchingLimits(
                max_batch_size=limits.max_batch_size, max_batch_delay_seconds=limits.max_batch_delay,
                max_steps_per_request=limits.max_steps_per_request,
                max_sequence_length=limits.max_sequence_length))

    @unary
    async def CreateSession(self, request, context):
        return session_info(self._create(request))

    @unary
    async def Step(self, request, context):
        session_id, seq, answer = self._submit_step(request)
        return _step_response(session_id, seq, await answer)

    @streaming
    async def Stream(self, request_iterator, context):
        async for submitted in self._read_ahead(request_iterator, lambda r: [self._submit_step_in_band(r)]):
            yield await _answer_in_band(*submitted[0])

    @streaming
    async def StreamBatch(self, request_iterator, context):
        def submit_all(batch):
            return [self._submit_step_in_band(step) for step in batch.steps]

        async for submitted in self._read_ahead(request_iterator, submit_all):
            yield pb.StepBatchResponse(steps=[await _answer_in_band(*s) for s in submitted])

    @unary
    async def Predict(self, request, context):
        outputs, h_n, c_n = await self._engine.predict(
            tensors.from_proto(request.inputs, name="inputs"),
            optional_tensor(request, "h0"), optional_tensor(request, "c0"))
        return pb.PredictResponse(outputs=tensors.to_proto(outputs), h_n=tensors.to_proto(h_n),
                                  c_n=tensors.to_proto(c_n))

    @unary
    async def GetSession(self, request, context):
        return session_info(self._engine.get_session(request.session_id))

    @unary
    async def GetState(self, request, context):
        seq, h, c = self._engine.get_state(request.session_id)
        return pb.SessionState(session_id=request.session_id, last_sequence_number=seq,
                               h=tensors.to_proto(h), c=tensors.to_proto(c))

    @unary
    async def ResetSession(self, request, context):
        _, done = self._engine.reset(request.session_id, optional_tensor(request, "h"),
                                     optional_tensor(request, "c"), request.sequence_number)
        await done
        return session_info(self._engine.get_session(request.session_id))

    @unary
    async def CloseSession(self, request, context):
        self._engine.close_session(request.session_id)
        return pb.CloseSessionResponse()

    # -- helpers --------------------------------------------------------------------------------

    def _create(self, request: pb.CreateSessionRequest):
        return self._engine.create_session(optional_tensor(request, "h0"), optional_tensor(request, "c0"))

    def _submit_step(self, request: pb.StepRequest):
        """Opens the session if asked, queues the step; returns (session id, sequence number, future)."""
        inputs = tensors.from_proto(request.inputs, name="inputs")
        if request.WhichOneof("target") != "new_session":
            return request.session_id, *self._engine.step(request.session_id, inputs, request.sequence_number)
        session_id = self._create(request.new_session).session_id
        try:
            return session_id, *self._engine.step(session_id, inputs, request.sequence_number)
        except Exception:
            self._engine.close_session(session_id)  # a rejected request leaves no session behind
            raise

    def _submit_step_in_band(self, request: pb.StepRequest):
        """Like _submit_step, but a rejected request becomes an error answer instead of raising."""
        try:
            session_id, seq, answer = self._submit_step(request)
        except Exception as error:  # noqa: BLE001 - reported in-band on this request's answer
            session_id, seq = request.session_id, request.sequence_number
            answer = asyncio.get_running_loop().create_future()
            answer.set_exception(error)
        # a stream that ends early never awaits its last answers: their errors are not worth a log line
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        return session_id, seq, answer

    async def _read_ahead(self, request_iterator, submit):
        """Yields each request's submissions in order while reading up to `stream_window` requests ahead.

        When the server starts draining it stops reading, answers what it took, and ends the stream with
        UNAVAILABLE, so a client resumes elsewhere instead of waiting for the shutdown grace to run out.
        """
        submitted: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self._stream_window)
        done = object()

        async def read():
            try:
                async for request in request_iterator:
                    await window.acquire()
                    submitted.put_nowait(submit(request))
            finally:
                submitted.put_nowait(done)

        async def stop_reading_on_drain():
            await self._engine.draining.wait()
            reader.cancel()

        reader = asyncio.create_task(read())
        watcher = asyncio.create_task(stop_reading_on_drain())
        try:
            while (item := await submitted.get()) is not done:
                yield item
                window.release()
            if reader.cancelled():
                raise Draining("the server is shutting down; reconnect and resume on another replica")
            await reader  # re-raises a failure to read the stream
        finally:
            reader.cancel()
            watcher.cancel()


def _step_response(session_id: str, seq: int, outputs) -> pb.StepResponse:
    return pb.StepResponse(session_id=session_id, sequence_number=seq, outputs=tensors.to_proto(outputs))


async def _answer_in_band(session_id: str, seq: int, answer: asyncio.Future) -> pb.StepResponse:
    try:
        return _step_response(session_id, seq, await answer)
    except Exception as error:  # noqa: BLE001 - one failed request must not end the stream
        code, message = status_for(error)
        return pb.StepResponse(session_id=session_id, sequence_number=seq,
                               error=pb.Error(code=code.value[0], message=message))
