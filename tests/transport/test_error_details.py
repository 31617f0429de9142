"""The google.rpc details built from the engine errors' attributes, and how a refusal carries them."""

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2 as details_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from server.engine import (
    Draining,
    InvalidInput,
    LimitExceeded,
    ModelFailure,
    SequenceError,
    SessionNotFound,
    StateUnavailable,
)
from server.engine.validation import check_tensor
from server.transport.details import error_details
from server.transport.errors import refuse

pytestmark = pytest.mark.unit

DETAIL_TYPES = (details_pb2.QuotaFailure, details_pb2.RetryInfo, details_pb2.BadRequest,
                details_pb2.PreconditionFailure, details_pb2.ResourceInfo)


def unpacked(details) -> list:
    """Each packed detail as its google.rpc message, in order; a type outside DETAIL_TYPES fails the test."""
    messages = []
    for packed in details:
        (kind,) = [kind for kind in DETAIL_TYPES if packed.Is(kind.DESCRIPTOR)]
        message = kind()
        packed.Unpack(message)
        messages.append(message)
    return messages


def test_a_rate_limit_names_its_setting_and_says_when_to_retry():
    quota, retry = unpacked(error_details(LimitExceeded("too many requests", "rate_limit", 0.25)))
    (violation,) = quota.violations
    assert (violation.subject, violation.quota_id, violation.description) == ("rate_limit", "rate_limit",
                                                                              "too many requests")
    assert retry.retry_delay.ToNanoseconds() == 250_000_000


def test_a_limit_that_waiting_does_not_help_has_no_retry_info():
    (quota,) = unpacked(error_details(LimitExceeded("the server holds its most sessions", "max_sessions")))
    assert quota.violations[0].subject == "max_sessions"


def test_a_bad_field_is_named_by_its_path_in_the_request():
    error = InvalidInput("inputs has shape [1, 5], expected [N, 4]", "inputs.shape")
    (bad_request,) = unpacked(error_details(error, "steps[3]."))
    (violation,) = bad_request.field_violations
    assert (violation.field, violation.description) == ("steps[3].inputs.shape", str(error))


@pytest.mark.parametrize("tensor, field", [
    (pb.Tensor(shape=[2, 4], data=b"\0" * 12), "h0.data"),
    (pb.Tensor(shape=[1, 4], values=[1.0]), "h0.values"),
    (pb.Tensor(shape=[1, 4], data=b"\0" * 16, values=[1, 2, 3, 4]), "h0"),
    (pb.Tensor(shape=[1, 1, 1, 1]), "h0.shape"),
    (pb.Tensor(shape=[-1, 4]), "h0.shape"),
])
def test_a_tensor_that_does_not_decode_names_the_part_at_fault(tensor, field):
    with pytest.raises(tensors.TensorFormatError) as refused:
        tensors.from_proto(tensor, name="h0")
    (bad_request,) = unpacked(error_details(refused.value))
    assert bad_request.field_violations[0].field == field


def test_an_invalid_input_that_names_no_field_has_no_bad_request():
    assert error_details(InvalidInput("session X is already live")) == []


def test_a_sequence_refusal_carries_the_number_to_go_on_from():
    (failure,) = unpacked(error_details(SequenceError("sequence number 9 skips ahead; expected 7", 7)))
    (violation,) = failure.violations
    assert (violation.type, violation.subject) == ("SEQUENCE_NUMBER", "7")


def test_a_session_not_found_is_the_id_as_sent_clipped_and_no_owner():
    (resource,) = unpacked(error_details(SessionNotFound("session AAA does not exist", "AAA")))
    assert (resource.resource_type, resource.resource_name, resource.owner) == ("lstmserve.v1.Session", "AAA", "")
    (long_id,) = unpacked(error_details(SessionNotFound("session ... does not exist", "x" * 10_000)))
    assert long_id.resource_name == "x" * 64


@pytest.mark.parametrize("error, seconds", [
    (Draining("the server is shutting down", 0.5), 0.5),
    (StateUnavailable("another replica holds the session", 2.5), 2.5),
])
def test_unavailable_says_when_to_retry(error, seconds):
    (retry,) = unpacked(error_details(error))
    assert retry.retry_delay.ToNanoseconds() == seconds * 1e9


@pytest.mark.parametrize("error", [
    StateUnavailable("the state store is unreachable"),  # it does not know when it will be back
    ModelFailure("the model failed on request 3"),
    SessionNotFound("sequence 'a' is not active"),  # an Open Inference Protocol sequence
    ValueError("a bug"),
])
def test_errors_without_anything_to_add_have_no_details(error):
    assert error_details(error) == []


class Context:
    """The part of grpc.aio.ServicerContext a refusal uses."""

    def __init__(self):
        self.code, self.message, self.trailing_metadata = None, None, None

    def set_code(self, code):
        self.code = code

    def set_details(self, message):
        self.message = message

    def set_trailing_metadata(self, metadata):
        self.trailing_metadata = metadata


class FailedCall:
    """A failed call as a client sees it, from what a refusal set on the context."""

    def __init__(self, context: Context):
        self._context = context

    def code(self):
        return self._context.code

    def details(self):
        return self._context.message

    def trailing_metadata(self):
        return self._context.trailing_metadata


def test_a_refusal_with_details_carries_a_status_that_grpc_status_reads():
    context = Context()
    refuse(context, SequenceError("sequence number 9 skips ahead; expected 7", 7), with_details=True)
    assert context.code == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(FailedCall(context))  # raises if code or message disagree with the call's
    assert status.message == "sequence number 9 skips ahead; expected 7"
    assert unpacked(status.details)[0].violations[0].subject == "7"


def test_a_refusal_without_details_sets_no_trailing_metadata():
    plain, detailed_but_empty = Context(), Context()
    refuse(plain, SequenceError("sequence number 9 skips ahead; expected 7", 7))
    refuse(detailed_but_empty, ModelFailure("the model failed"), with_details=True)
    assert plain.trailing_metadata is None and detailed_but_empty.trailing_metadata is None
    assert plain.code == grpc.StatusCode.FAILED_PRECONDITION and plain.message.startswith("sequence number 9")


def test_an_in_band_error_parses_as_a_google_rpc_status():
    """The Error message is laid out like google.rpc.Status, so a client may read it as one."""
    error = pb.Error(code=3, message="inputs: shape [] needs 4 bytes of float32, got 0",
                     details=error_details(InvalidInput("bad", "inputs.data"), "steps[1]."))
    status = status_pb2.Status.FromString(error.SerializeToString())
    assert (status.code, status.message) == (3, error.message)
    assert unpacked(status.details)[0].field_violations[0].field == "steps[1].inputs.data"


def test_shape_and_value_checks_name_the_field():
    with pytest.raises(InvalidInput) as shape:
        check_tensor("inputs", np.zeros((2, 5), np.float32), (None, 4), allow_nonfinite=False)
    with pytest.raises(InvalidInput) as nonfinite:
        check_tensor("inputs", np.full((2, 4), np.nan, np.float32), (None, 4), allow_nonfinite=False)
    assert (shape.value.field, nonfinite.value.field) == ("inputs.shape", "inputs")
