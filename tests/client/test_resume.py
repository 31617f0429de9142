"""Resumable streams and retried calls across cut connections: every output once, in order, applied once."""

import asyncio
import threading
import urllib.request

import grpc
import numpy as np
import pytest
import torch

from client import AsyncLstmClient, LstmClient
from client.resume import RetryPolicy
from tests.integration.reference import TOLERANCE, Reference
from tests.proxy import tcp_proxy

pytestmark = pytest.mark.integration

CUT_AFTER = (40, 41, 120, 199)  # outputs received before each cut; 40 and 41: a cut right after a resume


@pytest.fixture
def proxy(demo_server):
    with tcp_proxy(demo_server.address) as proxy:
        yield proxy


def inputs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


@pytest.fixture(scope="module")
def scripted(demo_model):
    return torch.jit.load(str(demo_model))


def expected(scripted, xs: np.ndarray):
    reference = Reference(scripted, 1, 3)
    return np.stack([reference.step(x[None])[0] for x in xs]), reference.state


def check_exactly_once(scripted, session, xs, outputs):
    """Outputs equal the in-process reference and the server applied each input exactly once."""
    want, (h, c) = expected(scripted, xs)
    assert len(outputs) == len(xs)
    np.testing.assert_allclose(np.stack(outputs), want, atol=TOLERANCE)
    info = session.info()
    assert (info.steps_applied, info.last_sequence_number) == (len(xs), len(xs))
    got_h, got_c = session.state()
    np.testing.assert_allclose(got_h, h, atol=TOLERANCE)
    np.testing.assert_allclose(got_c, c, atol=TOLERANCE)


def test_sync_stream_survives_cut_connections(proxy, scripted):
    xs = inputs(250, seed=1)
    with LstmClient(proxy.address) as client, client.session() as session:
        outputs = []
        for y in session.stream(xs):
            outputs.append(y)
            if len(outputs) in CUT_AFTER:
                proxy.cut()
        assert proxy.cuts == len(CUT_AFTER)
        check_exactly_once(scripted, session, xs, outputs)


async def test_async_stream_survives_cut_connections(proxy, scripted):
    xs = inputs(250, seed=2)
    async with AsyncLstmClient(proxy.address) as client, client.session() as session:
        outputs = []
        async for y in session.stream(xs):
            outputs.append(y)
            if len(outputs) in CUT_AFTER:
                proxy.cut()
        with LstmClient(proxy.address) as sync_client:
            check_exactly_once(scripted, sync_client.session(session_id=session.id), xs, outputs)


def test_unary_steps_are_retried_with_their_number_while_the_server_is_unreachable(proxy, scripted):
    xs = inputs(3, seed=3)
    with LstmClient(proxy.address) as client, client.session() as session:
        outputs = [session.step(xs[0])]
        proxy.refuse()
        result = {}
        stepping = threading.Thread(target=lambda: result.update(y=session.step(xs[1])))
        stepping.start()
        while proxy.refused < 2 and stepping.is_alive():
            threading.Event().wait(0.01)
        proxy.accept()
        stepping.join(30)
        outputs += [result["y"], session.step(xs[2])]
        check_exactly_once(scripted, session, xs, outputs)


def test_a_deadline_ends_the_retries(proxy):
    with LstmClient(proxy.address, retry=RetryPolicy(max_backoff=0.1)) as client, client.session() as session:
        proxy.refuse()
        with pytest.raises(grpc.RpcError) as error:
            list(session.stream(inputs(5, seed=4), timeout=0.5))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        proxy.accept()  # so the session can be closed


def test_abandoned_stream_ends_on_the_server_and_is_settled_before_the_next_step(demo_server, scripted):
    xs = inputs(300, seed=5)
    streams_before = finished_streams(demo_server)
    # bounded calls: a regression here must fail the test, not hang the suite
    with LstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        outputs = []
        for y in session.stream(xs[:200], timeout=30):
            outputs.append(y)
            if len(outputs) == 10:
                break  # 10 answered; up to answers_kept more were sent and may or may not have been applied
        outputs += [session.step(x) for x in xs[200:203]]
        applied = session.info().last_sequence_number
        assert applied > 13  # the unanswered ones were settled, once each, before the new steps
        want, _ = expected(scripted, np.concatenate([xs[: applied - 3], xs[200:203]]))
        np.testing.assert_allclose(np.stack(outputs), np.concatenate([want[:10], want[-3:]]), atol=TOLERANCE)
        assert session.info().steps_applied == applied
    assert wait_for(lambda: finished_streams(demo_server) > streams_before)  # the handler let go of it
    assert demo_server.app.engine.queued_requests == 0


def finished_streams(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    rows = [
        row
        for row in text.splitlines()
        if row.startswith("lstmserve_rpcs_total{") and 'method="/lstmserve.v1.LstmService/Stream"' in row
    ]
    return sum(float(row.split()[-1]) for row in rows)


def wait_for(condition, seconds: float = 20) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        threading.Event().wait(0.05)
    return condition()


async def test_async_stream_left_by_break_is_settled_before_the_next_step(demo_server, scripted):
    """Leaving `async for` does not close an async generator (its clean-up waits for the garbage collector), so
    the session must not take numbers from where that stream began."""
    xs = inputs(60, seed=6)
    async with AsyncLstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        outputs = []
        async for y in session.stream(xs[:50], timeout=30):
            outputs.append(y)
            if len(outputs) == 10:
                break
        outputs += [await session.step(x) for x in xs[50:53]]
        applied = (await session.info()).last_sequence_number
        assert applied > 13
        want, _ = expected(scripted, np.concatenate([xs[: applied - 3], xs[50:53]]))
        np.testing.assert_allclose(np.stack(outputs), np.concatenate([want[:10], want[-3:]]), atol=TOLERANCE)
        assert (await session.info()).steps_applied == applied


def test_stream_left_by_break_but_still_held_is_settled_before_the_next_step(demo_server, scripted):
    """A generator still referenced is not closed on `break`: the session must not wait for that."""
    xs = inputs(60, seed=7)
    with LstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        outputs, stream = [], session.stream(xs[:50], timeout=30)
        for y in stream:
            outputs.append(y)
            if len(outputs) == 10:
                break
        outputs += [session.step(x) for x in xs[50:53]]
        applied = session.info().last_sequence_number
        assert applied > 13
        want, _ = expected(scripted, np.concatenate([xs[: applied - 3], xs[50:53]]))
        np.testing.assert_allclose(np.stack(outputs), np.concatenate([want[:10], want[-3:]]), atol=TOLERANCE)
        assert session.info().steps_applied == applied
        stream.close()  # ends the call; it no longer decides the session's numbering
        assert session.next_sequence_number == applied + 1


@pytest.fixture(scope="module")
def slow_server(demo_model):
    """Each step waits a second for its batch to fill: a client's shorter deadline passes, the step is applied."""
    from tests.servers import server_in_thread

    with server_in_thread(demo_model, max_batch_delay=1.0) as server:
        yield server


def test_a_step_whose_deadline_passed_is_settled_before_the_next(slow_server, scripted):
    """The server may apply a step after the client stopped waiting: the next step must not reuse its number."""
    xs = inputs(2, seed=8)
    with LstmClient(slow_server.address, timeout=30) as client, client.session() as session:
        client.timeout = 0.2
        with pytest.raises(grpc.RpcError) as late:
            session.step(xs[0])
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        client.timeout = 30
        y = session.step(xs[1])
        want, _ = expected(scripted, xs)
        np.testing.assert_allclose(y, want[1], atol=TOLERANCE)
        assert (session.info().steps_applied, session.next_sequence_number) == (2, 3)


async def test_an_async_step_whose_deadline_passed_is_settled_before_the_next(slow_server, scripted):
    xs = inputs(2, seed=9)
    async with AsyncLstmClient(slow_server.address, timeout=30) as client, client.session() as session:
        client.timeout = 0.2
        with pytest.raises(grpc.RpcError) as late:
            await session.step(xs[0])
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        client.timeout = 30
        y = await session.step(xs[1])
        want, _ = expected(scripted, xs)
        np.testing.assert_allclose(y, want[1], atol=TOLERANCE)
        assert ((await session.info()).steps_applied, session.next_sequence_number) == (2, 3)


def test_retrying_a_step_whose_deadline_passed_applies_it_once(slow_server, scripted):
    """The caller's retry of that step (the same inputs again) is sent under its number: applied once, whether the
    server had applied it or not, and answered with its outputs."""
    xs = inputs(2, seed=10)
    with LstmClient(slow_server.address, timeout=30) as client, client.session() as session:
        client.timeout = 0.2
        with pytest.raises(grpc.RpcError):
            session.step(xs[0])
        client.timeout = 30
        retried, y = session.step(xs[0]), session.step(xs[1])
        want, _ = expected(scripted, xs)
        np.testing.assert_allclose(retried, want[0], atol=TOLERANCE)
        np.testing.assert_allclose(y, want[1], atol=TOLERANCE)
        assert (session.info().steps_applied, session.next_sequence_number) == (2, 3)


async def test_retrying_an_async_step_whose_deadline_passed_applies_it_once(slow_server, scripted):
    xs = inputs(2, seed=11)
    async with AsyncLstmClient(slow_server.address, timeout=30) as client, client.session() as session:
        client.timeout = 0.2
        with pytest.raises(grpc.RpcError):
            await session.step(xs[0])
        client.timeout = 30
        retried, y = await session.step(xs[0]), await session.step(xs[1])
        want, _ = expected(scripted, xs)
        np.testing.assert_allclose(retried, want[0], atol=TOLERANCE)
        np.testing.assert_allclose(y, want[1], atol=TOLERANCE)
        assert ((await session.info()).steps_applied, session.next_sequence_number) == (2, 3)


def rows_then_failure(xs):
    yield from xs
    raise ValueError("row 4 is not a number")


def test_an_error_of_the_inputs_ends_the_stream_with_it_after_the_earlier_outputs(demo_server, scripted):
    xs = inputs(4, seed=10)
    with LstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        outputs = []
        with pytest.raises(ValueError, match="row 4 is not a number"):
            for y in session.stream(rows_then_failure(xs[:3]), timeout=30):
                outputs.append(y)
        outputs.append(session.step(xs[3]))
        check_exactly_once(scripted, session, xs, outputs)


async def test_an_error_of_the_inputs_ends_the_async_stream_with_it(demo_server, scripted):
    xs = inputs(4, seed=11)
    async with AsyncLstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        outputs = []

        async def consume():
            async for y in session.stream(rows_then_failure(xs[:3]), timeout=30):
                outputs.append(y)

        with pytest.raises(ValueError, match="row 4 is not a number"):
            await asyncio.wait_for(consume(), 30)
        outputs.append(await session.step(xs[3]))
        with LstmClient(demo_server.address) as sync_client:
            check_exactly_once(scripted, sync_client.session(session_id=session.id), xs, outputs)


def test_an_input_that_is_not_numbers_ends_the_stream_with_its_error(demo_server):
    with LstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        with pytest.raises(ValueError):
            list(session.stream([inputs(1, seed=12)[0], ["one", "two", "three", "four"]], timeout=30))
        assert session.info().last_sequence_number == 1 and session.next_sequence_number == 2


async def test_an_input_that_is_not_numbers_ends_the_async_stream_with_its_error(demo_server):
    async with AsyncLstmClient(demo_server.address, timeout=30) as client, client.session() as session:
        async def consume():
            return [y async for y in session.stream([inputs(1, seed=13)[0], ["one", "two", "three", "four"]])]

        with pytest.raises(ValueError):
            await asyncio.wait_for(consume(), 30)
        assert (await session.info()).last_sequence_number == 1 and session.next_sequence_number == 2
