"""The interceptors on a bare grpc.aio server on loopback with hand-written handlers, no engine behind them."""

import asyncio
import contextlib

import grpc
import pytest
from lstmserve.v1 import lstm_service_pb2 as pb
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.transport.interceptors import MalformedRequestInterceptor, MetricsInterceptor

pytestmark = pytest.mark.unit

SERVICE = "probe.Probe"


async def echo(request: bytes, context) -> bytes:
    return request


async def refuse(request: bytes, context) -> bytes:
    await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


async def count(request: bytes, context):
    for i in range(int(request)):
        yield str(i).encode()


async def write(request: bytes, context) -> None:
    """A streaming handler that answers with context.write instead of yielding."""
    for i in range(int(request)):
        await context.write(str(i).encode())


async def hold(request: bytes, context):
    """Answers once, then waits until the client goes away."""
    yield b"first"
    await asyncio.Event().wait()


class Steps:
    """A unary method with a real protobuf request message; remembers what reached it."""

    def __init__(self):
        self.received = []

    async def __call__(self, request: pb.StepRequest, context) -> pb.StepResponse:
        self.received.append(request)
        return pb.StepResponse(session_id=request.session_id)


@contextlib.asynccontextmanager
async def probe_server(*interceptors, steps: Steps | None = None):
    """A grpc.aio server on a free loopback port with the probe methods; yields a channel to it."""
    handlers = {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Refuse": grpc.unary_unary_rpc_method_handler(refuse),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Write": grpc.unary_stream_rpc_method_handler(write),
        "Hold": grpc.unary_stream_rpc_method_handler(hold),
        "Step": grpc.unary_unary_rpc_method_handler(steps or Steps(), pb.StepRequest.FromString,
                                                    pb.StepResponse.SerializeToString),
    }
    server = grpc.aio.server(interceptors=list(interceptors))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(None)


def path(method: str) -> str:
    return f"/{SERVICE}/{method}"


def rpcs(registry: CollectorRegistry, method: str, code: str) -> float:
    return registry.get_sample_value("lstmserve_rpcs_total", {"method": path(method), "code": code}) or 0.0


def timed(registry: CollectorRegistry, method: str) -> float:
    return registry.get_sample_value("lstmserve_rpc_latency_seconds_count", {"method": path(method)}) or 0.0


async def eventually(condition, what: str) -> None:
    """Waits for something the server records after the client already has its answer."""
    async with asyncio.timeout(60):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def test_metrics_count_each_rpc_by_method_and_status_code_and_time_it():
    registry = CollectorRegistry()
    async with probe_server(MetricsInterceptor(Metrics(registry))) as channel:
        assert await channel.unary_unary(path("Echo"))(b"hi") == b"hi"
        assert await channel.unary_unary(path("Echo"))(b"again") == b"again"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await channel.unary_unary(path("Refuse"))(b"")
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert [r async for r in channel.unary_stream(path("Count"))(b"3")] == [b"0", b"1", b"2"]
        assert [r async for r in channel.unary_stream(path("Write"))(b"2")] == [b"0", b"1"]
        await eventually(lambda: timed(registry, "Write") == 1, "the last call is recorded")
    assert (rpcs(registry, "Echo", "OK"), rpcs(registry, "Refuse", "NOT_FOUND"), rpcs(registry, "Refuse", "OK"),
            rpcs(registry, "Count", "OK"), rpcs(registry, "Write", "OK")) == (2, 1, 0, 1, 1)
    assert [timed(registry, m) for m in ("Echo", "Refuse", "Count", "Write")] == [2, 1, 1, 1]


async def test_a_stream_the_client_cancels_is_counted_as_cancelled():
    registry = CollectorRegistry()
    async with probe_server(MetricsInterceptor(Metrics(registry))) as channel:
        call = channel.unary_stream(path("Hold"))(b"")
        assert await call.read() == b"first"
        call.cancel()
        await eventually(lambda: rpcs(registry, "Hold", "CANCELLED") == 1, "the cancelled stream is counted")
    assert rpcs(registry, "Hold", "OK") == 0


async def test_an_unknown_method_is_left_to_grpc_and_not_counted():
    registry = CollectorRegistry()
    async with probe_server(MetricsInterceptor(Metrics(registry))) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(f"/{SERVICE}/Missing")(b"")
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert registry.get_sample_value("lstmserve_rpcs_total", {"method": f"/{SERVICE}/Missing",
                                                               "code": "UNIMPLEMENTED"}) is None


async def test_bytes_that_are_not_the_request_message_are_invalid_argument_and_never_reach_the_handler():
    steps = Steps()
    async with probe_server(MalformedRequestInterceptor(), steps=steps) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await channel.unary_unary(path("Step"))(b"\xff\xff\xff")
        answer = await channel.unary_unary(path("Step"))(pb.StepRequest(session_id="s").SerializeToString())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Error parsing message with type 'lstmserve.v1.StepRequest'" in error.value.details()
    assert [request.session_id for request in steps.received] == ["s"]
    assert pb.StepResponse.FromString(answer).session_id == "s"


async def test_a_malformed_request_is_counted_as_invalid_argument_with_the_servers_interceptor_order():
    registry = CollectorRegistry()
    async with probe_server(MetricsInterceptor(Metrics(registry)), MalformedRequestInterceptor()) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await channel.unary_unary(path("Step"))(b"\xff\xff\xff")
        await eventually(lambda: timed(registry, "Step") == 1, "the refused call is recorded")
    assert rpcs(registry, "Step", "INVALID_ARGUMENT") == 1


async def test_streaming_methods_pass_through_the_malformed_request_interceptor_unchanged():
    async with probe_server(MalformedRequestInterceptor()) as channel:
        assert [r async for r in channel.unary_stream(path("Count"))(b"2")] == [b"0", b"1"]
