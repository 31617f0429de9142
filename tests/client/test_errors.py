"""LstmError's typed fields from the server's details, and retries that never come sooner than RetryInfo asks."""

import grpc
import pytest
from google.rpc import status_pb2
from grpc_status import rpc_status
from lstmserve.v1 import lstm_service_pb2 as pb

from client import LstmError, StepError
from client.messages import step_outputs
from client.resume import RetryPolicy
from server.engine import InvalidInput, LimitExceeded, SequenceError, SessionNotFound, StateUnavailable
from server.transport.details import error_details

pytestmark = pytest.mark.unit


class FailedCall(grpc.RpcError):
    """A failed call as grpc raises it: code, message and trailing metadata (with the server's details)."""

    def __init__(self, code: grpc.StatusCode, error: Exception | None = None, message: str | None = None):
        self._code, self._message = code, str(error) if message is None else message
        self._metadata = ()
        if error is not None:
            status = status_pb2.Status(code=code.value[0], message=self._message, details=error_details(error))
            self._metadata = rpc_status.to_status(status).trailing_metadata

    def code(self):
        return self._code

    def details(self):
        return self._message

    def trailing_metadata(self):
        return self._metadata


def test_every_detail_becomes_a_typed_field():
    rate_limited = LstmError.of(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                           LimitExceeded("too many requests", "rate_limit", 0.75)))
    assert rate_limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and rate_limited.details() == "too many requests"
    assert [v.subject for v in rate_limited.quota_violations] == ["rate_limit"]
    assert rate_limited.retry_after == 0.75
    bad = LstmError.of(FailedCall(grpc.StatusCode.INVALID_ARGUMENT, InvalidInput("wrong", "inputs.shape")))
    assert [v.field for v in bad.field_violations] == ["inputs.shape"] and bad.retry_after is None
    gap = LstmError.of(FailedCall(grpc.StatusCode.FAILED_PRECONDITION, SequenceError("skips ahead", 12)))
    assert gap.expected_sequence_number == 12
    missing = LstmError.of(FailedCall(grpc.StatusCode.NOT_FOUND, SessionNotFound("gone", "A" * 22)))
    assert (missing.resource.resource_type, missing.resource.resource_name) == ("lstmserve.v1.Session", "A" * 22)
    assert rpc_status.from_call(missing).message == "gone"  # the trailing metadata is kept as sent


def test_a_call_without_details_has_empty_fields():
    plain = LstmError.of(FailedCall(grpc.StatusCode.UNAVAILABLE, message="connection refused"))
    assert (plain.retry_after, plain.quota_violations, plain.field_violations, plain.expected_sequence_number,
            plain.resource, plain.error_details) == (None, [], [], None, None, ())


def test_details_that_disagree_with_the_call_are_left_out():
    """Only the server's own status is read: one whose code is not the call's did not come with this answer."""
    forged = FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, LimitExceeded("limit", "rate_limit", 5.0))
    forged._code = grpc.StatusCode.UNAVAILABLE
    assert LstmError.of(forged).retry_after is None


def test_an_in_band_error_is_a_step_error_with_the_same_fields():
    response = pb.StepResponse(session_id="s", sequence_number=4, error=pb.Error(
        code=grpc.StatusCode.FAILED_PRECONDITION.value[0], message="skips ahead",
        details=error_details(SequenceError("skips ahead", 3))))
    with pytest.raises(StepError) as refused:
        step_outputs(response, single=True)
    error = refused.value
    assert (error.code(), error.sequence_number, error.expected_sequence_number) == (
        grpc.StatusCode.FAILED_PRECONDITION, 4, 3)
    assert isinstance(error, LstmError)


POLICY = RetryPolicy(initial_backoff=0.01, max_backoff=0.02, give_up_after=60.0)


def test_a_limit_with_retry_info_is_retried_no_sooner_than_the_server_asks():
    attempts = POLICY.start(timeout=30)
    refusal = FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED, LimitExceeded("slow down", "rate_limit", 0.4))
    assert all(attempts.delay_after(refusal) >= 0.4 for _ in range(20))  # the backoff's jitter is up to 0.02


def test_unavailable_waits_at_least_its_retry_info_too():
    attempts = POLICY.start()
    refusal = FailedCall(grpc.StatusCode.UNAVAILABLE, StateUnavailable("another replica holds it", 1.5))
    assert attempts.delay_after(refusal) >= 1.5


def test_a_limit_without_retry_info_is_final_and_raised_with_its_details():
    attempts = POLICY.start()
    with pytest.raises(LstmError) as raised:
        attempts.delay_after(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        LimitExceeded("the server holds its most sessions", "max_sessions")))
    assert [v.subject for v in raised.value.quota_violations] == ["max_sessions"]


def test_a_server_wait_past_the_deadline_is_raised_as_the_servers_answer():
    """Not DEADLINE_EXCEEDED: the caller learns the limit and how long it would have had to wait."""
    attempts = POLICY.start(timeout=5)
    with pytest.raises(LstmError) as raised:
        attempts.delay_after(FailedCall(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        LimitExceeded("slow down", "rate_limit", 3600.0)))
    assert (raised.value.code(), raised.value.retry_after) == (grpc.StatusCode.RESOURCE_EXHAUSTED, 3600.0)
