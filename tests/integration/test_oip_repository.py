"""The Open Inference Protocol's repository extension against a real server on a repository on disk, driven by the
unmodified `tritonclient.grpc`: the index, load (a new version rolls out), unload (draining), bad versions, and
sequences pinned to the version of their START while the current version changes under them."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from server.model.export import main as export_main
from tests.integration.reference import TOLERANCE, Reference
from tests.integration.triton_child import Failure, triton_child
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration

MODEL = "tutorial-lstm"
INVALID_ARGUMENT, NOT_FOUND = "StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"
FAILED_PRECONDITION, UNAVAILABLE = "StatusCode.FAILED_PRECONDITION", "StatusCode.UNAVAILABLE"


@pytest.fixture(scope="module")
def triton():
    with triton_child() as child:
        yield child


@pytest.fixture
def repository(tmp_path) -> Path:
    """A repository holding version 1 of the tutorial model."""
    add_demo_version(tmp_path, 1)
    return tmp_path


@pytest.fixture
def server(repository):
    with server_in_thread("", model_repository=str(repository), drain_timeout=300.0) as server:
        yield server


def add_demo_version(repository: Path, version: int) -> None:
    assert export_main(["--demo", "--repository", str(repository), "--version", str(version)]) == 0


def reference_chunks(repository: Path, version: int, chunks: list[np.ndarray]) -> list[np.ndarray]:
    """The version's file run in-process on the chunks one after the other, state carried forward."""
    reference = Reference(torch.jit.load(str(repository / MODEL / str(version) / "model.pt")), 1, 3)
    return [reference.step(chunk) for chunk in chunks]


def chunks(count: int, seed: int) -> list[np.ndarray]:
    return list(np.random.default_rng(seed).standard_normal((count, 2, 4)).astype(np.float32))


def client(triton, server, method: str, *args, **kwargs):
    """tritonclient's InferenceServerClient.`method`(*args, **kwargs) against the server, in the child."""
    return triton.call("client_call", server.address, method, args, kwargs)


def index(triton, server) -> dict[str, tuple[str, str]]:
    """RepositoryIndex as {version: (state, reason)} for the tutorial model."""
    models = client(triton, server, "get_model_repository_index", as_json=True)
    return {m["version"]: (m["state"], m.get("reason", "")) for m in models.get("models", []) if m["name"] == MODEL}


def wait_for(condition, what: str, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return value


def step(sequence_id: int, chunk: np.ndarray, version: str = "", **flags) -> dict:
    return {"inputs": {"INPUT": chunk}, "sequence_id": sequence_id, "version": version, **flags}


def assert_answers(answers: list, versions: list[str], expected: list[np.ndarray]) -> None:
    assert [a if isinstance(a, Failure) else a[0] for a in answers] == versions
    for (_, outputs), reference in zip(answers, expected, strict=True):
        np.testing.assert_allclose(outputs["OUTPUT"], reference, atol=TOLERANCE)


def test_a_loaded_version_takes_new_sequences_while_running_ones_finish_on_theirs(repository, server, triton):
    xs = chunks(6, seed=0)
    first = triton.call("infer_versioned", server.address, MODEL, [step(7, xs[0], start=True), step(7, xs[1])])
    add_demo_version(repository, 2)
    assert client(triton, server, "load_model", MODEL) is None
    assert index(triton, server) == {"1": ("DRAINING", "left the version policy"), "2": ("READY", "")}

    later = triton.call("infer_versioned", server.address, MODEL, [
        step(7, xs[2]), step(8, xs[0], start=True), step(7, xs[3], end=True), step(8, xs[1], end=True)])
    one, two = reference_chunks(repository, 1, xs[:4]), reference_chunks(repository, 2, xs[:2])
    assert_answers(first + later[::2], ["1"] * 4, one)  # sequence 7 stays on version 1 to its end
    assert_answers(later[1::2], ["2", "2"], two)  # the new sequence 8 began on version 2
    assert not np.allclose(one[0], two[0], atol=1e-3)

    # version 1's last sequence ended: it is unloaded, and its series leave the metrics
    wait_for(lambda: index(triton, server)["1"][0] == "UNAVAILABLE", "version 1 unloaded")
    assert index(triton, server)["1"][1].startswith("unloaded")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in server.app.metrics.registry.collect() for s in m.samples}
    assert not [key for key in samples if ("version", "1") in key[1]]
    assert samples[("lstmserve_model_versions", (("model", MODEL), ("state", "READY")))] == 1
    assert samples[("lstmserve_model_versions", (("model", MODEL), ("state", "DRAINING")))] == 0


def test_readiness_metadata_and_statistics_are_per_version(repository, server, triton):
    x = chunks(1, seed=1)[0]
    triton.call("infer_versioned", server.address, MODEL, [step(5, x, start=True)])
    add_demo_version(repository, 2)
    client(triton, server, "load_model", MODEL)
    ready = {v: client(triton, server, "is_model_ready", MODEL, v) for v in ("", "1", "2", "3")}
    assert ready == {"": True, "1": False, "2": True, "3": False}  # 1 drains: it takes no new sequences
    metadata = client(triton, server, "get_model_metadata", MODEL, as_json=True)
    assert sorted(metadata["versions"]) == ["1", "2"]  # both answer requests
    assert client(triton, server, "get_model_metadata", MODEL, "1", as_json=True)[
        "versions"] == ["1"]
    missing = client(triton, server, "get_model_config", MODEL, "3")
    assert missing.status == NOT_FOUND and "has no version '3'" in missing.message
    stats = client(triton, server, "get_inference_statistics", MODEL, as_json=True)
    counts = {s["version"]: int(s.get("inference_count", 0)) for s in stats["model_stats"]}
    assert counts == {"1": 2, "2": 0}  # the START's two steps ran on version 1


def test_unload_drains_the_model_and_load_brings_it_back(server, triton):
    x = chunks(2, seed=2)
    assert triton.call("infer_versioned", server.address, MODEL, [step(9, x[0], start=True)])[0][0] == "1"
    assert client(triton, server, "unload_model", MODEL) is None
    assert index(triton, server) == {"1": ("DRAINING", "unloaded by request")}
    refused, going_on = triton.call("infer_versioned", server.address, MODEL, [step(10, x[0], start=True),
                                                                               step(9, x[1])])
    assert refused.status == UNAVAILABLE and "has no version ready" in refused.message  # as Triton's
    assert going_on[0] == "1"  # a running sequence goes on on the draining version
    assert triton.call("infer_versioned", server.address, MODEL, [step(9, x[1], end=True)])[0][0] == "1"
    wait_for(lambda: index(triton, server)["1"][0] == "UNAVAILABLE", "version 1 unloaded after its last sequence")
    assert client(triton, server, "load_model", MODEL) is None
    assert index(triton, server) == {"1": ("READY", "")}
    assert triton.call("infer_versioned", server.address, MODEL, [step(10, x[0], start=True)])[0][0] == "1"


@pytest.mark.parametrize("method", ["load_model", "unload_model"])
def test_load_and_unload_of_an_unknown_model_are_not_found(server, triton, method):
    failure = client(triton, server, method, "no-such-model")
    assert failure.status == NOT_FOUND and "'no-such-model'" in failure.message


def test_load_refuses_config_overrides(server, triton):
    failure = client(triton, server, "load_model", MODEL, config=json.dumps({}))
    assert failure.status == INVALID_ARGUMENT and "config.json" in failure.message


def test_a_broken_version_fails_its_load_and_the_serving_version_goes_on(repository, server, triton):
    broken = repository / MODEL / "3" / "model.pt"
    broken.parent.mkdir()
    broken.write_bytes(b"not a model")
    failure = client(triton, server, "load_model", MODEL)
    assert failure.status == INVALID_ARGUMENT and "version 3 is UNAVAILABLE" in failure.message
    state, reason = index(triton, server)["3"]
    assert state == "UNAVAILABLE" and "not a TorchScript file" in reason
    assert index(triton, server)["1"] == ("READY", "")
    (answer,) = triton.call("infer_versioned", server.address, MODEL, [{"inputs": {"INPUT": chunks(1, 3)[0][:, None]}}])
    assert not isinstance(answer, Failure) and answer[0] == "1", answer


def test_a_start_moves_a_live_sequence_id_to_the_version_it_asks_for(repository, triton):
    add_demo_version(repository, 2)
    (repository / MODEL / "config.json").write_text(json.dumps({"version_policy": {"all": {}}}))
    xs = chunks(3, seed=4)
    with server_in_thread("", model_repository=str(repository)) as server:
        answers = triton.call("infer_versioned", server.address, MODEL, [
            step(11, xs[0], version="1", start=True), step(11, xs[1]),  # pinned to version 1, asked for by number
            step(11, xs[0], start=True), step(11, xs[1]), step(11, xs[2], version="2", end=True)])
        assert_answers(answers[:2], ["1", "1"], reference_chunks(repository, 1, xs[:2]))
        assert_answers(answers[2:], ["2", "2", "2"], reference_chunks(repository, 2, xs))
        # the START on version 2 ended the sequence on version 1, and the END freed the new one
        wait_for(lambda: {s.version: s.live_sessions for s in server.app.registry.statuses()} == {1: 0, 2: 0},
                 "both sequences' sessions freed")


def test_a_refused_start_on_another_version_leaves_the_live_sequence_where_it_is(repository, triton):
    add_demo_version(repository, 2)
    (repository / MODEL / "config.json").write_text(json.dumps({"version_policy": {"all": {}}}))
    xs = chunks(2, seed=6)
    wrong_width = np.zeros((2, 5), np.float32)  # the model takes 4 inputs per time step
    with server_in_thread("", model_repository=str(repository)) as server:
        answers = triton.call("infer_versioned", server.address, MODEL, [
            step(12, xs[0], version="1", start=True), step(12, wrong_width, start=True), step(12, xs[1])])
    assert answers[1].status == INVALID_ARGUMENT
    assert_answers(answers[::2], ["1", "1"], reference_chunks(repository, 1, xs))  # a refused START ended nothing


def test_a_sequence_ended_by_the_drain_timeout_is_told_which_version_retired(repository, triton):
    xs = chunks(2, seed=5)
    with server_in_thread("", model_repository=str(repository), drain_timeout=0.5) as server:
        triton.call("infer_versioned", server.address, MODEL, [step(21, xs[0], start=True),
                                                               step(22, xs[0], start=True, end=True)])
        add_demo_version(repository, 2)
        assert client(triton, server, "load_model", MODEL) is None
        wait_for(lambda: index(triton, server)["1"][0] == "UNAVAILABLE", "version 1 unloaded at the drain timeout")
        leftover, ended = triton.call("infer_versioned", server.address, MODEL, [step(21, xs[1]), step(22, xs[1])])
    assert leftover.status == FAILED_PRECONDITION
    assert "version 1 of model tutorial-lstm" in leftover.message and "open a new session" in leftover.message
    assert ended.status == NOT_FOUND and "sequence_start=true" in ended.message  # ended by its client: as before


def test_a_sequence_id_ended_by_a_drain_timeout_is_not_active_on_another_model(repository, triton):
    assert export_main(["--demo", "--repository", str(repository), "--version", "1", "--name", "other"]) == 0
    xs = chunks(1, seed=7)
    with server_in_thread("", model_repository=str(repository), drain_timeout=0.5) as server:
        triton.call("infer_versioned", server.address, MODEL, [step(23, xs[0], start=True)])
        add_demo_version(repository, 2)
        assert client(triton, server, "load_model", MODEL) is None
        wait_for(lambda: index(triton, server)["1"][0] == "UNAVAILABLE", "version 1 unloaded at the drain timeout")
        (elsewhere,) = triton.call("infer_versioned", server.address, "other", [step(23, xs[0])])
    # the other model never started sequence 23: no word of tutorial-lstm's retired version
    assert elsewhere.status == NOT_FOUND and "sequence_start=true" in elsewhere.message
