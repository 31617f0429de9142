"""Faults: killed clients, cut connections, SIGTERM with steps in flight, model exceptions, limits, slow
readers. For each: no acknowledged step lost, none applied twice, every state equal to the model's."""

import asyncio
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
import torch
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import AsyncLstmClient, LstmClient, StepError
from server.testing.processes import lstmserve_process
from tests.faulty_model import FAULT_SENTINEL, export_faulty_model
from tests.integration.reference import TOLERANCE, Reference
from tests.metric_samples import total
from tests.proxy import tcp_proxy
from tests.reliability.figures import FIGURES, scale
from tests.reliability.stream_child import inputs
from tests.servers import server_in_thread

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = scale(reduced=120, full=600)


@pytest.fixture(scope="module")
def scripted(demo_model):
    return torch.jit.load(str(demo_model))


def reference(scripted, xs: np.ndarray, hidden: int = 3):
    """Outputs `[n, output]` and final `(h, c)` of the model run in-process over `xs` from zeros."""
    ref = Reference(scripted, 1, hidden)
    return np.stack([ref.step(x[None])[0] for x in xs]), ref.state


def state_after(scripted, xs: np.ndarray, hidden: int = 3):
    ref = Reference(scripted, 1, hidden)
    for x in xs:
        ref.step(x[None])
    return ref.state


def audit(name: str, session, xs: np.ndarray, scripted, outputs=None, acked: int | None = None) -> None:
    """Records and asserts the fault's figures: acknowledged steps kept, each applied once, exact state."""
    info = session.info()
    applied = info.steps_applied
    acked = len(xs) if acked is None else acked
    want, (h, c) = reference(scripted, xs)
    got_h, got_c = session.state()
    same = np.allclose(got_h, h, atol=TOLERANCE) and np.allclose(got_c, c, atol=TOLERANCE)
    if outputs is not None:
        same = same and len(outputs) == len(xs) and np.allclose(np.stack(outputs), want, atol=TOLERANCE)
    lost, twice = max(0, acked - info.last_sequence_number), max(0, applied - len(xs))
    FIGURES.fault(name, acked_lost=lost, applied_twice=twice)
    FIGURES.state_mismatches += not same
    assert (lost, twice, applied, info.last_sequence_number, same) == (0, 0, len(xs), len(xs), True)


def test_client_killed_mid_stream_is_resumed_by_another(demo_server, scripted, tmp_path):
    xs = inputs(STEPS, seed=11)
    with LstmClient(demo_server.address) as client:
        session = client.session()
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.stream_child",
                demo_server.address,
                session.id,
                str(STEPS),
                "11",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        acked = 0
        for line in child.stdout:
            acked = int(line.split()[1])
            if acked == STEPS // 3:
                child.send_signal(signal.SIGKILL)
                break
        child.wait(30)
        wait_until_stable(lambda: session.info().last_sequence_number)  # what the dead client had queued
        resumed = client.session(session_id=session.id)  # the session outlives its client
        applied = resumed.info().last_sequence_number
        assert applied >= acked
        list(resumed.stream(xs[applied:]))
        audit("client killed, resumed", resumed, xs, scripted, acked=acked)


async def test_connections_cut_under_many_streams(demo_server, scripted):
    count, cuts = scale(reduced=8, full=40), 0
    xs = [inputs(STEPS, seed=100 + s) for s in range(count)]
    with tcp_proxy(demo_server.address) as proxy:
        async with AsyncLstmClient(proxy.address) as client:
            sessions = [await client.session().open() for _ in range(count)]
            received = [0]

            async def drive(s: int):
                outputs = []
                async for y in sessions[s].stream(xs[s]):
                    outputs.append(y)
                    received[0] += 1
                    if received[0] % (count * STEPS // 6) == 0:
                        proxy.cut()
                return outputs

            results = await asyncio.gather(*(drive(s) for s in range(count)))
            cuts = proxy.cuts
    assert cuts >= 3
    with LstmClient(demo_server.address) as client:
        for s, outputs in enumerate(results):
            audit(
                "connection cut (proxy)", client.session(session_id=sessions[s].id), xs[s], scripted, outputs
            )


def test_sigterm_with_steps_in_flight_then_restore_from_snapshot(demo_model, scripted, tmp_path):
    xs = inputs(STEPS, seed=21)
    snapshot_dir = str(tmp_path / "snapshots")
    flags = ("--snapshot-dir", snapshot_dir, "--shutdown-grace", "10")
    with (
        lstmserve_process(demo_model, tmp_path / "first.log", *flags) as first,
        tcp_proxy(first.address) as proxy,
    ):
        with LstmClient(proxy.address) as client:
            session = client.session()
            outputs, done = [], threading.Event()

            def consume():
                for y in session.stream(xs):
                    outputs.append(y)
                    if len(outputs) == STEPS // 3:
                        first.process.send_signal(signal.SIGTERM)  # with the rest of the window in flight
                done.set()

            consumer = threading.Thread(target=consume)
            consumer.start()
            assert first.process.wait(60) == 0
            assert "wrote 1 sessions to snapshot" in first.log()
            with lstmserve_process(demo_model, tmp_path / "second.log", *flags) as second:
                assert "restored 1 sessions from snapshot" in second.log()
                proxy.accept(second.address)
                consumer.join(120)
                assert done.is_set()
                audit("server SIGTERM + restore", session, xs, scripted, outputs)


async def test_model_exception_fails_only_its_batch_and_sessions_carry_on(tmp_path):
    path, scripted = export_faulty_model(tmp_path)
    count = 6
    xs = [inputs(STEPS, seed=200 + s) for s in range(count)]
    poisoned = xs[0].copy()
    poisoned[STEPS // 2, 0] = FAULT_SENTINEL
    with server_in_thread(path) as server:
        async with AsyncLstmClient(server.address) as client:
            sessions = [await client.session().open() for _ in range(count)]

            async def drive(s: int):
                outputs, sent = [], poisoned if s == 0 else xs[s]
                while len(outputs) < STEPS:
                    try:
                        async for y in sessions[s].stream(sent[len(outputs) :]):
                            outputs.append(y)
                    except StepError as error:  # this request's batch failed: nothing of it was applied
                        assert error.code() == grpc.StatusCode.INTERNAL
                        assert error.sequence_number == len(outputs) + 1
                        h, c = await sessions[s].state()
                        want_h, want_c = state_after(scripted, xs[s][: len(outputs)])
                        assert np.allclose(h, want_h, atol=TOLERANCE) and np.allclose(
                            c, want_c, atol=TOLERANCE
                        )
                        sent = xs[s]  # the caller fixes its input and goes on
                return outputs

            results = await asyncio.gather(*(drive(s) for s in range(count)))
        failures = total(server.app.metrics.registry, "lstmserve_model_failures_total")
        with LstmClient(server.address) as sync_client:
            for s, outputs in enumerate(results):
                audit(
                    "model exception",
                    sync_client.session(session_id=sessions[s].id),
                    xs[s],
                    scripted,
                    outputs,
                )
    assert failures >= 1


def test_limits_refuse_cleanly_and_leave_every_session_intact(demo_model, scripted):
    xs = inputs(4, seed=31)
    with server_in_thread(demo_model, max_sessions=12, max_queued_requests=8) as server:
        with LstmClient(server.address) as client:
            ids = []
            for _ in range(12):
                session = client.session()
                session.step(xs[0])  # request 1
                ids.append(session.id)
            with pytest.raises(grpc.RpcError) as error:
                client.session()
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_sessions=12" in error.value.details()
            # requests 2 and 3 of all 12 sessions in one message: more than max_queued_requests at once
            batch = pb.StepBatch(
                steps=[
                    pb.StepRequest(
                        session_id=sid, sequence_number=seq, inputs=tensors.to_proto(xs[seq - 1][None])
                    )
                    for seq in (2, 3)
                    for sid in ids
                ]
            )
            answers = list(client.stub.StreamBatch(iter([batch])))[0].steps
            codes = {a.error.code for a in answers if a.HasField("error")}
            exhausted = [a for a in answers if a.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]]
            assert exhausted and all("max_queued_requests=8" in a.error.message for a in exhausted)
            # a refused request 2 makes request 3 of that session a gap: FAILED_PRECONDITION, also not applied
            assert codes <= {
                grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
                grpc.StatusCode.FAILED_PRECONDITION.value[0],
            }
            for sid in ids:
                session = client.session(session_id=sid)  # numbering resumes after the last applied request
                for x in xs[session.info().last_sequence_number :]:
                    session.step(x)
                audit("limits hit (refuse)", session, xs, scripted)
        sample = server.app.metrics.registry.get_sample_value
        assert sample("lstmserve_limit_refusals_total", {"limit": "max_sessions"}) == 1
        assert sample("lstmserve_limit_refusals_total", {"limit": "max_queued_requests"}) == len(exhausted)


def test_evict_policy_makes_room_and_touches_only_the_evicted(demo_model, scripted):
    xs = inputs(3, seed=41)
    with server_in_thread(demo_model, max_sessions=5, full_policy="evict") as server:
        with LstmClient(server.address) as client:
            sessions = [client.session() for _ in range(5)]
            for session in sessions[1:] + sessions[:1]:  # sessions[1] is now the least recently used
                session.step(xs[0])
            newcomer = client.session()
            with pytest.raises(grpc.RpcError) as error:
                sessions[1].info()
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            for session in [s for i, s in enumerate(sessions) if i != 1] + [newcomer]:
                for x in xs[session.info().last_sequence_number :]:
                    session.step(x)
                audit("limits hit (evict LRU)", session, xs, scripted)
        sample = server.app.metrics.registry.get_sample_value
        assert sample("lstmserve_sessions_evicted_total", {"limit": "max_sessions"}) == 1


def test_slow_reader_gets_backpressure_not_growing_memory(demo_model, scripted):
    count = scale(reduced=3000, full=20000)
    xs = inputs(count, seed=51)
    with server_in_thread(demo_model, stream_window=8) as server:
        with (
            LstmClient(server.address) as client,
            grpc.insecure_channel(
                server.address, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16384)]
            ) as small_window,
        ):
            session = client.session()
            requests = (
                pb.StepRequest(session_id=session.id, sequence_number=i + 1, inputs=tensors.to_proto(x[None]))
                for i, x in enumerate(xs)
            )
            # a reader with a small receive window (no auto-tuning), so the window of unread answers is what
            # the server has to hold; it sends as fast as flow control lets it and reads nothing yet
            call = pb_grpc.LstmServiceStub(small_window).Stream(requests)
            stalled_at = wait_until_stable(lambda: session.info().steps_applied)
            outputs = [tensors.from_proto(r.outputs)[0] for r in call]  # now read everything
            FIGURES.load["slow reader: applied unread"] = f"{stalled_at} of {count}"
            assert stalled_at < count // 2  # the server stopped taking requests it could not answer
            audit("slow reader", session, xs, scripted, outputs)


def wait_until_stable(read, quiet_polls: int = 10):
    """Polls `read()` until it returns the same value `quiet_polls` times in a row (0.1 s apart)."""
    last, same = read(), 0
    while same < quiet_polls:
        threading.Event().wait(0.1)
        value = read()
        same, last = (same + 1, last) if value == last else (0, value)
    return last
