"""The multiplexers' packing, without I/O: which steps share a StepColumns message, and whose answer is whose."""

import numpy as np
import pytest
from lstmserve import tensors

from client.columns import ColumnStep, Packer

pytestmark = pytest.mark.unit


def step(session_id: str, seq: int, shape: tuple[int, int]) -> ColumnStep:
    return ColumnStep(session_id, seq, np.zeros(shape, np.float32), done=None)


def test_steps_of_one_length_but_another_input_size_go_in_messages_of_their_own():
    packer = Packer(max_entries=8)
    for session_id, shape in (("a", (1, 4)), ("b", (1, 5)), ("c", (1, 4)), ("d", (2, 4))):
        packer.add(step(session_id, 1, shape))
    messages = packer.take()
    assert [(list(m.session_ids), tuple(tensors.from_proto(m.inputs).shape)) for m in messages] == [
        (["a", "c"], (2, 1, 4)), (["b"], (1, 1, 5)), (["d"], (1, 2, 4))]
    assert [[s.session_id for s in chunk] for chunk in packer.in_flight] == [["a", "c"], ["b"], ["d"]]
