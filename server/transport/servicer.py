"""`lstmserve.v1.LstmService`: decode, call the engine, encode. No model or session logic here."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable

from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from server.engine import Engine, InvalidInput, LimitExceeded, StepAnswer
from server.logsafe import CLIP_CHARACTERS
from server.metrics import Metrics
from server.models.registry import ModelRegistry
from server.transport.auth import current_principal
from server.transport.columns import ColumnsStream
from server.transport.errors import streaming_with_details, unary_with_details
from server.transport.messages import (
    ERROR_ANSWER_BYTES,
    error_answer,
    model_info,
    model_status,
    optional_tensor,
    session_info,
)
from server.transport.streams import read_ahead, retrieved

# StreamBatch entries submitted or answered between two yields to the event loop: a message of
# max_batch_entries must not hold up other clients' calls for its whole duration.
BATCH_SLICE = 256
# An answer entry's bytes besides its outputs' payload and its request's session id: tags and lengths, the
# sequence number, the outputs' shape, and room for the id of a session the entry creates.
ANSWER_FRAMING = 72
ENTRY_TAG_AND_LENGTH = 6  # around each answer entry in the StepBatchResponse
# Methods whose handlers may answer with bytes they serialized themselves (see PreEncodedResponses)
PRE_ENCODED = (f"/{pb.DESCRIPTOR.services_by_name['LstmService'].full_name}/Predict",)
_PREDICT_FIELDS = {field.name: field.number for field in pb.PredictResponse.DESCRIPTOR.fields}


class LstmServicer(pb_grpc.LstmServiceServicer):
    def __init__(self, registry: ModelRegistry, metrics: Metrics, stream_window: int, max_batch_entries: int,
                 max_message_bytes: int):
        self._registry = registry
        self._metrics = metrics
        self._stream_window = stream_window  # requests read ahead of the answers sent, per stream
        self._max_batch_entries = max_batch_entries
        self._max_message_bytes = max_message_bytes  # no answer larger than this is built
        self._columns = ColumnsStream(registry, metrics, stream_window, max_batch_entries, max_message_bytes)

    @unary_with_details
    async def GetModelInfo(self, request, context):
        engine = self._registry.engine(request.model_name, request.model_version, new_work=False)
        description = engine.describe()
        return model_info(description.metadata, self._registry.version_of(engine)[1], description.limits,
                          self._max_batch_entries)

    @unary_with_details
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(models=[model_status(status) for status in self._registry.statuses()])

    @unary_with_details
    async def CreateSession(self, request, context):
        engine = self._registry.engine(request.model_name, request.model_version)
        return session_info(await engine.create_session(
            optional_tensor(request, "h0"), optional_tensor(request, "c0"), owner=current_principal()),
            self._registry.version_of(engine))

    @unary_with_details
    async def Step(self, request, context):
        session_id, seq, answer = await self._submit_step(request)
        return _fill_answer(pb.StepResponse(), session_id, seq, await answer)

    @streaming_with_details
    async def Stream(self, request_iterator, context):
        async for submitted in read_ahead(request_iterator, self._submit_step_in_band, self._stream_window,
                                          self._registry.draining, self._registry.draining_refusal,
                                          awaited=lambda submitted: submitted[2]):
            yield await _answer_in_band(pb.StepResponse(), *submitted)

    @streaming_with_details
    async def StreamBatch(self, request_iterator, context):
        """A message too long, or whose answer would be too large, ends the stream before any of it is queued."""
        async def submit_all(batch):
            await self._check_batch(batch)
            submitted = [await self._submit_step_in_band(step, f"steps[{i}].")
                         async for i, step in _in_slices(enumerate(batch.steps))]
            _abandoned(submitted)  # the handler may end between two entries of a message it is answering
            return submitted

        async for submitted in read_ahead(request_iterator, submit_all, self._stream_window,
                                          self._registry.draining, self._registry.draining_refusal):
            response = pb.StepBatchResponse()
            async for step in _in_slices(submitted):  # each answer is built in its place: no per-step copies
                await _answer_in_band(response.steps.add(), *step)
            yield response

    @streaming_with_details
    async def StreamColumns(self, request_iterator, context):
        """The packed form of StreamBatch (server/transport/columns.py)."""
        async for response in self._columns.answer(request_iterator):
            yield response

    @unary_with_details
    async def Predict(self, request, context):
        engine = self._registry.engine(request.model_name, request.model_version)
        outputs, h_n, c_n = await engine.predict(
            tensors.from_proto(request.inputs, name="inputs"),
            optional_tensor(request, "h0"), optional_tensor(request, "c0"), owner=current_principal())
        return tensors.encoded(b"", ((_PREDICT_FIELDS["outputs"], outputs), (_PREDICT_FIELDS["h_n"], h_n),
                                     (_PREDICT_FIELDS["c_n"], c_n)))  # a PredictResponse, see PRE_ENCODED

    @unary_with_details
    async def GetSession(self, request, context):
        engine = await self._registry.engine_of_session(request.session_id, current_principal())
        return session_info(await engine.get_session(request.session_id, owner=current_principal()),
                            self._registry.version_of(engine))

    @unary_with_details
    async def GetState(self, request, context):
        engine = await self._registry.engine_of_session(request.session_id, current_principal())
        seq, h, c = await engine.get_state(request.session_id, owner=current_principal())
        return pb.SessionState(session_id=request.session_id, last_sequence_number=seq,
                               h=tensors.to_proto(h), c=tensors.to_proto(c))

    @unary_with_details
    async def ResetSession(self, request, context):
        engine = await self._registry.engine_of_session(request.session_id, current_principal())
        return session_info(await engine.reset_session(request.session_id, optional_tensor(request, "h"),
                                                       optional_tensor(request, "c"), request.sequence_number,
                                                       owner=current_principal()),
                            self._registry.version_of(engine))

    @unary_with_details
    async def CloseSession(self, request, context):
        engine = await self._registry.engine_of_session(request.session_id, current_principal())
        await engine.close_session(request.session_id, owner=current_principal())
        return pb.CloseSessionResponse()

    # -- helpers --------------------------------------------------------------------------------

    async def _submit_step(self, request: pb.StepRequest):
        """Opens the session if asked, queues the step; returns (session id, sequence number, future)."""
        inputs = tensors.from_proto(request.inputs, name="inputs")
        owner = current_principal()
        if request.WhichOneof("target") != "new_session":
            engine = await self._registry.engine_of_session(request.session_id, owner)
            await self._check_answer_fits(engine, inputs, request.session_id, owner)
            return request.session_id, *await engine.step(request.session_id, inputs, request.sequence_number,
                                                           owner=owner)
        new = request.new_session
        with _fields_of("new_session", "h0", "c0", "model_name"):
            engine = self._registry.engine(new.model_name, new.model_version)
            await self._check_answer_fits(engine, inputs, "", owner)
            return await engine.open_and_step(inputs, optional_tensor(new, "h0"), optional_tensor(new, "c0"),
                                                    request.sequence_number, owner=owner)

    async def _submit_step_in_band(self, request: pb.StepRequest, path: str = ""):
        """Like _submit_step, but a rejected request becomes its error answer instead of raising: a message of
        thousands of bad entries keeps no exception, traceback or future per entry. `path`: where the request
        sits in its message, for the fields its error names."""
        try:
            session_id, seq, answer = await self._submit_step(request)
        except Exception as error:  # noqa: BLE001 - reported in-band on this request's answer
            # the id is echoed so the answer can be matched, but never a huge malformed one in full
            return request.session_id[:CLIP_CHARACTERS], request.sequence_number, error_answer(error, path)
        return session_id, seq, answer

    async def _check_answer_fits(self, engine: Engine, inputs, session_id: str, owner: str) -> None:
        """Refuses a step whose answer would pass max_message_bytes before it is queued: gRPC refuses to send such
        an answer only once the step is applied, and a retry gets the same kept answer. `session_id` "": a new
        session. Another principal's session is not found, as on every other refusal, rather than refused here."""
        description = engine.describe()
        if inputs.ndim != 2 or inputs.shape[1] != description.metadata.input_size or \
                inputs.shape[0] > description.limits.max_steps_per_request:
            return  # the engine refuses it, saying what is wrong with it
        size = ANSWER_FRAMING + len(session_id) + \
            inputs.shape[0] * description.metadata.output_size * tensors.WIRE_DTYPE.itemsize
        if size <= self._max_message_bytes:
            return
        if session_id:
            await engine.get_session(session_id, owner=owner)
        raise self._refusal(
            f"the answer to this step would take about {size} bytes, more than the server's max_message_bytes of "
            f"{self._max_message_bytes}; send fewer time steps per request", "max_message_bytes")

    async def _check_batch(self, batch: pb.StepBatch) -> None:
        """Refuses a StreamBatch message with too many entries, or whose answer would pass max_message_bytes."""
        if len(batch.steps) > self._max_batch_entries:
            raise self._refusal(
                f"this StreamBatch message has {len(batch.steps)} entries, more than the server's max_batch_entries "
                f"of {self._max_batch_entries}; split it into smaller messages", "max_batch_entries")
        estimate = 0
        async for step in _in_slices(batch.steps):
            estimate += self._answer_size_estimate(step)
        if estimate > self._max_message_bytes:
            raise self._refusal(
                f"the answer to this StreamBatch message would take about {estimate} bytes, more than the server's "
                f"max_message_bytes of {self._max_message_bytes}; split it into smaller messages", "max_message_bytes")

    def _answer_size_estimate(self, step: pb.StepRequest) -> int:
        """Bytes of `step`'s answer: its outputs when its inputs look valid, else an error's."""
        shape, engine = step.inputs.shape, self._engine_for_estimate(step)
        framing = ANSWER_FRAMING + len(step.session_id) + ENTRY_TAG_AND_LENGTH
        if engine is None:
            return framing + ERROR_ANSWER_BYTES
        description = engine.describe()
        model = description.metadata
        if len(shape) == 2 and 0 < shape[0] <= description.limits.max_steps_per_request and \
                shape[1] == model.input_size:
            return framing + shape[0] * model.output_size * tensors.WIRE_DTYPE.itemsize
        return framing + ERROR_ANSWER_BYTES

    def _engine_for_estimate(self, step: pb.StepRequest) -> Engine | None:
        """The engine the step would go to, as far as can be told without waiting; None when it would be refused."""
        if step.WhichOneof("target") == "new_session":
            try:
                return self._registry.engine(step.new_session.model_name, step.new_session.model_version)
            except Exception:  # noqa: BLE001 - refused when submitted; here it only needs an error's room
                return None
        try:
            return self._registry.live_engine(step.session_id) or self._registry.engine()
        except Exception:  # noqa: BLE001 - as above
            return None

    def _refusal(self, message: str, limit: str) -> LimitExceeded:
        self._metrics.limit_refusals.labels(limit).inc()
        return LimitExceeded(message, limit)


def _fill_answer(response: pb.StepResponse, session_id: str, seq: int, answer: StepAnswer) -> pb.StepResponse:
    response.session_id = session_id
    response.sequence_number = seq
    tensors.fill(response.outputs, answer.outputs)
    return response


async def _answer_in_band(response: pb.StepResponse, session_id: str, seq: int,
                          answer: asyncio.Future | pb.Error) -> pb.StepResponse:
    """Fills `response` with the answer, or with the error that stands in for it."""
    if isinstance(answer, asyncio.Future):
        try:
            return _fill_answer(response, session_id, seq, await answer)
        except Exception as error:  # noqa: BLE001 - one failed request must not end the stream
            answer = error_answer(error)
    response.session_id, response.sequence_number = session_id, seq
    response.error.CopyFrom(answer)
    return response


@contextlib.contextmanager
def _fields_of(message: str, *fields: str):
    """Refusals naming one of `fields` name it as a field of `message` (`new_session.h0`): the engine names
    its parameters, which are top-level fields of every request but this one."""
    try:
        yield
    except (InvalidInput, tensors.TensorFormatError) as error:
        if error.field and error.field.split(".")[0] in fields:
            error.field = f"{message}.{error.field}"
        raise


def _abandoned(submitted: Iterable) -> None:
    """A StreamBatch message's answers, which its handler may never await all of (the client went away, the server
    stopped): their errors are not worth a log line (asyncio logs a future's exception that nobody retrieved)."""
    for _, _, answer in submitted:
        if isinstance(answer, asyncio.Future):
            answer.add_done_callback(retrieved)


async def _in_slices(items: Iterable) -> AsyncIterator:
    """`items`, yielding to the event loop after every BATCH_SLICE of them."""
    for i, item in enumerate(items):
        if i and i % BATCH_SLICE == 0:
            await asyncio.sleep(0)
        yield item
