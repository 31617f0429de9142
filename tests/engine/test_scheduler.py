"""The batch loop on its own: order within a session, a failed head request, stopping with work queued."""

import asyncio
import threading

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, StatusCode, TraceFlags, use_span
from prometheus_client import CollectorRegistry

from server.engine import Draining, ModelFailure, SequenceError, StepAnswer
from server.engine.model_thread import ModelThread
from server.engine.scheduler import Scheduler
from server.engine.sessions import SessionTable, Work
from server.engine.state_pool import StatePool
from server.metrics import Metrics
from server.store import MemoryStore
from server.tracing import Tracing
from tests.fakes import FAIL_MARKER, FakeRuntime

pytestmark = pytest.mark.unit

MODEL_THREAD = ModelThread(torch_threads=1)  # shared by these tests, as the server's engines share theirs


def started_scheduler(runtime: FakeRuntime, pool: StatePool, tracing: Tracing | None = None) -> Scheduler:
    scheduler = Scheduler(runtime, pool, Metrics(CollectorRegistry()).for_model("fake", "1"), max_batch_size=8,
                          max_batch_delay=0.0, answers_kept=4, model_thread=MODEL_THREAD.lane(), store=MemoryStore(),
                          model="fake", tracing=tracing)
    scheduler.start()
    return scheduler


@pytest.fixture
async def parts():
    """A started scheduler over a fake model, with a session table and pool to make sessions from."""
    runtime, pool = FakeRuntime(), StatePool(1, 3, 4, 16)
    scheduler = started_scheduler(runtime, pool)
    yield runtime, pool, SessionTable(), scheduler
    await scheduler.stop()


@pytest.fixture
async def traced():
    """`parts` with tracing on, plus a tracer standing in for the gRPC instrumentation's server spans, and the
    spans finished so far."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    runtime, pool = FakeRuntime(), StatePool(1, 3, 4, 16)
    scheduler = started_scheduler(runtime, pool, Tracing(provider.get_tracer("lstmserve")))
    yield pool, SessionTable(), scheduler, provider.get_tracer("rpc"), spans
    await scheduler.stop()


def new_session(pool, table):
    return table.add(pool.allocate(torch.zeros(1, 3), torch.zeros(1, 3)), owner="")


def queue(scheduler, session, value: float, seq: int) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    scheduler.enqueue(session, Work(seq, future, inputs=np.array([[value, 0.0]], np.float32)))
    return future


async def test_a_sessions_requests_apply_in_order_each_on_the_state_the_last_left(parts):
    _, pool, table, scheduler = parts
    session = new_session(pool, table)
    answers = await asyncio.gather(*(queue(scheduler, session, v, seq) for seq, v in enumerate((1, 2, 3), 1)))
    assert [float(a.outputs[0, 0]) for a in answers] == [1.0, 3.0, 6.0]  # h accumulates the inputs in order
    assert all(isinstance(a, StepAnswer) and a.state is None for a in answers)
    assert (session.last_applied_seq, session.steps_applied) == (3, 3)
    assert [kept.seq for kept in scheduler.kept.answers_of(session)] == [1, 2, 3]
    assert scheduler.queued == 0


async def test_sessions_ready_together_share_one_model_call(parts):
    runtime, pool, table, scheduler = parts
    runtime.gate.clear()
    sessions = [new_session(pool, table) for _ in range(5)]
    futures = [queue(scheduler, s, i, 1) for i, s in enumerate(sessions)]
    await asyncio.sleep(0.05)
    runtime.gate.set()
    await asyncio.gather(*futures)
    assert runtime.batch_sizes == [5]


async def test_a_failed_head_request_fails_those_behind_it_and_leaves_the_state(parts):
    _, pool, table, scheduler = parts
    session = new_session(pool, table)
    await queue(scheduler, session, 1, 1)
    doomed, behind = queue(scheduler, session, FAIL_MARKER, 2), queue(scheduler, session, 1, 3)
    with pytest.raises(ModelFailure):
        await doomed
    with pytest.raises(SequenceError, match="resend from sequence number 2"):
        await behind
    assert (session.last_applied_seq, session.last_assigned_seq) == (1, 1)
    assert float(pool.read(session.slot)[0][0, 0]) == 1.0  # the failed call changed nothing
    assert float((await queue(scheduler, session, 1, 2)).outputs[0, 0]) == 2.0  # resent, it goes on
    assert scheduler.queued == 0


async def test_stopping_fails_the_request_in_flight_and_those_queued_as_draining(parts):
    runtime, pool, table, scheduler = parts
    session = new_session(pool, table)
    runtime.gate.clear()
    in_flight, queued = queue(scheduler, session, 1, 1), queue(scheduler, session, 1, 2)
    await asyncio.sleep(0.05)
    threading.Timer(0.1, runtime.gate.set).start()  # stop() waits for the model thread, blocking the loop
    await scheduler.stop()
    with pytest.raises(Draining, match="stopped before request 1 ran"):
        await in_flight
    with pytest.raises(SequenceError, match="resend from sequence number 1"):
        await queued
    assert scheduler.queued == 0


async def test_a_batch_span_links_the_rpcs_it_served_and_each_request_has_its_wait_and_model_call(traced):
    pool, table, scheduler, rpc_tracer, spans = traced
    rpcs, answers = [], []
    for value in (1, 2, 3):  # queued back to back: one batch
        with rpc_tracer.start_as_current_span("rpc") as rpc:
            answers.append(queue(scheduler, new_session(pool, table), value, 1))
        rpcs.append(rpc.get_span_context())
    await asyncio.gather(*answers)
    (batch,) = [s for s in spans.get_finished_spans() if s.name == "batch"]
    assert batch.parent is None
    assert [link.context for link in batch.links] == rpcs
    assert (batch.attributes["lstmserve.batch.size"], batch.attributes["lstmserve.batch.time_steps"]) == (3, 1)
    for rpc in rpcs:
        children = {s.name: s for s in spans.get_finished_spans() if s.parent and s.parent.span_id == rpc.span_id}
        assert children.keys() == {"queue wait", "model call"}
        assert children["queue wait"].end_time == children["model call"].start_time == batch.start_time
        assert [link.context for link in children["model call"].links] == [batch.context]


async def test_a_failed_batch_is_an_error_span_naming_the_errors_type_but_not_its_message(traced):
    pool, table, scheduler, rpc_tracer, spans = traced
    with rpc_tracer.start_as_current_span("rpc"):
        doomed = queue(scheduler, new_session(pool, table), FAIL_MARKER, 1)
    with pytest.raises(ModelFailure):
        await doomed
    failed = [s for s in spans.get_finished_spans() if s.name in ("batch", "model call")]
    assert len(failed) == 2
    assert all((s.status.status_code, s.status.description) == (StatusCode.ERROR, "RuntimeError") for s in failed)


async def test_requests_of_no_rpc_or_of_an_unsampled_one_get_no_spans_of_their_own(traced):
    pool, table, scheduler, _, spans = traced
    await queue(scheduler, new_session(pool, table), 1, 1)
    unsampled = SpanContext(trace_id=1, span_id=1, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))
    with use_span(NonRecordingSpan(unsampled)):
        await queue(scheduler, new_session(pool, table), 1, 1)
    assert [(s.name, len(s.links)) for s in spans.get_finished_spans()] == [("batch", 0), ("batch", 0)]
