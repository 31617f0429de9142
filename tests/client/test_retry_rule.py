"""Which call is the caller's retry of one that failed without the server's answer (take_retry, retry_of)."""

import numpy as np
import pytest
from lstmserve.v1 import lstm_service_pb2 as pb

from client import messages
from client.multiplexer import retry_of
from client.resume import take_retry

pytestmark = pytest.mark.unit

STEP, RESET = object(), object()  # stand-ins for the stub's methods: only their identity counts


def step(seq: int, x) -> pb.StepRequest:
    return messages.step_request("s", seq, np.asarray(x, np.float32))[0]


def test_the_same_call_again_is_the_retry_of_the_failed_one_and_keeps_its_number():
    failed = (STEP, step(7, [1, 2]))
    unsettled = [(STEP, step(6, [0, 0])), failed]
    assert take_retry(unsettled, failed, STEP, step(8, [1, 2])) is failed
    assert unsettled == [(STEP, step(6, [0, 0]))]  # the earlier one is still settled first


@pytest.mark.parametrize("method, x", [(STEP, [1, 3]), (RESET, [1, 2])])
def test_another_call_or_other_inputs_is_a_new_request(method, x):
    failed = (STEP, step(7, [1, 2]))
    unsettled = [failed]
    assert take_retry(unsettled, failed, method, step(8, x)) is None
    assert unsettled == [failed]


def test_what_an_abandoned_stream_left_is_never_taken_for_a_retry():
    """A step after a stream left by `break` may repeat the stream's last input (zeros, a constant sensor): it is a
    new step, and the stream's unanswered requests are settled before it."""
    leftovers = [(STEP, step(5, [0, 0])), (STEP, step(6, [0, 0]))]
    assert take_retry(list(leftovers), None, STEP, step(7, [0, 0])) is None


def test_a_multiplexed_step_repeating_the_failed_one_takes_its_number():
    failed = (4, np.array([[1, 2]], np.float32))
    assert retry_of(failed, np.array([[1, 2]], np.float32)) == 4
    assert retry_of(failed, np.array([[1, 3]], np.float32)) is None
    assert retry_of(failed, np.array([[1, 2], [1, 2]], np.float32)) is None
    assert retry_of(None, np.array([[1, 2]], np.float32)) is None
