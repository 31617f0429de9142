"""The per-step code paths tuned with bench/: validation, the wire codec, the state pool, oneDNN choice."""

import numpy as np
import pytest
import torch
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from server.engine.errors import InvalidInput
from server.engine.state_pool import StatePool
from server.engine.validation import check_tensor
from server.model import ModelRuntime
from server.model.export import build_module
from tests.conftest import export_model

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_tensor_rejects_any_non_finite_element(bad):
    array = np.zeros((3, 4), np.float32)
    array[2, 1] = bad
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        check_tensor("inputs", array, (None, 4), allow_nonfinite=False)
    check_tensor("inputs", array, (None, 4), allow_nonfinite=True)


def test_check_tensor_accepts_the_largest_float32_values():
    """A float32 sum of these would overflow to inf; the check must not mistake them for non-finite."""
    big = np.finfo(np.float32).max
    check_tensor("inputs", np.array([[big, big, -big, big]], np.float32), (None, 4), allow_nonfinite=False)


@pytest.mark.parametrize("shape", [(4,), (2, 5), (1, 2, 4)])
def test_check_tensor_rejects_wrong_shapes(shape):
    with pytest.raises(InvalidInput, match="expected \\[N, 4\\]"):
        check_tensor("inputs", np.zeros(shape, np.float32), (None, 4), allow_nonfinite=False)


def test_fill_writes_a_response_field_in_place_as_to_proto_would():
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    response = pb.StepResponse(session_id="s")
    tensors.fill(response.outputs, array)
    assert response.outputs == tensors.to_proto(array)
    np.testing.assert_array_equal(tensors.from_proto(response.outputs), array)


def test_state_pool_keeps_every_written_slot_across_growth():
    """Slots start uninitialised (never read before written): growth must carry written ones over exactly."""
    pool = StatePool(num_layers=2, hidden_size=3, initial_capacity=2, max_capacity=64)
    states = {}
    for i in range(37):  # grows 2 -> 4 -> ... -> 64
        h, c = torch.full((2, 3), float(i)), torch.full((2, 3), -float(i))
        states[pool.allocate(h, c)] = (h, c)
    assert pool.capacity == 64
    slots = torch.tensor(sorted(states))
    h, c = pool.gather(slots)
    for column, slot in enumerate(slots.tolist()):
        torch.testing.assert_close(h[:, column], states[slot][0], rtol=0, atol=0)
        torch.testing.assert_close(c[:, column], states[slot][1], rtol=0, atol=0)
    read_h, _ = pool.read(int(slots[0]))
    read_h += 1  # a read is a copy: changing it leaves the pool alone
    torch.testing.assert_close(pool.read(int(slots[0]))[0], states[int(slots[0])][0], rtol=0, atol=0)


@pytest.mark.parametrize("steps, batch", [(1, 1), (1, 300), (7, 3)])
def test_runtime_matches_the_module_on_both_onednn_paths(tmp_path, steps, batch):
    """Single steps run with oneDNN off and sequences with it on; both must equal the module."""
    path, _ = export_model(tmp_path, "m", 5, 8, 2, seed=3)
    reference = build_module(5, 8, 2, seed=3).eval()  # the eager module the file was scripted from
    runtime = ModelRuntime.load(path)
    x = torch.randn(steps, batch, 5)
    h, c = torch.randn(2, batch, 8), torch.randn(2, batch, 8)
    y, h_n, c_n = runtime.run(x, h, c)
    with torch.no_grad():
        want_y, (want_h, want_c) = reference(x, (h, c))
    for got, want in ((y, want_y), (h_n, want_h), (c_n, want_c)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
