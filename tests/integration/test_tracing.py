"""OpenTelemetry tracing of a real server, as an in-process OTLP/gRPC collector receives it: a server span per
RPC continuing the client's trace, queue-wait and model-call spans per request, batch spans linked to the
requests they served, and nothing that identifies a session or quotes a tensor. Off, tracing loads nothing."""

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import threading
from concurrent import futures

import grpc
import numpy as np
import pytest
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.trace import TracerProvider

from client import AsyncLstmClient, LstmClient
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

# Input values exact in float32 and unlikely anywhere else: a trace that quoted a tensor would show them.
STEP_VALUE, STREAM_VALUE, PREDICT_VALUE = 0.3779296875, 0.6650390625, 0.1259765625
SERVICE = "/lstmserve.v1.LstmService/"
# A caller's context as W3C trace context sends it, with no client library: version, trace id, span id, sampled.
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """The collector's trace service, keeping every export it is sent."""

    def __init__(self):
        self.exports: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request, context):
        with self._lock:
            self.exports.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[Span]:
        return [span for export in self.exports for resource in export.resource_spans
                for scope in resource.scope_spans for span in scope.spans]


@contextlib.contextmanager
def otlp_collector():
    """A Collector on 127.0.0.1 and its endpoint URL."""
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield collector, f"http://127.0.0.1:{port}"
    finally:
        server.stop(None)


@dataclasses.dataclass
class TracedRun:
    collector: Collector
    application: trace.SpanContext  # the client application's span every call was made in
    session_ids: list[str]

    def spans(self, name: str | None = None, parent: Span | None = None) -> list[Span]:
        return [s for s in self.collector.spans() if (name is None or s.name == name)
                and (parent is None or (s.trace_id, s.parent_span_id) == (parent.trace_id, parent.span_id))]

    def server_spans(self, method: str) -> list[Span]:
        return [s for s in self.spans(SERVICE + method) if s.kind == Span.SPAN_KIND_SERVER]


@pytest.fixture(scope="module")
def traced_run(demo_model) -> TracedRun:
    """A traced server's spans of a client application's calls, made under a span of the application's own
    tracer: sessions, steps, a stream, a prediction, an asyncio client's step and a step to a closed session.
    The server's stop exports the spans still batched."""
    tracer = TracerProvider().get_tracer("application")  # the application's tracer, not the process-wide one
    with otlp_collector() as (collector, endpoint), tracer.start_as_current_span("application") as application:
        with server_in_thread(demo_model, otlp_endpoint=endpoint) as server:
            with LstmClient(server.address, timeout=30) as client:
                with client.session() as session:
                    for _ in range(3):
                        session.step(np.full(4, STEP_VALUE, np.float32))
                    list(session.stream([np.full(4, STREAM_VALUE, np.float32)] * 3))
                client.predict(np.full((5, 2, 4), PREDICT_VALUE, np.float32))
                with pytest.raises(grpc.RpcError) as closed:
                    session.step(np.full(4, STEP_VALUE, np.float32))
                assert closed.value.code() == grpc.StatusCode.NOT_FOUND
            async_session_id = asyncio.run(_async_step(server.address))
            batched_session_ids = _stream_batch(server.address)
        return TracedRun(collector, application.get_span_context(),
                         [session.id, async_session_id, *batched_session_ids])


async def _async_step(address: str) -> str:
    """One step of a new session with the asyncio client; the session's id."""
    async with AsyncLstmClient(address, timeout=30) as client, client.session() as session:
        await session.step(np.full(4, STEP_VALUE, np.float32))
        return session.id


def _stream_batch(address: str) -> list[str]:
    """A StreamBatch message of two steps, each opening a session, sent with a W3C traceparent of its own;
    the sessions' ids."""
    step = pb.StepRequest(new_session=pb.CreateSessionRequest(),
                          inputs=tensors.to_proto(np.full((1, 4), STEP_VALUE, np.float32)))
    with grpc.insecure_channel(address) as channel:
        answers = pb_grpc.LstmServiceStub(channel).StreamBatch(
            iter([pb.StepBatch(steps=[step, step])]), metadata=[("traceparent", TRACEPARENT)], timeout=30)
        return [answer.session_id for response in answers for answer in response.steps]


def test_every_rpc_has_a_server_span_continuing_the_callers_trace(traced_run):
    application = traced_run.application
    served = [s for s in traced_run.spans() if s.kind == Span.SPAN_KIND_SERVER]
    assert {s.name.removeprefix(SERVICE) for s in served} >= {
        "GetModelInfo", "CreateSession", "Step", "Stream", "Predict", "CloseSession"}
    assert len(traced_run.server_spans("Step")) == 3 + 1 + 1  # the session's, the closed session's, the asyncio one
    for span in served:
        caller = (TRACE_ID, PARENT_ID) if span.name.endswith("/StreamBatch") else (
            f"{application.trace_id:032x}", f"{application.span_id:016x}")
        assert (span.trace_id.hex(), span.parent_span_id.hex()) == caller, span.name
    assert len(traced_run.server_spans("StreamBatch")) == 1
    resources = [r.resource for e in traced_run.collector.exports for r in e.resource_spans]
    assert all(_attributes(r.attributes)["service.name"] == "lstmserve" for r in resources)


def test_each_request_has_a_queue_wait_and_a_model_call_under_its_rpc(traced_run):
    expected = {"Step": 1, "Stream": 3, "StreamBatch": 2, "Predict": 1}
    for method, requests in expected.items():
        for rpc in traced_run.server_spans(method):
            if _attributes(rpc.attributes)["rpc.grpc.status_code"] != grpc.StatusCode.OK.value[0]:
                assert traced_run.spans(parent=rpc) == [], "a refused request was never queued"
                continue
            waits, calls = traced_run.spans("queue wait", rpc), traced_run.spans("model call", rpc)
            assert (len(waits), len(calls)) == (requests, requests), method
            for wait, call in zip(sorted(waits, key=_start), sorted(calls, key=_start)):
                assert wait.start_time_unix_nano <= wait.end_time_unix_nano <= call.start_time_unix_nano
                assert call.start_time_unix_nano <= call.end_time_unix_nano


def test_each_batch_has_a_span_linked_to_the_requests_it_served(traced_run):
    batches = {s.span_id: s for s in traced_run.spans("batch")}
    assert batches
    for batch in batches.values():
        assert batch.parent_span_id == b"", "a batch serves many traces and belongs to none"
        assert 1 <= _attributes(batch.attributes)["lstmserve.batch.size"] >= len(batch.links)
    served_by_batches = 0
    for rpc in [span for method in ("Step", "Stream", "StreamBatch") for span in traced_run.server_spans(method)]:
        for call in traced_run.spans("model call", rpc):
            (link,) = call.links
            batch = batches[link.span_id]
            assert (rpc.trace_id, rpc.span_id) in {(x.trace_id, x.span_id) for x in batch.links}
            assert (call.start_time_unix_nano, call.end_time_unix_nano) == (
                batch.start_time_unix_nano, batch.end_time_unix_nano)
            served_by_batches += 1
    assert served_by_batches == 3 + 3 + 1 + 2


def test_no_span_carries_a_session_id_or_a_tensor_value(traced_run):
    assert all(traced_run.session_ids)
    values = []
    for span in traced_run.spans():
        values += [span.name, span.status.message, *_attributes(span.attributes).values()]
        for part in (*span.events, *span.links):
            values += _attributes(part.attributes).values()
    tensor_values = (STEP_VALUE, STREAM_VALUE, PREDICT_VALUE)
    for value in values:
        assert not any(session_id in str(value) for session_id in traced_run.session_ids), value
        assert not any(str(number) in str(value) or value == number for number in tensor_values), value
    for export in traced_run.collector.exports:  # and nowhere else in what left the server
        assert not any(session_id.encode() in export.SerializeToString() for session_id in traced_run.session_ids)


def test_tracing_off_installs_no_tracer_and_serves_calls_that_carry_a_trace_context(demo_server):
    assert demo_server.app.tracer_provider is None
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider), "the process-wide one is untouched"
    with TracerProvider().get_tracer("application").start_as_current_span("application"):
        with LstmClient(demo_server.address, timeout=30) as client, client.session() as session:
            assert session.step(np.zeros(4, np.float32)).shape == (3,)


def test_a_server_that_does_not_trace_never_loads_the_tracing_sdk_exporter_or_instrumentation(demo_model):
    script = f"""
import sys
import numpy as np
from client import LstmClient
from tests.servers import server_in_thread
with server_in_thread({str(demo_model)!r}) as server, LstmClient(server.address) as client, client.session() as s:
    s.step(np.zeros(4, np.float32))
print(sorted(name for name in sys.modules if name.startswith("opentelemetry.")))
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    # (the redis package imports the SDK's metrics half whenever the SDK is installed: not a part of tracing)
    for part in ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.instrumentation"):
        assert part not in loaded.stdout, loaded.stdout


def _attributes(attributes) -> dict:
    values = {}
    for attribute in attributes:
        kind = attribute.value.WhichOneof("value")
        values[attribute.key] = getattr(attribute.value, kind) if kind else None
    return values


def _start(span: Span) -> int:
    return span.start_time_unix_nano
