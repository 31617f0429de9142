"""The client library's error: a failed call's code and message, with the server's google.rpc error details read
into typed fields (docs/errors.md has the table of codes and details)."""

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2 as details_pb2
from google.rpc import status_pb2
from grpc_status import rpc_status
from lstmserve.details import SEQUENCE_NUMBER_VIOLATION


class LstmError(grpc.RpcError):
    """A failed call (or a streamed request answered with an error), with `code()` and `details()` (the message)
    as gRPC's own errors have them, `trailing_metadata()` as the server sent it, and the error details:

    - `retry_after`: seconds the server asks to wait before a retry (RetryInfo), or None. The library's retries
      never come sooner.
    - `quota_violations`: QuotaFailure violations; each `subject` names the setting that was hit (`rate_limit`).
    - `field_violations`: BadRequest field violations; each `field` is a path in the request
      (`steps[3].inputs.shape`, `new_session.h0.data`).
    - `expected_sequence_number`: the number the session takes next (PreconditionFailure), or None.
    - `resource`: the ResourceInfo of a session not found (its type and the id as sent), or None.
    - `error_details`: every detail as sent (google.protobuf.Any), kinds this library does not read included.
    """

    def __init__(self, code: grpc.StatusCode, message: str, error_details=(), trailing_metadata=()):
        super().__init__(f"{code.name}: {message}")
        self._code, self._message = code, message
        self._trailing_metadata = tuple(trailing_metadata)
        self.error_details: tuple[any_pb2.Any, ...] = tuple(error_details)
        self.retry_after: float | None = None
        self.quota_violations: list[details_pb2.QuotaFailure.Violation] = []
        self.field_violations: list[details_pb2.BadRequest.FieldViolation] = []
        self.expected_sequence_number: int | None = None
        self.resource: details_pb2.ResourceInfo | None = None
        for packed in self.error_details:
            self._read(packed)

    @classmethod
    def of(cls, error: grpc.RpcError) -> "LstmError":
        """`error` as an LstmError, its details read from the call's trailing metadata (`grpc-status-details-bin`).
        Details whose code or message disagree with the call's own (not from the server) are left out."""
        if isinstance(error, LstmError):
            return error
        metadata = error.trailing_metadata() or ()
        try:
            status = rpc_status.from_call(error) or status_pb2.Status()
        except ValueError:
            status = status_pb2.Status()
        return cls(error.code(), error.details() or "", status.details, metadata)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message

    def trailing_metadata(self) -> tuple:
        return self._trailing_metadata

    def _read(self, packed: any_pb2.Any) -> None:
        if packed.Is(details_pb2.RetryInfo.DESCRIPTOR):
            self.retry_after = _unpacked(packed, details_pb2.RetryInfo).retry_delay.ToNanoseconds() / 1e9
        elif packed.Is(details_pb2.QuotaFailure.DESCRIPTOR):
            self.quota_violations.extend(_unpacked(packed, details_pb2.QuotaFailure).violations)
        elif packed.Is(details_pb2.BadRequest.DESCRIPTOR):
            self.field_violations.extend(_unpacked(packed, details_pb2.BadRequest).field_violations)
        elif packed.Is(details_pb2.PreconditionFailure.DESCRIPTOR):
            for violation in _unpacked(packed, details_pb2.PreconditionFailure).violations:
                if violation.type == SEQUENCE_NUMBER_VIOLATION and violation.subject.isdigit():
                    self.expected_sequence_number = int(violation.subject)
        elif packed.Is(details_pb2.ResourceInfo.DESCRIPTOR):
            self.resource = _unpacked(packed, details_pb2.ResourceInfo)


def _unpacked(packed: any_pb2.Any, message_type):
    message = message_type()
    packed.Unpack(message)
    return message
