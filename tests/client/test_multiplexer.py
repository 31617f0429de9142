"""The multiplexers against the real server: many application sessions over one StreamColumns stream, each with the
in-process reference's numbers, its own errors, exactly-once across cut connections; the README's example."""

import asyncio
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch

from client import AsyncLstmClient, Credentials, LstmClient, LstmError
from client.resume import RetryPolicy
from tests.certs import make_pki
from tests.integration.reference import TOLERANCE, Reference
from tests.proxy import tcp_proxy
from tests.servers import server_in_thread
from tests.walkthrough import README_ADDRESS, fenced_block_after

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def scripted(demo_model):
    return torch.jit.load(str(demo_model))


def inputs(sessions: int, steps: int, seed: int, length: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((sessions, steps, length, 4)).astype(np.float32)


def check(scripted, xs, outputs) -> None:
    """Each session's outputs equal the reference run over its own steps."""
    for session_xs, session_outputs in zip(xs, outputs, strict=True):
        reference = Reference(scripted, 1, 3)
        for x, y in zip(session_xs, session_outputs, strict=True):
            np.testing.assert_allclose(y, reference.step(x), atol=TOLERANCE, rtol=0)


def drive(sessions, xs, answered: list | None = None) -> list[np.ndarray]:
    """Each session in a thread of its own, stepping through its inputs one after another; each answer is
    appended to `answered`, when given."""
    def one(i):
        outputs = []
        for x in xs[i]:
            outputs.append(sessions[i].step(x))
            if answered is not None:
                answered.append(i)
        return np.stack(outputs)

    with ThreadPoolExecutor(len(sessions)) as pool:
        return list(pool.map(one, range(len(sessions))))


def test_the_readme_example_prints_what_the_readme_shows(demo_server, capsys):
    exec(compile(fenced_block_after("multiplexer:code").replace(README_ADDRESS, demo_server.address),
                 "README multiplexer", "exec"), {})
    assert capsys.readouterr().out == fenced_block_after("multiplexer:output")


def test_sessions_of_several_step_lengths_equal_the_reference(demo_server, scripted):
    xs = [*inputs(6, 4, seed=1), *inputs(6, 4, seed=2, length=3)]  # concurrent steps of two lengths
    with LstmClient(demo_server.address) as client, client.multiplexer(max_in_flight=1) as mux:
        sessions = [mux.session() for _ in xs]
        check(scripted, xs, drive(sessions, xs))
        h, c = sessions[-1].state()
        reference = Reference(scripted, 1, 3)
        for x in xs[-1]:
            reference.step(x)
        np.testing.assert_allclose(h, reference.state[0], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(c, reference.state[1], atol=TOLERANCE, rtol=0)


def test_a_refused_step_fails_only_its_session_and_changes_nothing(demo_server, scripted):
    xs = inputs(3, 2, seed=3)
    with LstmClient(demo_server.address) as client, client.multiplexer() as mux:
        good, bad, closed = (mux.session() for _ in range(3))
        closed.close()
        with pytest.raises(LstmError) as not_found:
            closed.step(xs[2][0])
        assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(LstmError) as invalid:
            bad.step(np.full((1, 4), np.nan, np.float32))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        outputs = drive([good, bad], xs[:2])  # the refused step took no number: the next one is applied
        check(scripted, xs[:2], outputs)


def test_steps_cut_off_with_the_connection_are_applied_once(demo_server, scripted):
    xs = inputs(4, 30, seed=4)
    with tcp_proxy(demo_server.address) as proxy, LstmClient(proxy.address) as client, \
            client.multiplexer() as mux:
        sessions = [mux.session() for _ in range(4)]
        answered, stopping = [], threading.Event()

        def cut_every_ten_answers():
            while not stopping.wait(0.005):
                if len(answered) >= 10 * (proxy.cuts + 1):
                    proxy.cut()

        cutter = threading.Thread(target=cut_every_ten_answers)
        cutter.start()
        try:
            outputs = drive(sessions, xs, answered)
        finally:
            stopping.set()
            cutter.join()
        assert proxy.cuts >= 5
        check(scripted, xs, outputs)
        for session in sessions:
            info = client.session(session_id=session.id).info()
            assert (info.steps_applied, info.last_sequence_number) == (30, 30)


async def test_the_asyncio_multiplexer(demo_server, scripted):
    xs = inputs(5, 3, seed=5)
    async with AsyncLstmClient(demo_server.address) as client, client.multiplexer() as mux:
        sessions = [await mux.session() for _ in range(5)]

        async def one(session, session_xs):
            return np.stack([await session.step(x) for x in session_xs])

        outputs = np.stack(await asyncio.gather(*(one(s, x) for s, x in zip(sessions, xs, strict=True))))
        with pytest.raises(LstmError) as invalid:
            await sessions[0].step(np.zeros((1, 5), np.float32))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for session in sessions:
            await session.close()
    check(scripted, xs, outputs)


def test_a_step_of_the_wrong_input_size_fails_only_its_session(demo_server, scripted):
    """Steps of one length T but different input sizes cannot share a [N, T, input] tensor."""
    xs = inputs(1, 1, seed=6)
    with LstmClient(demo_server.address, timeout=30) as client, client.multiplexer(max_in_flight=1) as mux:
        good, bad, blocker = mux.session(), mux.session(), mux.session()
        with ThreadPoolExecutor(3) as pool:
            # while one message is out, the next two steps wait and are packed together
            first = pool.submit(blocker.step, xs[0][0])
            stepped = [pool.submit(good.step, xs[0][0]), pool.submit(bad.step, np.zeros((1, 5), np.float32))]
            outputs = [first.result(30), stepped[0].result(30)]
            with pytest.raises(LstmError) as invalid:
                stepped[1].result(30)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        check(scripted, [xs[0], xs[0]], [o[None] for o in outputs])


async def test_the_asyncio_multiplexer_with_a_step_of_the_wrong_input_size(demo_server, scripted):
    xs = inputs(1, 1, seed=7)
    async with AsyncLstmClient(demo_server.address, timeout=30) as client, client.multiplexer() as mux:
        good, bad = await mux.session(), await mux.session()
        answers = await asyncio.wait_for(asyncio.gather(
            good.step(xs[0][0]), bad.step(np.zeros((1, 5), np.float32)), return_exceptions=True), 30)
        assert isinstance(answers[1], LstmError) and answers[1].code() == grpc.StatusCode.INVALID_ARGUMENT
        check(scripted, [xs[0]], [answers[0][None]])


def lose_a_step(proxy, direct: LstmClient, session, x) -> LstmError:
    """Steps `session` (multiplexed through `proxy`) with `x`: the server applies it, but its answer is held and then
    lost with the connection, which stays refused until the multiplexer gives up. Returns the step's error, once the
    proxy accepts connections again."""
    with ThreadPoolExecutor(1) as pool:
        proxy.hold_replies()
        lost = pool.submit(session.step, x)
        assert wait_for(lambda: direct.session(session_id=session.id).info().steps_applied == 1)
        proxy.refuse()
        proxy.release_replies()
        with pytest.raises(LstmError) as broken:
            lost.result(30)
    proxy.accept()
    return broken.value


def test_a_step_lost_with_the_stream_for_good_is_settled_before_the_next(demo_server, scripted):
    """The server applies a step, its answer is lost with the connection, which stays down past the retries: the
    step fails, but the session's next step must not reuse its number with other inputs."""
    xs = inputs(1, 2, seed=8)[0]
    with tcp_proxy(demo_server.address) as proxy, LstmClient(demo_server.address, timeout=30) as direct, \
            LstmClient(proxy.address, timeout=30, retry=RetryPolicy(max_backoff=0.1, give_up_after=0.5)) as client, \
            client.multiplexer() as mux:
        session = mux.session()
        assert lose_a_step(proxy, direct, session, xs[0]).code() == grpc.StatusCode.UNAVAILABLE
        y = session.step(xs[1])
        reference = Reference(scripted, 1, 3)
        reference.step(xs[0])
        np.testing.assert_allclose(y, reference.step(xs[1]), atol=TOLERANCE, rtol=0)
        assert direct.session(session_id=session.id).info().steps_applied == 2


def test_retrying_a_step_lost_with_the_stream_applies_it_once(demo_server, scripted):
    """The caller's retry of that step (the same inputs) is sent under its number: applied once, answered with its
    outputs; the next step follows it."""
    xs = inputs(1, 2, seed=12)[0]
    with tcp_proxy(demo_server.address) as proxy, LstmClient(demo_server.address, timeout=30) as direct, \
            LstmClient(proxy.address, timeout=30, retry=RetryPolicy(max_backoff=0.1, give_up_after=0.5)) as client, \
            client.multiplexer() as mux:
        session = mux.session()
        lose_a_step(proxy, direct, session, xs[0])
        retried, y = session.step(xs[0]), session.step(xs[1])
        reference = Reference(scripted, 1, 3)
        np.testing.assert_allclose(retried, reference.step(xs[0]), atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(y, reference.step(xs[1]), atol=TOLERANCE, rtol=0)
        assert direct.session(session_id=session.id).info().steps_applied == 2


async def test_an_asyncio_step_lost_with_the_stream_for_good_is_settled_before_the_next(demo_server, scripted):
    xs = inputs(1, 2, seed=9)[0]
    retry = RetryPolicy(max_backoff=0.1, give_up_after=0.5)
    with tcp_proxy(demo_server.address) as proxy:
        async with AsyncLstmClient(demo_server.address, timeout=30) as direct, \
                AsyncLstmClient(proxy.address, timeout=30, retry=retry) as client, client.multiplexer() as mux:
            session = await mux.session()
            proxy.hold_replies()
            lost = asyncio.create_task(session.step(xs[0]))
            for _ in range(1000):
                if (await direct.session(session_id=session.id).open()).next_sequence_number == 2:
                    break
                await asyncio.sleep(0.02)
            proxy.refuse()
            proxy.release_replies()
            with pytest.raises(LstmError) as broken:
                await asyncio.wait_for(lost, 30)
            assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
            proxy.accept()
            y = await asyncio.wait_for(session.step(xs[1]), 30)
            reference = Reference(scripted, 1, 3)
            reference.step(xs[0])
            np.testing.assert_allclose(y, reference.step(xs[1]), atol=TOLERANCE, rtol=0)
            assert (await direct.session(session_id=session.id).open()).next_sequence_number == 3


def wait_for(condition, seconds: float = 20) -> bool:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return True
        threading.Event().wait(0.02)
    return condition()


def test_a_step_that_cannot_reach_the_server_fails_at_the_clients_timeout(demo_server):
    with tcp_proxy(demo_server.address) as proxy, LstmClient(proxy.address, timeout=0.5) as client:
        mux = client.multiplexer()
        session = mux.session()
        proxy.refuse()
        with ThreadPoolExecutor(1) as pool:
            with pytest.raises(LstmError) as late:
                pool.submit(session.step, np.zeros(4, np.float32)).result(30)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        proxy.accept()
        client.timeout = 30  # the multiplexer may be waiting out its backoff
        session.step(np.zeros(4, np.float32))
        mux.close()


async def test_an_asyncio_step_that_cannot_reach_the_server_fails_at_the_clients_timeout(demo_server):
    with tcp_proxy(demo_server.address) as proxy:
        async with AsyncLstmClient(proxy.address, timeout=0.5) as client, client.multiplexer() as mux:
            session = await mux.session()
            proxy.refuse()
            with pytest.raises(LstmError) as late:
                await asyncio.wait_for(session.step(np.zeros(4, np.float32)), 30)
            assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            proxy.accept()
            client.timeout = 30  # the multiplexer may be waiting out its backoff
            await session.step(np.zeros(4, np.float32))


@pytest.mark.parametrize("shape", [(1, 1, 4), (0, 4)])
async def test_a_step_of_the_wrong_rank_or_no_time_steps_fails_only_its_session(demo_server, scripted, shape):
    """Sent first, it would end the stream, and fail the other sessions' steps in flight with it."""
    xs = inputs(1, 1, seed=10)
    async with AsyncLstmClient(demo_server.address, timeout=30) as client, client.multiplexer(max_in_flight=1) as mux:
        good, bad = await mux.session(), await mux.session()
        answers = await asyncio.gather(bad.step(np.zeros(shape, np.float32)), good.step(xs[0][0]),
                                       return_exceptions=True)
        assert isinstance(answers[0], LstmError) and answers[0].code() == grpc.StatusCode.INVALID_ARGUMENT
        check(scripted, [xs[0]], [answers[1][None]])


@pytest.fixture(scope="module")
def rate_limited_server(demo_model):
    with server_in_thread(demo_model, rate_limit=20.0, rate_limit_burst=5) as server:
        yield server


def test_steps_refused_by_a_rate_limit_are_retried_when_the_server_says(rate_limited_server, scripted):
    """As a unary step is: the in-band refusal carries RetryInfo, and nothing of the step was applied."""
    xs = inputs(1, 15, seed=11)
    with LstmClient(rate_limited_server.address, timeout=30) as client, client.multiplexer() as mux:
        check(scripted, xs, drive([mux.session()], xs))


async def test_asyncio_steps_refused_by_a_rate_limit_are_retried_when_the_server_says(rate_limited_server, scripted):
    xs = inputs(1, 15, seed=12)
    async with AsyncLstmClient(rate_limited_server.address, timeout=30) as client, client.multiplexer() as mux:
        session = await mux.session()
        check(scripted, xs, [np.stack([await session.step(x) for x in xs[0]])])


def stream_columns_calls(server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(row.split()[-1]) for row in text.splitlines() if row.startswith("lstmserve_rpcs_total{")
               and 'method="/lstmserve.v1.LstmService/StreamColumns"' in row)


def test_a_multiplexer_refused_for_good_does_not_call_again_and_again(demo_model, tmp_path):
    """Its token revoked, every new stream is refused at once: with nothing to send, none is opened."""
    pki = make_pki(tmp_path)
    credentials = Credentials(root_certificates=str(pki.ca.cert), token=pki.tokens["alice"])
    with server_in_thread(demo_model, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tokens_file=str(pki.tokens_file)) as server, tcp_proxy(server.address) as proxy, \
            LstmClient(proxy.address, timeout=10, credentials=credentials) as client, client.multiplexer() as mux:
        session = mux.session()
        session.step(np.zeros(4, np.float32))
        pki.tokens_file.write_text("")  # alice's token revoked; the open stream goes on until it breaks
        server.loop.call_soon_threadsafe(server.app.reload)
        proxy.cut()
        with pytest.raises(LstmError) as refused:
            session.step(np.zeros(4, np.float32))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        calls = stream_columns_calls(server)
        threading.Event().wait(0.5)
        assert stream_columns_calls(server) == calls


async def test_an_asyncio_multiplexer_refused_for_good_does_not_call_again_and_again(demo_model, tmp_path):
    pki = make_pki(tmp_path)
    credentials = Credentials(root_certificates=str(pki.ca.cert), token=pki.tokens["alice"])
    with server_in_thread(demo_model, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tokens_file=str(pki.tokens_file)) as server, tcp_proxy(server.address) as proxy:
        async with AsyncLstmClient(proxy.address, timeout=10, credentials=credentials) as client, \
                client.multiplexer() as mux:
            session = await mux.session()
            await session.step(np.zeros(4, np.float32))
            pki.tokens_file.write_text("")
            server.loop.call_soon_threadsafe(server.app.reload)
            proxy.cut()
            with pytest.raises(LstmError) as refused:
                await session.step(np.zeros(4, np.float32))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            calls = stream_columns_calls(server)
            await asyncio.sleep(0.5)
            assert stream_columns_calls(server) == calls
