"""Rate limiter, tokens file, principal rules, settings rules, and the generic answer to unexpected errors."""

import hashlib

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from server.engine import Engine, LimitExceeded, SessionNotFound
from server.engine.rate_limit import RateLimiter
from server.metrics import Metrics
from server.settings import Settings
from server.transport.auth import Authenticator, TokenTable
from server.transport.errors import Unauthenticated, status_for
from tests.fakes import FakeRuntime
from tests.limits import limits_with

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_rate_limiter_allows_a_burst_then_the_rate_per_owner():
    clock = Clock()
    limiter = RateLimiter(rate=2.0, burst=3, clock=clock)
    for _ in range(3):
        limiter.admit("alice")
    with pytest.raises(LimitExceeded, match="rate_limit=2/s"):
        limiter.admit("alice")
    limiter.admit("bob")  # a bucket of his own
    clock.now += 0.5  # one request's worth at 2/s
    limiter.admit("alice")
    with pytest.raises(LimitExceeded):
        limiter.admit("alice")
    clock.now += 100  # refills up to the burst, not beyond
    for _ in range(3):
        limiter.admit("alice")
    with pytest.raises(LimitExceeded):
        limiter.admit("alice")


def test_a_zero_rate_means_no_limit():
    limiter = RateLimiter(rate=0, burst=1, clock=Clock())
    for _ in range(1000):
        limiter.admit("alice")


def tokens_file(tmp_path, text: str):
    path = tmp_path / "tokens.txt"
    path.write_text(text)
    return path


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def test_the_tokens_file_maps_token_hashes_to_principals(tmp_path):
    table = TokenTable.load(tokens_file(tmp_path, f"# comment\n\n{digest('s3cret')} team a  # ops\n"
                                                  f"{digest('other')} bob\n"))
    assert table.principal("s3cret") == "team a"
    assert table.principal("other") == "bob"
    assert table.principal("s3cre") is None and table.principal("") is None


@pytest.mark.parametrize("text, problem", [
    ("s3cret alice\n", ":1: expected"),  # a raw token, not its hash
    (f"{digest('x')}\n", ":1: expected"),  # no principal
    (f"{digest('x')} a\n{digest('x')} b\n", ":2: this token hash is listed twice"),
])
def test_a_malformed_tokens_file_is_refused_with_its_line(tmp_path, text, problem):
    with pytest.raises(ValueError, match=problem):
        TokenTable.load(tokens_file(tmp_path, text))


def test_a_token_wins_over_a_certificate_and_a_bad_one_is_never_echoed(tmp_path):
    auth = Authenticator(str(tokens_file(tmp_path, f"{digest('good')} alice\n")), client_certificates=True)
    certificate = {"x509_subject": [b"CN=carol,O=x"]}
    assert auth.principal([("authorization", "Bearer good")], certificate) == "alice"
    assert auth.principal([], certificate) == "CN=carol,O=x"
    for header in ("Bearer forged-secret", "Basic forged-secret", "Bearer "):
        with pytest.raises(Unauthenticated) as error:
            auth.principal([("authorization", header)], certificate)  # a bad token never falls back
        assert "forged-secret" not in str(error.value)
    with pytest.raises(Unauthenticated, match="bearer token .* or a client certificate"):
        auth.principal([], {})


@pytest.mark.parametrize("auth_context, principal", [
    ({"x509_subject": [b"CN=carol,O=x"], "peer_dns": [b"carol.example"]}, "CN=carol,O=x"),
    ({"x509_subject": [b"CN=carol,O=x"], "peer_uri": [b"spiffe://example.org/a", b"spiffe://example.org/b"]},
     "spiffe://example.org/a"),
    ({"x509_subject": [b""], "peer_dns": [b"a.example", b"b.example"]}, "a.example"),
    ({"x509_subject": [b""], "peer_ip": [b"127.0.0.1"]}, None),
    ({"x509_subject": [b""]}, None),
])
def test_a_certificate_principal_is_its_uri_san_else_subject_else_dns_san_never_empty(auth_context, principal):
    auth = Authenticator(client_certificates=True)
    if principal is not None:
        assert auth.principal([], auth_context) == principal
        return
    with pytest.raises(Unauthenticated, match="names no identity"):
        auth.principal([], auth_context)


@pytest.mark.parametrize("argv, problem", [
    (["--tls-cert-file", "c.pem"], "go together"),
    (["--tls-client-ca-file", "ca.pem"], "needs --tls-cert-file"),
])
def test_tls_settings_that_cannot_work_stop_start_up(argv, problem, capsys):
    with pytest.raises(SystemExit):
        Settings.from_args(argv, environ={})
    assert problem in capsys.readouterr().err


def test_auth_is_on_with_a_tokens_file_or_a_client_ca():
    assert not Settings().auth
    assert Settings(tokens_file="t").auth
    assert Settings(tls_cert_file="c", tls_key_file="k", tls_client_ca_file="ca").auth


def test_unexpected_errors_become_a_generic_internal_status():
    code, message = status_for(RuntimeError("/secret/path token=abc tensor([0.123])"))
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in message and "0.123" not in message
    assert status_for(Unauthenticated("no credentials"))[0] == grpc.StatusCode.UNAUTHENTICATED


async def test_the_engine_hides_other_owners_sessions_and_limits_sessions_per_owner():
    engine = Engine(FakeRuntime(), limits_with(max_sessions_per_owner=2), Metrics(CollectorRegistry()))
    await engine.start()
    try:
        mine = (await engine.create_session(owner="alice")).session_id
        await engine.create_session(owner="alice")
        with pytest.raises(LimitExceeded, match="max_sessions_per_owner=2"):
            await engine.create_session(owner="alice")
        await engine.create_session(owner="bob")
        for call in (lambda: engine.get_session(mine, owner="bob"),
                     lambda: engine.get_state(mine, owner="bob"),
                     lambda: engine.step(mine, np.ones((1, 2), np.float32), owner="bob"),
                     lambda: engine.reset(mine, owner="bob"),
                     lambda: engine.close_session(mine, owner="bob")):
            with pytest.raises(SessionNotFound):
                await call()
        await engine.close_session(mine, owner="alice")  # frees one of alice's two
        await engine.create_session(owner="alice")
    finally:
        await engine.stop()
