"""`lstmserve.v1.LstmService`: decode, call the engine, encode. No model or session logic here."""

import asyncio

from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from server.engine import Engine, StepAnswer
from server.transport.auth import current_principal
from server.transport.errors import status_for, streaming, unary
from server.transport.messages import optional_tensor, session_info
from server.transport.streams import read_ahead, refused


class LstmServicer(pb_grpc.LstmServiceServicer):
    def __init__(self, engine: Engine, stream_window: int):
        self._engine = engine
        self._stream_window = stream_window  # requests read ahead of the answers sent, per stream

    @unary
    async def GetModelInfo(self, request, context):
        description = self._engine.describe()
        m, limits = description.metadata, description.limits
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
        return session_info(await self._engine.create_session(
            optional_tensor(request, "h0"), optional_tensor(request, "c0"), owner=current_principal()))

    @unary
    async def Step(self, request, context):
        session_id, seq, answer = await self._submit_step(request)
        return _fill_answer(pb.StepResponse(), session_id, seq, await answer)

    @streaming
    async def Stream(self, request_iterator, context):
        async def submit_one(request):
            return [await self._submit_step_in_band(request)]

        async for submitted in read_ahead(request_iterator, submit_one, self._stream_window, self._engine.draining):
            yield await _answer_in_band(pb.StepResponse(), *submitted[0])

    @streaming
    async def StreamBatch(self, request_iterator, context):
        async def submit_all(batch):
            return [await self._submit_step_in_band(step) for step in batch.steps]

        async for submitted in read_ahead(request_iterator, submit_all, self._stream_window, self._engine.draining):
            response = pb.StepBatchResponse()
            for step in submitted:  # each answer is built in its place: no per-step message copies
                await _answer_in_band(response.steps.add(), *step)
            yield response

    @unary
    async def Predict(self, request, context):
        outputs, h_n, c_n = await self._engine.predict(
            tensors.from_proto(request.inputs, name="inputs"),
            optional_tensor(request, "h0"), optional_tensor(request, "c0"), owner=current_principal())
        response = pb.PredictResponse()
        for field, array in ((response.outputs, outputs), (response.h_n, h_n), (response.c_n, c_n)):
            tensors.fill(field, array)
        return response

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

    async def _submit_step(self, request: pb.StepRequest):
        """Opens the session if asked, queues the step; returns (session id, sequence number, future)."""
        inputs = tensors.from_proto(request.inputs, name="inputs")
        owner = current_principal()
        if request.WhichOneof("target") != "new_session":
            return request.session_id, *await self._engine.step(request.session_id, inputs, request.sequence_number,
                                                                 owner=owner)
        new = request.new_session
        return await self._engine.open_and_step(inputs, optional_tensor(new, "h0"), optional_tensor(new, "c0"),
                                                request.sequence_number, owner=owner)

    async def _submit_step_in_band(self, request: pb.StepRequest):
        """Like _submit_step, but a rejected request becomes an error answer instead of raising."""
        try:
            session_id, seq, answer = await self._submit_step(request)
        except Exception as error:  # noqa: BLE001 - reported in-band on this request's answer
            session_id, seq, answer = request.session_id, request.sequence_number, refused(error)
        # a stream that ends early never awaits its last answers: their errors are not worth a log line
        answer.add_done_callback(lambda done: done.cancelled() or done.exception())
        return session_id, seq, answer


def _fill_answer(response: pb.StepResponse, session_id: str, seq: int, answer: StepAnswer) -> pb.StepResponse:
    response.session_id = session_id
    response.sequence_number = seq
    tensors.fill(response.outputs, answer.outputs)
    return response


async def _answer_in_band(response: pb.StepResponse, session_id: str, seq: int, answer: asyncio.Future
                          ) -> pb.StepResponse:
    """Fills `response` with the answer, or with the error that stands in for it."""
    try:
        return _fill_answer(response, session_id, seq, await answer)
    except Exception as error:  # noqa: BLE001 - one failed request must not end the stream
        code, message = status_for(error)
        response.session_id, response.sequence_number = session_id, seq
        response.error.code, response.error.message = code.value[0], message
        return response
