"""TLS, mutual TLS, bearer tokens, sessions bound to their principal, per-principal limits; real servers."""

import functools
import secrets

import grpc
import numpy as np
import pytest
import torch
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb

from client import Credentials, LstmClient, Session, StepError
from client.channel import open_channel
from client.resume import RetryPolicy
from tests.certs import make_pki
from tests.integration.reference import TOLERANCE, Reference
from tests.integration.test_service import scrape
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))

# refusals are what these tests look at: a client that retries them would only see its deadline
NO_RETRY = RetryPolicy(give_up_after=0)


@pytest.fixture(scope="module")
def token_server(demo_model, pki):
    """TLS with bearer tokens (no client certificates)."""
    with server_in_thread(demo_model, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tokens_file=str(pki.tokens_file)) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(demo_model, pki):
    """Mutual TLS: clients need a certificate signed by the trusted CA; its subject is the principal."""
    with server_in_thread(demo_model, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tls_client_ca_file=str(pki.ca.cert)) as server:
        yield server


def client(server, pki, token=None, identity=None, roots=None) -> LstmClient:
    return LstmClient(server.address, timeout=10, retry=NO_RETRY, credentials=Credentials(
        root_certificates=str(roots or pki.ca.cert), token=token,
        certificate_chain=identity and str(identity.cert), private_key=identity and str(identity.key)))


def refusal(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


# -- transport ----------------------------------------------------------------------------------

def test_a_plaintext_client_is_refused_by_a_tls_server(token_server, pki):
    with LstmClient(token_server.address, timeout=10, retry=NO_RETRY) as plain:
        assert refusal(plain.info).code() == grpc.StatusCode.UNAVAILABLE
    with client(token_server, pki, token=pki.tokens["alice"]) as tls:
        assert tls.info().input_size == 4


def test_a_client_refuses_a_server_certificate_from_another_ca(token_server, pki):
    with client(token_server, pki, token=pki.tokens["alice"], roots=pki.other_ca.cert) as wary:
        error = refusal(wary.info)
    assert error.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_or_with_one_from_another_ca(mtls_server, pki):
    with client(mtls_server, pki) as anonymous:
        assert refusal(anonymous.info).code() == grpc.StatusCode.UNAVAILABLE
        assert refusal(anonymous.health).code() == grpc.StatusCode.UNAVAILABLE  # no handshake, no health
    with client(mtls_server, pki, identity=pki.mallory) as impostor:
        assert refusal(impostor.info).code() == grpc.StatusCode.UNAVAILABLE
    with client(mtls_server, pki, identity=pki.alice) as alice:
        assert alice.info().input_size == 4


def test_each_client_certificate_is_its_own_principal(mtls_server, pki):
    with client(mtls_server, pki, identity=pki.alice) as alice, \
            client(mtls_server, pki, identity=pki.bob) as bob:
        session = alice.session()
        assert refusal(lambda: bob.session(session_id=session.id)).code() == grpc.StatusCode.NOT_FOUND
        assert alice.session(session_id=session.id).id == session.id


@pytest.fixture(scope="module")
def workloads(pki):
    """Client certificates whose identity is in their SANs, or nowhere (see CertificateAuthority.issue_client)."""
    issue = pki.ca.issue_client
    return {
        "spiffe one": issue(None, uris=("spiffe://example.org/one",), file_stem="spiffe-one"),
        "spiffe two": issue(None, uris=("spiffe://example.org/two",), file_stem="spiffe-two"),
        "dns a": issue(None, dns_names=("a.example.org",), file_stem="dns-a"),
        "dns b": issue(None, dns_names=("b.example.org",), file_stem="dns-b"),
        # the URI SAN wins over the subject, the subject over a DNS SAN
        "alice with a spiffe id": issue("alice", uris=("spiffe://example.org/alice",), file_stem="alice-uri"),
        "alice with a dns name": issue("alice", dns_names=("alice.example.org",), file_stem="alice-dns"),
        "nameless": issue(None, file_stem="nameless"),
        "nameless too": issue(None, file_stem="nameless-too"),
    }


@pytest.mark.parametrize("owner, stranger", [("spiffe one", "spiffe two"), ("dns a", "dns b"),
                                             ("alice", "alice with a spiffe id")])
def test_certificates_naming_different_identities_are_different_principals(mtls_server, pki, workloads, owner,
                                                                            stranger):
    identities = {**workloads, "alice": pki.alice}
    with client(mtls_server, pki, identity=identities[owner]) as mine, \
            client(mtls_server, pki, identity=identities[stranger]) as theirs:
        session = mine.session()
        session.step(np.ones(4))
        before = session.state()
        ref = pb.SessionRef(session_id=session.id)
        for call in (theirs.stub.GetState, theirs.stub.CloseSession):
            assert refusal(lambda call=call: call(ref)).code() == grpc.StatusCode.NOT_FOUND
        for got, want in zip(session.state(), before, strict=True):
            np.testing.assert_array_equal(got, want)
        session.close()


def test_a_dns_name_beside_a_subject_does_not_change_the_principal(mtls_server, pki, workloads):
    with client(mtls_server, pki, identity=pki.alice) as alice, \
            client(mtls_server, pki, identity=workloads["alice with a dns name"]) as alice_too:
        session = alice.session()
        assert alice_too.session(session_id=session.id).id == session.id
        alice_too.stub.CloseSession(pb.SessionRef(session_id=session.id))


def test_a_certificate_naming_no_identity_is_unauthenticated(mtls_server, pki, workloads):
    with client(mtls_server, pki, identity=workloads["nameless"]) as nameless, \
            client(mtls_server, pki, identity=workloads["nameless too"]) as nameless_too:
        for call in (nameless.session, nameless.info, lambda: nameless_too.stub.GetSession(pb.SessionRef(
                session_id=secrets.token_urlsafe(16)))):
            error = refusal(call)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "names no identity" in error.details()


# -- bearer tokens ------------------------------------------------------------------------------

def test_a_valid_token_is_accepted_and_a_bad_or_missing_one_is_unauthenticated(token_server, pki):
    with client(token_server, pki, token=pki.tokens["alice"]) as alice:
        with alice.session() as session:
            assert session.step(np.ones(4)).shape == (3,)
    real = pki.tokens["alice"]
    forged = ("y" if real[0] == "x" else "x") + real[1:]  # one character off, never the real token
    for token in (forged, None):
        with client(token_server, pki, token=token) as stranger:
            error = refusal(stranger.session)
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert forged not in error.details()
    with client(token_server, pki) as anonymous:
        assert "bearer token" in refusal(lambda: anonymous.predict(np.ones((1, 1, 4)))).details()
        assert anonymous.health() == "SERVING"  # open_health_and_reflection is on by default


def test_a_caller_without_credentials_is_unauthenticated_before_its_request_is_parsed(token_server, pki):
    """Authentication comes first: bytes that are not the method's request do not earn a stranger an answer
    about them (INVALID_ARGUMENT naming the message type)."""
    for token, code in ((None, grpc.StatusCode.UNAUTHENTICATED), ("not-a-token", grpc.StatusCode.UNAUTHENTICATED),
                        (pki.tokens["alice"], grpc.StatusCode.INVALID_ARGUMENT)):
        credentials = Credentials(root_certificates=str(pki.ca.cert), token=token)
        with open_channel(grpc, token_server.address, credentials) as channel:
            get_state = functools.partial(channel.unary_unary("/lstmserve.v1.LstmService/GetState"),
                                          b"\xff\xff\xff", timeout=10)
            assert refusal(get_state).code() == code


def test_principal_b_gets_not_found_for_every_call_on_a_session_of_a(token_server, pki, demo_model):
    reference = Reference(torch.jit.load(str(demo_model)), 1, 3)
    with client(token_server, pki, token=pki.tokens["alice"]) as alice, \
            client(token_server, pki, token=pki.tokens["bob"]) as bob:
        session = alice.session()
        x1, x2 = np.full((2, 4), 0.5, np.float32), np.full((1, 4), -0.25, np.float32)
        np.testing.assert_allclose(session.step(x1), reference.step(x1), atol=TOLERANCE)
        before = session.state()
        stranger_id = secrets.token_urlsafe(16)

        def bob_calls(session_id):
            ref = pb.SessionRef(session_id=session_id)
            step = pb.StepRequest(session_id=session_id, sequence_number=2,
                                  inputs=pb.Tensor(shape=[1, 4], values=[9.0] * 4))
            return {
                "GetSession": lambda: bob.stub.GetSession(ref),
                "GetState": lambda: bob.stub.GetState(ref),
                "Step": lambda: bob.stub.Step(step),
                "ResetSession": lambda: bob.stub.ResetSession(pb.ResetSessionRequest(session_id=session_id)),
                "CloseSession": lambda: bob.stub.CloseSession(ref),
            }

        for name, call in bob_calls(session.id).items():
            error, unknown = refusal(call), refusal(bob_calls(stranger_id)[name])
            assert error.code() == unknown.code() == grpc.StatusCode.NOT_FOUND, name
            assert error.details().replace(session.id, stranger_id) == unknown.details(), name
        with pytest.raises(StepError) as in_band:  # a stream answers in-band, the same way
            list(Session(bob, session.id, 1).stream([np.ones(4)]))
        assert in_band.value.code() == grpc.StatusCode.NOT_FOUND

        for got, want in zip(session.state(), before, strict=True):
            np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(session.step(x2), reference.step(x2), atol=TOLERANCE)
        session.close()


# -- per-principal limits -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def limited_server(demo_model, pki):
    # rate_limit is so slow that no token comes back during the test: the burst is all there is.
    with server_in_thread(demo_model, tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                          tokens_file=str(pki.tokens_file), max_sessions_per_owner=2, rate_limit=1e-6,
                          rate_limit_burst=6, open_health_and_reflection=False) as server:
        yield server


def test_per_principal_session_and_rate_limits(limited_server, pki):
    applied_before = scrape(limited_server).get("lstmserve_steps_applied_total", 0)
    with client(limited_server, pki, token=pki.tokens["alice"]) as alice, \
            client(limited_server, pki, token=pki.tokens["bob"]) as bob:
        first, second = alice.session(), alice.session()  # alice's requests 1 and 2
        third = refusal(alice.session)  # 3
        assert third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_owner=2" in third.details()
        bob_session = bob.session()  # another principal's sessions count apart
        first.step(np.ones(4))  # 4
        answered = []
        with pytest.raises(StepError) as in_band:  # 5 and 6 are answered, 7 is refused in-band
            for y in first.stream([np.ones(4)] * 3):
                answered.append(y)
        assert len(answered) == 2
        assert in_band.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate_limit=" in in_band.value.details()
        over = refusal(second.info)
        assert over.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_limit=" in over.details()
        assert bob_session.step(np.ones(4)).shape == (3,)  # bob has his own bucket
    # Applied: alice's 1 + 2 streamed steps and bob's 1; the refused streamed step changed nothing.
    assert scrape(limited_server)["lstmserve_steps_applied_total"] - applied_before == 4


def test_health_and_reflection_can_require_credentials(limited_server, pki):
    with client(limited_server, pki) as anonymous:
        assert refusal(anonymous.health).code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_step_that_opens_its_session_is_one_request_for_the_rate_limit(demo_model):
    """A Step with new_session is one request, as CreateSession then Step are two; and when its step is refused,
    the session it opened is closed whatever the rate limit says (it was counted as that one request)."""
    with server_in_thread(demo_model, rate_limit=1e-6, rate_limit_burst=3) as server, \
            LstmClient(server.address, timeout=10, retry=NO_RETRY) as caller:
        inputs = tensors.to_proto(np.ones((1, 4), np.float32))
        skipping = refusal(lambda: caller.stub.Step(pb.StepRequest(  # 1
            new_session=pb.CreateSessionRequest(), sequence_number=5, inputs=inputs)))
        assert skipping.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert server.app.engine.session_count == 0
        opened = caller.stub.Step(pb.StepRequest(new_session=pb.CreateSessionRequest(), inputs=inputs))  # 2
        caller.stub.Step(pb.StepRequest(session_id=opened.session_id, sequence_number=2, inputs=inputs))  # 3
        fourth = refusal(lambda: caller.stub.Step(pb.StepRequest(new_session=pb.CreateSessionRequest(),
                                                                 inputs=inputs)))
        assert fourth.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate_limit=" in fourth.details()
        assert server.app.engine.session_count == 1


def test_a_reset_is_one_request_for_the_rate_limit(demo_model):
    """ResetSession answers with the session's info: reading it is part of the one request, not a second one that
    could be refused after the reset was applied."""
    with server_in_thread(demo_model, rate_limit=1e-6, rate_limit_burst=2) as server, \
            LstmClient(server.address, timeout=10, retry=NO_RETRY) as caller:
        session_id = caller.stub.CreateSession(pb.CreateSessionRequest()).session_id  # 1
        info = caller.stub.ResetSession(pb.ResetSessionRequest(session_id=session_id, sequence_number=1))  # 2
        assert (info.session_id, info.last_sequence_number) == (session_id, 1)
        assert refusal(lambda: caller.stub.GetSession(pb.SessionRef(session_id=session_id))).code() == \
            grpc.StatusCode.RESOURCE_EXHAUSTED
