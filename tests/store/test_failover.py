"""Client failover across replicas: kill -9 the replica serving many streams; nothing acknowledged is lost."""

import signal
import threading
import time

import numpy as np
import pytest
import torch

from client import LstmClient
from server.testing.processes import lstmserve_process
from server.testing.redis_server import redis_server
from tests.integration.reference import TOLERANCE, Reference

pytestmark = pytest.mark.integration

SESSIONS, STEPS = 24, 60


def test_every_step_streams_fail_over_to_the_next_replica_without_losing_or_repeating_a_step(demo_model, tmp_path):
    module = torch.jit.load(str(demo_model))
    rng = np.random.default_rng(7)
    inputs = rng.standard_normal((SESSIONS, STEPS, 4)).astype(np.float32)
    flags = ("--durability", "every-step", "--lease-ttl", "1", "--lease-wait", "8")
    received = [[] for _ in range(SESSIONS)]
    errors = []
    answered = threading.Semaphore(0)

    def paced(xs):
        for x in xs:
            time.sleep(0.01)  # keep every stream open across the kill
            yield x

    def drive(client, k):
        try:
            with client.session() as session:
                for y in session.stream(paced(inputs[k]), timeout=120):
                    received[k].append(y)
                    answered.release()
                received[k].append(session.state())
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    with redis_server(tmp_path) as redis:
        replicas = [lstmserve_process(demo_model, tmp_path / f"{name}.log", "--state-store", redis.url, *flags)
                    for name in "abc"]
        with replicas[0] as a, replicas[1] as b, replicas[2] as c:
            with LstmClient(f"{a.address},{b.address},{c.address}", timeout=120) as client:
                threads = [threading.Thread(target=drive, args=(client, k)) for k in range(SESSIONS)]
                for thread in threads:
                    thread.start()
                for _ in range(SESSIONS * STEPS // 4):  # a quarter of all steps acknowledged, then kill -9
                    assert answered.acquire(timeout=60)
                a.process.send_signal(signal.SIGKILL)
                for thread in threads:
                    thread.join(180)
            assert "took over session" in b.log() + c.log()
    assert not errors, errors
    for k in range(SESSIONS):
        reference = Reference(module, 1, 3)
        *outputs, (h, c) = received[k]
        assert len(outputs) == STEPS  # every step answered exactly once
        expected = np.stack([reference.step(x[None])[0] for x in inputs[k]])
        np.testing.assert_allclose(np.stack(outputs), expected, atol=TOLERANCE)
        np.testing.assert_allclose(h, reference.state[0], atol=TOLERANCE)
        np.testing.assert_allclose(c, reference.state[1], atol=TOLERANCE)
