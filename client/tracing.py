"""W3C trace context for outgoing calls: an application that traces with OpenTelemetry sees lstmserve's spans
in its own traces. OpenTelemetry is optional here: without it installed, calls carry no trace context."""

try:
    from opentelemetry import propagate
except ImportError:
    propagate = None


def trace_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata (traceparent, tracestate, baggage), or None when there is none:
    OpenTelemetry missing, or no span current (an application without a tracer provider never has one)."""
    if propagate is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return tuple(carrier.items()) or None
