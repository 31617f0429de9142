"""What tracing costs: closed-loop streaming with tracing off (the default) and on, exporting every span to an
OTLP receiver in this process that counts them."""

import collections
import contextlib
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.harness import Bench, median_of
from bench.plan import MODELS
from bench.tables import configs_table

MODES = ("off", "on")


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver that keeps only the number of spans it was sent."""

    def __init__(self):
        self.spans = 0
        self._lock = threading.Lock()

    def Export(self, request, context):
        count = sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
        with self._lock:
            self.spans += count
        return trace_service_pb2.ExportTraceServiceResponse()


@contextlib.contextmanager
def span_counter():
    """A SpanCounter on 127.0.0.1 and its endpoint URL."""
    counter = SpanCounter()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield counter, f"http://127.0.0.1:{port}"
    finally:
        server.stop(None)


def run(bench: Bench) -> None:
    """Both servers up at once, measured in turns with the same client code."""
    name = bench.plan.tracing_model
    input_size = MODELS[name][0]
    with contextlib.ExitStack() as stack:
        counter, endpoint = stack.enter_context(span_counter())
        servers = {"off": stack.enter_context(bench.server(name, "-untraced")),
                   "on": stack.enter_context(bench.server(name, "-traced", otlp_endpoint=endpoint))}
        for n in bench.plan.tracing_sessions:
            runs = collections.defaultdict(list)
            for repeat in range(bench.plan.repeats):
                for mode, child in servers.items():
                    figures = bench.measure("closed", child.address, n, steps=1, input_size=input_size)
                    runs[mode].append(figures)
                    bench.progress(f"tracing {name} n={n:<4d} {repeat + 1}/{bench.plan.repeats} {mode:3s} "
                                   f"{figures['throughput']:8.0f} steps/s p99 {figures['p99'] * 1e3:7.2f} ms")
            bench.results["tracing"].append(
                {"model": name, "sessions": n, "configs": {mode: median_of(r) for mode, r in runs.items()}})
        bench.results["tracing_spans_received"] = counter.spans  # so far: the traced server still batches some


def markdown(results: dict) -> str:
    table = configs_table(results.get("tracing", []), MODES, "tracing")
    return table and (f"\n### Tracing (closed loop; ratios against off; {results['tracing_spans_received']:,} spans "
                      "received while on)\n\n" + table + "\n")
