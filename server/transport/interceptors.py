"""Interceptors for every method, native or not: RPC metrics, malformed unary requests as bad input, and
responses that their handler serialized itself."""

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from server.metrics import Metrics
from server.transport.errors import refuse

_HANDLER_KINDS = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler, False),
    ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
    ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
    ("stream_stream", grpc.stream_stream_rpc_method_handler, True),
)


def wrap_handler(handler: grpc.RpcMethodHandler, wrap_unary: Callable, wrap_streaming: Callable):
    """`handler` with its behavior wrapped: by `wrap_unary` when it answers once, else by `wrap_streaming`."""
    for kind, make_handler, streaming in _HANDLER_KINDS:
        behavior = getattr(handler, kind)
        if behavior:
            wrapped = (wrap_streaming if streaming else wrap_unary)(behavior)
            return make_handler(wrapped, handler.request_deserializer, handler.response_serializer)
    raise ValueError(f"unknown kind of RPC method handler: {handler!r}")


async def responses(behavior, request, context) -> AsyncIterator:
    """A streaming behavior's responses, be it an async generator or a coroutine using context.write."""
    result = behavior(request, context)
    if inspect.isasyncgen(result):
        async for response in result:
            yield response
    else:
        await result


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts RPCs by method and status code and times them."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return wrap_handler(handler, lambda behavior: self._timed(behavior, method),
                            lambda behavior: self._timed_stream(behavior, method))

    def _timed(self, behavior, method: str):
        async def timed(request, context):
            started, cancelled = time.perf_counter(), False
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                self._record(method, context, started, cancelled)
        return timed

    def _timed_stream(self, behavior, method: str):
        async def timed(request, context):
            started, cancelled = time.perf_counter(), False
            try:
                async for response in responses(behavior, request, context):
                    yield response
            except asyncio.CancelledError:
                cancelled = True
                raise
            finally:
                self._record(method, context, started, cancelled)
        return timed

    def _record(self, method: str, context, started: float, cancelled: bool) -> None:
        """A handler cancelled by gRPC (deadline, broken connection) has no code: count it as CANCELLED."""
        code = context.code() or (grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.OK)
        name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
        self._metrics.rpcs.labels(method, name).inc()
        self._metrics.rpc_latency.labels(method).observe(time.perf_counter() - started)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Answers a unary request that does not parse as INVALID_ARGUMENT, not gRPC's UNKNOWN.

    gRPC parses a unary request before the handler runs; streamed requests are parsed as the handler reads
    them, so the streaming decorator maps those.
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler.unary_unary:
            return handler
        parse, behavior = handler.request_deserializer, handler.unary_unary

        def parse_or_keep_error(data: bytes):
            try:
                return parse(data)
            except DecodeError as error:
                return error

        async def reject_malformed(request, context):
            if isinstance(request, DecodeError):
                refuse(context, request)
                return None
            return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(reject_malformed, parse_or_keep_error,
                                                   handler.response_serializer)


class PreEncodedResponses(grpc.aio.ServerInterceptor):
    """Lets the handlers of `methods` answer with bytes they serialized themselves (see lstmserve.tensors.encoded),
    sent as they are: serialising a message holding megabytes copies them twice more. Their message objects are
    serialized as usual. Last among the interceptors, so every other one wraps the handler it returns."""

    def __init__(self, methods: tuple[str, ...]):
        self._methods = frozenset(methods)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self._methods:
            return handler
        serialize = handler.response_serializer

        def as_is_or_serialized(response) -> bytes:
            return response if type(response) is bytes else serialize(response)

        for kind, make_handler, _ in _HANDLER_KINDS:
            if behavior := getattr(handler, kind):
                return make_handler(behavior, handler.request_deserializer, as_is_or_serialized)
        raise ValueError(f"unknown kind of RPC method handler: {handler!r}")
