"""`lstmserve` as a process: certificate and token reload on SIGHUP, and what its log never contains."""

import hashlib
import re
import secrets
import shutil
import signal
import time

import grpc
import numpy as np
import pytest
import torch
from lstmserve.v1 import lstm_service_pb2 as pb

from client import Credentials, LstmClient
from client.resume import RetryPolicy
from server.logsafe import fingerprint
from server.testing.processes import lstmserve_process
from tests.certs import CertificateAuthority, make_pki
from tests.integration.reference import TOLERANCE, Reference

pytestmark = pytest.mark.integration

# refusals are what these tests look at: a client that retries them would only see its deadline
NO_RETRY = RetryPolicy(give_up_after=0)


def wait_for_log(server, text: str, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.log().count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count}x:\n{server.log()}"
        time.sleep(0.05)


def test_sighup_reloads_certificates_and_tokens_while_sessions_live_on(tmp_path, demo_model):
    pki = make_pki(tmp_path)
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    reference = Reference(torch.jit.load(str(demo_model)), 1, 3)
    x1, x2 = np.full((2, 4), 0.5, np.float32), np.full((1, 4), -0.25, np.float32)
    flags = ("--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tokens-file", str(pki.tokens_file))
    with lstmserve_process(demo_model, tmp_path / "server.log", *flags) as server:
        def connect(roots, token=pki.tokens["alice"]):
            return LstmClient(server.address, timeout=10, retry=NO_RETRY,
                              credentials=Credentials(root_certificates=str(roots), token=token))

        with connect(pki.ca.cert) as old_client:
            session = old_client.session()
            np.testing.assert_allclose(session.step(x1), reference.step(x1), atol=TOLERANCE)

            new_ca = CertificateAuthority(tmp_path, "rotated")
            rotated = new_ca.issue_server("rotated-server")
            shutil.copy(rotated.cert, cert)
            shutil.copy(rotated.key, key)
            carol = secrets.token_urlsafe(32)
            with open(pki.tokens_file, "a") as tokens:
                tokens.write(f"{hashlib.sha256(carol.encode()).hexdigest()} carol\n")
            server.process.send_signal(signal.SIGHUP)
            wait_for_log(server, "reloaded the TLS certificates")
            wait_for_log(server, "reloaded the tokens file")

            with connect(pki.ca.cert) as stale:  # a new connection gets the new certificate...
                assert pytest.raises(grpc.RpcError, stale.info).value.code() == grpc.StatusCode.UNAVAILABLE
            with connect(new_ca.cert) as fresh:  # ...which the new CA vouches for; the session is still there
                assert fresh.session(session_id=session.id).info().last_sequence_number == 1
            with connect(new_ca.cert, token=carol) as newcomer:
                assert newcomer.info().input_size == 4
            # The connection opened before the reload goes on, and so does the session's state.
            np.testing.assert_allclose(session.step(x2), reference.step(x2), atol=TOLERANCE)

            key.write_text("not a key")  # a broken reload keeps what works
            server.process.send_signal(signal.SIGHUP)
            wait_for_log(server, "kept the previous TLS certificates")
            with connect(new_ca.cert) as fresh:
                assert fresh.info().input_size == 4


def test_the_log_holds_no_tokens_tensor_values_or_session_ids(tmp_path, demo_model):
    pki = make_pki(tmp_path)
    flags = ("--tls-cert-file", str(pki.server.cert), "--tls-key-file", str(pki.server.key),
             "--tokens-file", str(pki.tokens_file), "--log-level", "DEBUG")
    forged = secrets.token_urlsafe(32)
    inputs = np.array([[0.7312911, -1.3987712, 2.2718374, 0.1122334]], np.float32)
    with lstmserve_process(demo_model, tmp_path / "server.log", *flags) as server:
        def connect(token):
            return LstmClient(server.address, timeout=10, retry=NO_RETRY,
                              credentials=Credentials(root_certificates=str(pki.ca.cert), token=token))

        with connect(pki.tokens["alice"]) as alice, connect(pki.tokens["bob"]) as bob, \
                connect(forged) as mallory:
            session = alice.session()
            outputs = [session.step(inputs), *session.stream([inputs[0], inputs[0]])]
            state = session.state()
            session.reset(h=inputs[:, :3], c=inputs[:, 1:])
            prediction = alice.predict(inputs[:, None, :])
            for call in (lambda: session.step(np.full((1, 4), np.nan)),  # refused: NaN
                         lambda: session.step(inputs[:, :3]),  # refused: wrong shape
                         lambda: bob.session(session_id=session.id),  # refused: another principal's
                         mallory.session):  # refused: unknown token
                pytest.raises(grpc.RpcError, call)
            bob.stub.Step(pb.StepRequest(new_session=pb.CreateSessionRequest(),
                                         inputs=pb.Tensor(shape=[1, 4], values=inputs[0].tolist())))
            session.close()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(60) == 0
        log = server.log()

    assert " DEBUG " in log and "refused /lstmserve.v1.LstmService/" in log  # it has content
    for token in (*pki.tokens.values(), forged):
        assert token not in log
    values = [*inputs.ravel(), *np.concatenate([np.ravel(a) for a in (*outputs, *state, *prediction)])]
    for value in values:
        assert f"{value:.5f}" not in log and repr(float(value))[:8] not in log, value
    important = [line for line in log.splitlines() if re.search(r" (INFO|WARNING|ERROR|CRITICAL) ", line)]
    assert not [line for line in important if session.id in line]
    assert session.id not in log and fingerprint(session.id) in log  # DEBUG lines name a fingerprint only
