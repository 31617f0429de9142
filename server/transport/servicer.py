"""`lstmserve.v1.LstmService`: decode, call the engine, encode. No model or session logic here."""

import asyncio

from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from server.engine import Engine
from server.transport.auth import current_principal
from server.transport.errors import status_for, streaming, unary
from server.transport.messages import optional_tensor, session_info
from server.transport.streams import read_ahead


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
            idle_timeout_seconds=limits.idle_timeout,
            batching=pb.BatchingLimits(
                max_batch_size=limits.max_batch_size, max_batch_delay_seconds=limits.max_batch_delay,
                max_steps_per_request=limits.max_steps_per_request,
                max_sequence_length=limits.max_sequence_length))

    @unary
    async def CreateSession(self, request, context):
        return session_info(await self._create(request))

    @unary
    async def Step(self, request, context):
        session_id, seq, answer = await self._submit_step(request)
        return _step_response(session_id, seq, await answer)

    @streaming
    async def Stream(self, request_iterator, context):
        async def submit_one(request):
            return [await self._submit_step_in_band(request)]

        async for submitted in read_ahead(request_iterator, submit_one, self._stream_window):
            yield await _answer_in_band(*submitted[0])

    @streaming
    async def StreamBatch(self, request_iterator, context):
        async def submit_all(batch):
            return [await self._submit_step_in_band(step) for step in batch.steps]

        async for submitted in read_ahead(request_iterator, submit_all, self._stream_window):
            yield pb.StepBatchResponse(steps=[await _answer_in_band(*s) for s in submitted])

    @unary
    async def Predict(self, request, context):
        outputs, h_n, c_n = await self._engine.predict(
            tensors.from_proto(request.inputs, name="inputs"),
            optional_tensor(request, "h0"), optional_tensor(request, "c0"), owner=current_principal())
        return pb.PredictResponse(outputs=tensors.to_proto(outputs), h_n=tensors.to_proto(h_n),
                                  c_n=tensors.to_proto(c_n))

    @unary
    async def GetSession(self, request, context):
        return session_info(await self._engine.get_session(request.session_id, owner=current_principal()))

    @unary
    async def GetState(self, request, context):
        seq, h, c = await self._engine.get_state(request.session_id, owner=current_principal())
        return pb.SessionState(session_id=request.session_id, last_sequence_number=seq,
                               h=tensors.to_proto(h), c=tensors.to_proto(c))

    @unary
    async def ResetSession(self, request, context):
        owner = current_principal()
        _, done = await self._engine.reset(request.session_id, optional_tensor(request, "h"),
                                           optional_tensor(request, "c"), request.sequence_number, owner=owner)
        await done
        return session_info(await self._engine.get_session(request.session_id, owner=owner))

    @unary
    async def CloseSession(self, request, context):
        await self._engine.close_session(request.session_id, owner=current_principal())
        return pb.CloseSessionResponse()

    # -- helpers --------------------------------------------------------------------------------

    async def _create(self, request: pb.CreateSessionRequest):
        return await self._engine.create_session(optional_tensor(request, "h0"), optional_tensor(request, "c0"),
                                                 owner=current_principal())

    async def _submit_step(self, request: pb.StepRequest):
        """Opens the session if asked, queues the step; returns (session id, sequence number, future)."""
        if request.WhichOneof("target") == "new_session":
            session_id = (await self._create(request.new_session)).session_id
        else:
            session_id = request.session_id
        seq, answer = await self._engine.step(session_id, tensors.from_proto(request.inputs, name="inputs"),
                                              request.sequence_number, owner=current_principal())
        return session_id, seq, answer

    async def _submit_step_in_band(self, request: pb.StepRequest):
        """Like _submit_step, but a rejected request becomes an error answer instead of raising."""
        try:
            return await self._submit_step(request)
        except Exception as error:  # noqa: BLE001 - reported in-band on this request's answer
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(error)
            return request.session_id, request.sequence_number, failed


def _step_response(session_id: str, seq: int, outputs) -> pb.StepResponse:
    return pb.StepResponse(session_id=session_id, sequence_number=seq, outputs=tensors.to_proto(outputs))


async def _answer_in_band(session_id: str, seq: int, answer: asyncio.Future) -> pb.StepResponse:
    try:
        return _step_response(session_id, seq, await answer)
    except Exception as error:  # noqa: BLE001 - one failed request must not end the stream
        code, message = status_for(error)
        return pb.StepResponse(session_id=session_id, sequence_number=seq,
                               error=pb.Error(code=code.value[0], message=message))
