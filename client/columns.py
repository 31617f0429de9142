"""What a multiplexer sends and waits for, without I/O: shared by the blocking and the asyncio multiplexers.

Steps of many application sessions wait in `pending`; `take()` packs those of one shape `[T, input]` into StepColumns
messages (one `[N, T, input]` tensor each, at most `max_entries` entries), which wait in `in_flight` until their
answers arrive in order. After a broken stream, `rewind()` puts every unanswered step back in front, to be re-sent
with the same sequence numbers: the server answers a step it already applied from the answers it keeps.
"""

import collections
import dataclasses

import grpc
import numpy as np
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from client.errors import LstmError
from client.messages import StepError


@dataclasses.dataclass(slots=True, eq=False)
class ColumnStep:
    """One application session's step: its inputs `[T, input]`, and what is told its outcome."""

    session_id: str
    seq: int
    inputs: np.ndarray
    done: object  # a future of the outputs `[T, output]` (concurrent.futures or asyncio)

    def __post_init__(self):
        # Refused here: the server refuses a message whose tensor is not [N, T, input] as a whole, ending the
        # stream, and with it every other session's steps in flight.
        if self.inputs.ndim != 2 or not self.inputs.shape[0]:
            raise LstmError(grpc.StatusCode.INVALID_ARGUMENT,
                            f"inputs of shape {list(self.inputs.shape)}: a step is [input] or [T, input], T >= 1")


class Packer:
    def __init__(self, max_entries: int):
        self.max_entries = max_entries
        self.pending: list[ColumnStep] = []
        self.in_flight: collections.deque[list[ColumnStep]] = collections.deque()

    def add(self, step: ColumnStep) -> None:
        self.pending.append(step)

    def take(self) -> list[pb.StepColumns]:
        """Every pending step, packed: one message per shape `[T, input]` (and per max_entries of them), oldest
        first. By the whole shape, not T alone: a step of the wrong input size cannot share a tensor with the
        others, and goes alone, to be refused in-band."""
        by_shape: dict[tuple[int, ...], list[ColumnStep]] = {}
        for step in self.pending:
            by_shape.setdefault(step.inputs.shape, []).append(step)
        self.pending = []
        messages = []
        for steps in by_shape.values():
            for start in range(0, len(steps), self.max_entries):
                chunk = steps[start:start + self.max_entries]
                self.in_flight.append(chunk)
                messages.append(pb.StepColumns(session_ids=[s.session_id for s in chunk],
                                               sequence_numbers=[s.seq for s in chunk],
                                               inputs=tensors.to_proto(np.stack([s.inputs for s in chunk]))))
        return messages

    def answered(self, response: pb.StepColumnsResponse) -> list[tuple[ColumnStep, np.ndarray | StepError]]:
        """The oldest message in flight, answered: each step with its outputs, or the error it was refused with."""
        steps = self.in_flight.popleft()
        outputs = tensors.from_proto(response.outputs, name="outputs")
        results: list = list(outputs)
        for failed in response.errors:
            results[failed.index] = StepError(failed.error, steps[failed.index].seq)
        return list(zip(steps, results, strict=True))

    def rewind(self) -> None:
        """After a broken stream: every step in flight goes back in front of the pending ones, oldest first."""
        unanswered = [step for message in self.in_flight for step in message]
        self.in_flight.clear()
        self.pending = unanswered + self.pending

    def drop_all(self) -> list[ColumnStep]:
        """Every step not answered yet, forgotten (to fail them)."""
        self.rewind()
        steps, self.pending = self.pending, []
        return steps
