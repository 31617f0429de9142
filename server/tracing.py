"""OpenTelemetry spans of the engine's work. Tracing is off unless --otlp-endpoint is set; then the engine holds a
Tracing, and otherwise None, so tracing off costs one `is None` check per request and per batch.

A request's span context is taken when it is queued: the RPC's server span (from the gRPC instrumentation) is
current then. Each batch gets a span of its own, linked to the requests it served, and each request two child
spans: its wait in the queue and the model call that served it. Spans carry counts and timings only, never a
session id or a tensor value: the rules for log lines apply to traces too.
"""

import time
from collections.abc import Iterable

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, Tracer

BATCH_SIZE = "lstmserve.batch.size"
TIME_STEPS = "lstmserve.batch.time_steps"


class Tracing:
    """The engine's tracer, and what it records of requests and batches."""

    def __init__(self, tracer: Tracer):
        self._tracer = tracer

    @staticmethod
    def request_context() -> SpanContext | None:
        """The span context of the RPC being served, to be kept with the request it queues; None when the RPC
        is not sampled (OTEL_TRACES_SAMPLER): its spans are not recorded, so neither are its requests'."""
        context = trace.get_current_span().get_span_context()
        return context if context.trace_flags.sampled else None

    def batch(self, requests: Iterable[tuple[SpanContext | None, float]], time_steps: int) -> "BatchTrace":
        """The spans of one batch, starting now, of `requests` given as (span context, perf_counter when queued)."""
        return BatchTrace(self._tracer, list(requests), time_steps)


class BatchTrace:
    """A context manager around one batch's model call; the spans are written when it exits."""

    def __init__(self, tracer: Tracer, requests: list[tuple[SpanContext | None, float]], time_steps: int):
        self._tracer = tracer
        self._requests = requests
        self._time_steps = time_steps
        self._clock = _WallClock()
        self._started = time.time_ns()

    def __enter__(self) -> "BatchTrace":
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        ended = time.time_ns()
        # The error's type only: a model's error message may quote the tensors it was given.
        status = Status(StatusCode.ERROR, error_type.__name__) if error_type else None
        traced = [(context, queued) for context, queued in self._requests if context is not None]
        # one link per RPC: the requests of a stream share theirs
        served = {(context.trace_id, context.span_id): context for context, _ in traced}
        batch = self._tracer.start_span(  # a root span: a batch serves many traces, it belongs to none of them
            "batch", Context(), SpanKind.INTERNAL, links=[Link(context) for context in served.values()],
            start_time=self._started,
            attributes={BATCH_SIZE: len(self._requests), TIME_STEPS: self._time_steps})
        if status:
            batch.set_status(status)
        batch.end(ended)
        for context, queued in traced:
            _request_spans(self._tracer, context, self._clock.ns(queued), self._started, ended,
                           batch.get_span_context(), status)


def _request_spans(tracer: Tracer, request: SpanContext, queued: int, started: int, ended: int,
                   batch: SpanContext | None = None, status: Status | None = None) -> None:
    """A request's "queue wait" and "model call" spans, children of its RPC's span; times in ns since the epoch."""
    parent = trace.set_span_in_context(NonRecordingSpan(request))
    tracer.start_span("queue wait", parent, SpanKind.INTERNAL, start_time=queued).end(started)
    call = tracer.start_span("model call", parent, SpanKind.INTERNAL, links=[Link(batch)] if batch else None,
                             start_time=started)
    if status:
        call.set_status(status)
    call.end(ended)


class _WallClock:
    """perf_counter readings as OpenTelemetry's nanoseconds since the epoch."""

    def __init__(self):
        self._offset = time.time_ns() - time.perf_counter_ns()

    def ns(self, perf_counter: float) -> int:
        return self._offset + int(perf_counter * 1e9)
