"""The one table from domain errors to gRPC status codes, applied by one decorator per RPC shape."""

import functools
import logging

import grpc
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from grpc_status import rpc_status
from lstmserve.tensors import TensorFormatError

from server.engine import (
    Draining,
    InvalidInput,
    LimitExceeded,
    ModelFailure,
    ModelNotFound,
    ModelUnavailable,
    SequenceError,
    SessionNotFound,
    StateUnavailable,
    VersionRetired,
)
from server.transport.details import error_details
from server.transport.oip_convert import LoadFailed, RequestFormatError, UnknownModel

log = logging.getLogger(__name__)


class Unauthenticated(Exception):
    """The caller presented no valid credentials; the message says what is missing, never echoes a secret."""


STATUS_BY_ERROR = {
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    TensorFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    RequestFormatError: grpc.StatusCode.INVALID_ARGUMENT,
    UnknownModel: grpc.StatusCode.NOT_FOUND,
    LoadFailed: grpc.StatusCode.INVALID_ARGUMENT,
    DecodeError: grpc.StatusCode.INVALID_ARGUMENT,  # bytes that are not the method's request message
    SessionNotFound: grpc.StatusCode.NOT_FOUND,
    SequenceError: grpc.StatusCode.FAILED_PRECONDITION,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Draining: grpc.StatusCode.UNAVAILABLE,
    ModelFailure: grpc.StatusCode.INTERNAL,
    StateUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    VersionRetired: grpc.StatusCode.FAILED_PRECONDITION,  # before its base class: a retry does not help
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_for(error: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for an error; unexpected ones are logged, never echoed.

    The error is answered from here on, so it loses its traceback (after the log line): the traceback's frames
    hold the request, and often the future that holds the error, a cycle that would keep a refused request in
    memory until the cycle collector ran."""
    for error_type, code in STATUS_BY_ERROR.items():
        if isinstance(error, error_type):
            error.with_traceback(None)
            return code, str(error)
    log.error("unexpected error while serving a request", exc_info=error)
    error.with_traceback(None)
    return grpc.StatusCode.INTERNAL, "internal server error; the details are in the server's log"


def refuse(context, error: Exception, with_details: bool = False) -> None:
    """Ends the call with the error's status once the handler returns. Not context.abort: its AbortError stays
    on the call and its traceback keeps the handlers' frames, the request among their locals, and the context
    in those locals keeps the call, a cycle that held refused 60 MB requests until the cycle collector ran.
    `with_details` (the native API): the error's google.rpc details go along, as the google.rpc.Status in the
    trailing metadata (`grpc-status-details-bin`) that grpc_status.rpc_status.from_call reads."""
    code, message = status_for(error)
    context.set_code(code)
    context.set_details(message)
    if with_details and (details := error_details(error)):
        status = status_pb2.Status(code=code.value[0], message=message, details=details)
        context.set_trailing_metadata(rpc_status.to_status(status).trailing_metadata)


def unary(method, with_details: bool = False):
    """Ends a unary RPC with the mapped status when the handler raises."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            refuse(context, error, with_details)
            return None  # gRPC discards the answer of a call whose code is not OK
    return wrapper


def streaming(method, with_details: bool = False):
    """Ends a streaming RPC with the mapped status when the handler raises (in-band errors never get here)."""
    @functools.wraps(method)
    async def wrapper(self, request_iterator, context):
        try:
            async for response in method(self, request_iterator, context):
                yield response
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            refuse(context, error, with_details)
    return wrapper


# The native API's decorators: its refusals carry the standard error details (the OIP's keep Triton's plain ones).
unary_with_details = functools.partial(unary, with_details=True)
streaming_with_details = functools.partial(streaming, with_details=True)
