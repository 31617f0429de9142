"""The client sends the application's W3C trace context when it has one, and works without OpenTelemetry."""

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider

from client.tracing import trace_metadata

pytestmark = pytest.mark.unit


def test_calls_made_in_a_span_carry_its_traceparent():
    with TracerProvider().get_tracer("application").start_as_current_span("operation") as span:
        metadata = dict(trace_metadata())
    context = span.get_span_context()
    assert metadata["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_calls_made_outside_any_span_carry_no_trace_context():
    assert trace_metadata() is None


def test_the_client_works_without_opentelemetry_installed():
    script = """
import sys
sys.modules["opentelemetry"] = None  # as if not installed: importing it raises ImportError
from client import LstmClient
from client.tracing import trace_metadata
assert trace_metadata() is None
print("ok")
"""
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert ran.stdout.strip() == "ok", ran.stderr
