"""StreamColumns, the packed multiplexed form: one decode, one engine call and one encode per message (the engine's
side is server/engine/columnar.py)."""

from collections.abc import AsyncIterator

from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from server.engine import ColumnsAnswer, LimitExceeded
from server.metrics import Metrics
from server.models.registry import ModelRegistry
from server.transport.auth import current_principal
from server.transport.messages import ERROR_ANSWER_BYTES, error_answer
from server.transport.streams import read_ahead

# A StepColumnsResponse's bytes besides its outputs' payload and its entries: tags, lengths and the outputs' shape.
COLUMNS_FRAMING = 64
# Per entry, whether it fails or not: its sequence number (a varint of at most 10 bytes), and room for an error
# with its index, tag and length. An answer is sized as if every entry failed: none may be refused for its size
# after its message was taken.
ENTRY_BYTES = 10 + ERROR_ANSWER_BYTES + 16


class ColumnsStream:
    """Answers each StepColumns message of a stream in order, up to `window` of them in flight. A message with
    more than `max_entries` entries, or whose answer could pass `max_message_bytes`, ends the stream with
    RESOURCE_EXHAUSTED before any of it is queued, as on StreamBatch; so does a message whose parts do not line
    up, with INVALID_ARGUMENT. Everything else is per entry, in-band."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, window: int, max_entries: int,
                 max_message_bytes: int):
        self._registry = registry
        self._metrics = metrics
        self._window = window
        self._max_entries = max_entries
        self._max_message_bytes = max_message_bytes

    async def answer(self, request_iterator) -> AsyncIterator[pb.StepColumnsResponse]:
        async for answer in read_ahead(request_iterator, self._submit, self._window, self._registry.draining,
                                       self._registry.draining_refusal, awaited=lambda answer: answer):
            yield _response(await answer)

    async def _submit(self, message: pb.StepColumns):
        self._check_size(message)
        inputs = tensors.from_proto(message.inputs, name="inputs")
        return await self._registry.step_columns(list(message.session_ids), list(message.sequence_numbers), inputs,
                                               owner=current_principal())

    def _check_size(self, message: pb.StepColumns) -> None:
        entries = len(message.session_ids)
        if entries > self._max_entries:
            raise self._refusal(
                f"this StreamColumns message has {entries} entries, more than the server's max_batch_entries of "
                f"{self._max_entries}; split it into smaller messages", "max_batch_entries")
        shape = message.inputs.shape
        steps = shape[1] if len(shape) == 3 else 0
        output_bytes = steps * self._registry.largest_output_size() * tensors.WIRE_DTYPE.itemsize
        estimate = COLUMNS_FRAMING + entries * (output_bytes + ENTRY_BYTES)
        if estimate > self._max_message_bytes:
            raise self._refusal(
                f"the answer to this StreamColumns message could take {estimate} bytes, more than the server's "
                f"max_message_bytes of {self._max_message_bytes}; split it into smaller messages",
                "max_message_bytes")

    def _refusal(self, message: str, limit: str) -> LimitExceeded:
        self._metrics.limit_refusals.labels(limit).inc()
        return LimitExceeded(message, limit)


def _response(answer: ColumnsAnswer) -> pb.StepColumnsResponse:
    response = pb.StepColumnsResponse()
    tensors.fill(response.outputs, answer.outputs)
    response.sequence_numbers.extend(answer.sequence_numbers)
    for index in sorted(answer.errors):
        error_answer(answer.errors[index], answer=response.errors.add(index=index).error)
    return response
