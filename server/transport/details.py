"""The standard error details (google.rpc) of the native API's refusals, built from the engine errors' attributes:
what gateways and clients in any language read instead of parsing the message. The Open Inference Protocol keeps
Triton's plain messages."""

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2 as details_pb2
from lstmserve.details import MODEL_VERSION_VIOLATION, SEQUENCE_NUMBER_VIOLATION, SESSION_RESOURCE_TYPE
from lstmserve.tensors import TensorFormatError

from server.engine import (
    Draining,
    InvalidInput,
    LimitExceeded,
    ModelUnavailable,
    SequenceError,
    SessionNotFound,
    StateUnavailable,
    VersionRetired,
)
from server.logsafe import CLIP_CHARACTERS


def error_details(error: Exception, path: str = "") -> list[any_pb2.Any]:
    """The details of `error`, each packed in an Any; none for errors that have none (ModelFailure, unexpected
    ones). `path`: where the refused request sits in its message (`steps[3].`), put before a BadRequest's field."""
    details = []
    for error_types, build in _BUILDERS:
        if isinstance(error, error_types) and (message := build(error, path)) is not None:
            packed = any_pb2.Any()
            packed.Pack(message)
            details.append(packed)
    return details


def _quota_failure(error: LimitExceeded, path: str) -> details_pb2.QuotaFailure:
    return details_pb2.QuotaFailure(violations=[details_pb2.QuotaFailure.Violation(
        subject=error.limit, quota_id=error.limit, description=str(error))])


def _bad_request(error: InvalidInput | TensorFormatError, path: str) -> details_pb2.BadRequest | None:
    if not error.field:
        return None
    return details_pb2.BadRequest(field_violations=[details_pb2.BadRequest.FieldViolation(
        field=path + error.field, description=str(error))])


def _precondition_failure(error: SequenceError, path: str) -> details_pb2.PreconditionFailure:
    return details_pb2.PreconditionFailure(violations=[details_pb2.PreconditionFailure.Violation(
        type=SEQUENCE_NUMBER_VIOLATION, subject=str(error.expected), description=str(error))])


def _resource_info(error: SessionNotFound, path: str) -> details_pb2.ResourceInfo | None:
    """The id as the caller sent it, clipped like an id echoed in an answer. The owner stays empty: whether
    someone else holds a session of that id is nobody else's business."""
    if error.session_id is None:
        return None
    return details_pb2.ResourceInfo(resource_type=SESSION_RESOURCE_TYPE,
                                    resource_name=error.session_id[:CLIP_CHARACTERS], description=str(error))


def _retired_version(error: VersionRetired, path: str) -> details_pb2.PreconditionFailure | None:
    if not error.model:
        return None
    return details_pb2.PreconditionFailure(violations=[details_pb2.PreconditionFailure.Violation(
        type=MODEL_VERSION_VIOLATION, subject=f"{error.model}@{error.version}", description=str(error))])


def _retry_info(error: LimitExceeded | Draining | StateUnavailable | ModelUnavailable, path: str
                ) -> details_pb2.RetryInfo | None:
    if error.retry_after is None:
        return None
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(round(error.retry_after * 1e9))
    return details_pb2.RetryInfo(retry_delay=delay)


_BUILDERS = (
    (LimitExceeded, _quota_failure),
    ((InvalidInput, TensorFormatError), _bad_request),
    (SequenceError, _precondition_failure),
    (SessionNotFound, _resource_info),
    (VersionRetired, _retired_version),
    ((LimitExceeded, Draining, StateUnavailable, ModelUnavailable), _retry_info),
)
