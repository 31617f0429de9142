"""RPC metrics for every method, native or not, recorded in one place; helpers shared by interceptors."""

import inspect
import time
from collections.abc import AsyncIterator, Callable

import grpc

from server.metrics import Metrics

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
            started = time.perf_counter()
            try:
                return await behavior(request, context)
            finally:
                self._record(method, context, started)
        return timed

    def _timed_stream(self, behavior, method: str):
        async def timed(request, context):
            started = time.perf_counter()
            try:
                async for response in responses(behavior, request, context):
                    yield response
            finally:
                self._record(method, context, started)
        return timed

    def _record(self, method: str, context, started: float) -> None:
        code = context.code() or grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else grpc.StatusCode(code).name
        self._metrics.rpcs.labels(method, name).inc()
        self._metrics.rpc_latency.labels(method).observe(time.perf_counter() - started)
