"""A version's sessions beyond one engine: carried to a new version when the operator says so, restored from a
snapshot onto their version, taken over by a replica that serves their version (or refused by one that does not);
the repository polled for new versions."""

import asyncio
import signal
import time

import grpc
import numpy as np
import pytest
from lstmserve import tensors
from lstmserve.v1 import lstm_service_pb2 as pb
from lstmserve.v1 import lstm_service_pb2_grpc as pb_grpc

from client import Credentials, LstmClient, LstmError
from server.models.versions import named
from server.policies import Durability
from server.store import RedisStateStore, SessionRecord
from server.testing.processes import lstmserve_process
from server.testing.redis_server import redis_server
from tests.certs import make_pki
from tests.integration.reference import TOLERANCE, Reference
from tests.models.repository_files import SIZES, add_version, state_name, states, write_config
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

X = np.linspace(-1, 1, 3 * SIZES[0], dtype=np.float32).reshape(3, SIZES[0])


def step(stub, session_id: str, x: np.ndarray = X) -> np.ndarray:
    return tensors.from_proto(stub.Step(pb.StepRequest(session_id=session_id, inputs=tensors.to_proto(x))).outputs)


def wait_for(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.02)


def reference_of(module, state=None) -> Reference:
    h, c = state or (None, None)
    return Reference(module, SIZES[2], SIZES[1], h, c)


def test_with_state_migration_carry_a_session_moves_to_the_new_version_at_its_next_step(tmp_path):
    v1 = add_version(tmp_path, "m", 1, seed=1)
    write_config(tmp_path, "m", state_migration="carry")
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
        before = reference_of(v1)
        np.testing.assert_allclose(step(stub, session_id), before.step(X), atol=TOLERANCE)
        v2 = add_version(tmp_path, "m", 2, seed=2)
        server.call(server.app.registry.reload())
        np.testing.assert_allclose(step(stub, session_id), reference_of(v2, before.state).step(X), atol=TOLERANCE)
        assert stub.GetSession(pb.SessionRef(session_id=session_id)).model_version == 2
        wait_for(lambda: state_name(states(channel)[("m", 1)]) == "UNAVAILABLE", "version 1 to be unloaded")


def test_with_carry_another_principals_request_does_not_move_a_session(tmp_path):
    """A session is carried at its owner's next request: another principal's call on its id is NOT_FOUND and
    leaves it where it is."""
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki")
    repository = tmp_path / "repository"
    add_version(repository, "m", 1, seed=1)
    write_config(repository, "m", state_migration="carry")
    with server_in_thread(repository, model_repository=str(repository), tls_cert_file=str(pki.server.cert),
                          tls_key_file=str(pki.server.key), tokens_file=str(pki.tokens_file)) as server:
        alice, bob = (LstmClient(server.address, credentials=Credentials(root_certificates=str(pki.ca.cert),
                                                                         token=pki.tokens[name]))
                      for name in ("alice", "bob"))
        with alice, bob:
            session_id = alice.session().id
            add_version(repository, "m", 2, seed=2)
            server.call(server.app.registry.reload())
            with pytest.raises(grpc.RpcError) as error:
                bob.stub.GetSession(pb.SessionRef(session_id=session_id))
            assert error.value.code() == grpc.StatusCode.NOT_FOUND
            registry = server.app.registry
            assert registry.version_of(registry.live_engine(session_id)) == ("m", 1)
            assert alice.session(session_id=session_id).info().model_version == 2  # its owner's request moves it


def stored_record(url: str, session_id: str) -> SessionRecord | None:
    async def load():
        store = RedisStateStore(url, "test-reader", lease_ttl=1.0, state_ttl=60, lease_wait=0.1)
        try:
            return await store.load(session_id)
        finally:
            await store.close()
    return asyncio.run(load())


def test_with_carry_and_a_state_store_the_stored_record_names_the_new_version_as_it_moves(tmp_path):
    """Checkpoints far apart: no step writes the session after its creation, so the record names version 2 only if
    the carry wrote it, and a replica taking the session over after a crash would take it onto version 2."""
    repository = tmp_path / "models"
    v1 = add_version(repository, "m", 1, seed=1)
    write_config(repository, "m", state_migration="carry")
    checkpoints = dict(durability=Durability.CHECKPOINT, checkpoint_every=1000, checkpoint_interval=3600.0)
    with redis_server(tmp_path) as redis, \
            server_in_thread(repository, model_repository=str(repository), state_store=redis.url, **checkpoints) \
            as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
        before = reference_of(v1)
        np.testing.assert_allclose(step(stub, session_id), before.step(X), atol=TOLERANCE)
        assert named(stored_record(redis.url, session_id).model) == ("m", 1)
        v2 = add_version(repository, "m", 2, seed=2)
        server.call(server.app.registry.reload())
        np.testing.assert_allclose(step(stub, session_id), reference_of(v2, before.state).step(X), atol=TOLERANCE)
        record = stored_record(redis.url, session_id)
        assert (named(record.model), record.last_applied_seq) == (("m", 2), 1)  # the state carried, as it was


def test_with_carry_a_version_of_another_state_shape_is_refused(tmp_path):
    add_version(tmp_path, "m", 1, seed=1)
    add_version(tmp_path, "m", 2, seed=2, sizes=(SIZES[0], SIZES[1] * 2, 1, None))
    write_config(tmp_path, "m", state_migration="carry", version_policy={"all": {}})
    with server_in_thread(tmp_path, model_repository=str(tmp_path)) as server, \
            grpc.insecure_channel(server.address) as channel:
        listed = states(channel)
        assert state_name(listed[("m", 2)]) == "UNAVAILABLE" and "state shape" in listed[("m", 2)].reason
        assert state_name(listed[("m", 1)]) == "READY"


def test_a_polled_repository_rolls_a_new_version_out_by_itself(tmp_path):
    add_version(tmp_path, "m", 1, seed=1)
    with server_in_thread(tmp_path, model_repository=str(tmp_path), poll_repository=0.05) as server, \
            grpc.insecure_channel(server.address) as channel:
        add_version(tmp_path, "m", 2, seed=2)
        wait_for(lambda: ("m", 2) in states(channel) and states(channel)[("m", 2)].is_default,
                 "version 2 to become the default")
        assert pb_grpc.LstmServiceStub(channel).CreateSession(pb.CreateSessionRequest()).model_version == 2


def test_a_snapshot_brings_sessions_back_onto_their_version(tmp_path):
    repository, snapshots = tmp_path / "models", tmp_path / "snapshots"
    v1 = add_version(repository, "m", 1, seed=1)
    settings = dict(model_repository=str(repository), snapshot_dir=str(snapshots))
    reference = reference_of(v1)
    with server_in_thread(repository, **settings) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
        np.testing.assert_allclose(step(stub, session_id), reference.step(X), atol=TOLERANCE)
    assert (snapshots / "m" / "1").is_dir()
    with server_in_thread(repository, **settings) as server, grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.LstmServiceStub(channel)
        np.testing.assert_allclose(step(stub, session_id), reference.step(X), atol=TOLERANCE)
        assert stub.GetSession(pb.SessionRef(session_id=session_id)).model_version == 1


def test_a_replica_takes_a_session_over_onto_its_version_loading_it_if_need_be_or_refuses_naming_it(tmp_path):
    both, newer = tmp_path / "both", tmp_path / "newer"
    v1 = add_version(both, "m", 1, seed=1)
    add_version(both, "m", 2, seed=2)
    write_config(both, "m", version_policy={"all": {}}, default_version=1)
    add_version(newer, "m", 2, seed=2)
    reference = reference_of(v1)
    with redis_server(tmp_path) as redis:
        store = dict(state_store=redis.url, lease_ttl=0.5, lease_wait=5.0)
        with server_in_thread(both, model_repository=str(both), **store) as first, \
                grpc.insecure_channel(first.address) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            session_id = stub.CreateSession(pb.CreateSessionRequest()).session_id
            np.testing.assert_allclose(step(stub, session_id), reference.step(X), atol=TOLERANCE)
        with server_in_thread(both, model_repository=str(both), **store) as second, \
                grpc.insecure_channel(second.address) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            np.testing.assert_allclose(step(stub, session_id), reference.step(X), atol=TOLERANCE)
            assert stub.GetSession(pb.SessionRef(session_id=session_id)).model_version == 1
        with server_in_thread(newer, model_repository=str(newer), **store) as third, \
                grpc.insecure_channel(third.address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                step(pb_grpc.LstmServiceStub(channel), session_id)
            assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "version 1 of model m" in refused.value.details()
        write_config(both, "m")  # latest 1: version 1 is on disk but not served
        with server_in_thread(both, model_repository=str(both), **store) as fourth, \
                grpc.insecure_channel(fourth.address) as channel:
            stub = pb_grpc.LstmServiceStub(channel)
            assert ("m", 1) not in states(channel)
            np.testing.assert_allclose(step(stub, session_id), reference.step(X), atol=TOLERANCE)
            assert state_name(states(channel)[("m", 1)]) == "DRAINING"  # loaded for it, serving nothing new
            stub.CloseSession(pb.SessionRef(session_id=session_id))
            wait_for(lambda: state_name(states(channel)[("m", 1)]) == "UNAVAILABLE", "version 1 to be unloaded")


def test_sighup_rolls_out_what_the_repository_holds_now(tmp_path):
    repository = tmp_path / "models"
    add_version(repository, "m", 1, seed=1)
    with lstmserve_process(repository, tmp_path / "server.log", "--model-repository", str(repository)) as server, \
            grpc.insecure_channel(server.address) as channel:
        add_version(repository, "m", 2, seed=2)
        server.process.send_signal(signal.SIGHUP)
        wait_for(lambda: ("m", 2) in states(channel) and states(channel)[("m", 2)].is_default,
                 "version 2 to become the default")


def test_a_stored_session_of_another_principal_names_no_version(tmp_path):
    """A replica without the session's version tells its owner which version it needs, and anyone else only that
    the session does not exist: a guessed id must not reveal the model a session runs on."""
    old, new = tmp_path / "old", tmp_path / "new"
    add_version(old, "m", 1, seed=1)
    add_version(new, "m", 2, seed=2)
    pki = make_pki(tmp_path)
    secure = dict(tls_cert_file=str(pki.server.cert), tls_key_file=str(pki.server.key),
                  tokens_file=str(pki.tokens_file))

    def client(server, name: str) -> LstmClient:
        return LstmClient(server.address, credentials=Credentials(root_certificates=str(pki.ca.cert),
                                                                  token=pki.tokens[name]))

    with redis_server(tmp_path) as redis:
        store = dict(state_store=redis.url, lease_ttl=0.5, lease_wait=5.0, **secure)
        with server_in_thread(old, model_repository=str(old), **store) as first, client(first, "alice") as alice:
            session_id = alice.session().id
        with server_in_thread(new, model_repository=str(new), **store) as second:
            for name, code, said in (("bob", "NOT_FOUND", "does not exist"), ("alice", "FAILED_PRECONDITION",
                                                                               "version 1 of model m")):
                with client(second, name) as someone, pytest.raises(LstmError) as refused:
                    someone.session(session_id=session_id).info()
                assert refused.value.code().name == code and said in refused.value.details()
                if name == "bob":
                    assert "version" not in refused.value.details()
