"""The client library and CLI with several models and versions: `models`, `--model NAME[:VERSION]`."""

import asyncio
import subprocess
import sys

import numpy as np
import pytest

from client import AsyncLstmClient, LstmClient, LstmError
from tests.integration.reference import TOLERANCE, Reference
from tests.models.repository_files import SIZES, add_version, write_config
from tests.servers import server_in_thread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    """Model a: versions 1 and 2 both served, 1 the default; model b: version 1."""
    path = tmp_path_factory.mktemp("repository")
    references = {("a", 1): add_version(path, "a", 1, seed=1), ("a", 2): add_version(path, "a", 2, seed=2),
                  ("b", 1): add_version(path, "b", 1, seed=3)}
    write_config(path, "a", version_policy={"all": {}}, default_version=1)
    return path, references


@pytest.fixture(scope="module")
def server(repository):
    with server_in_thread(repository[0], model_repository=str(repository[0])) as running:
        yield running


def cli(server, *args: str, stdin: str = "") -> str:
    result = subprocess.run([sys.executable, "-m", "client.cli", "--address", server.address, *args],
                            input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_the_cli_lists_every_model_version_and_marks_the_default(server):
    lines = [line.split() for line in cli(server, "models").splitlines()[1:]]
    assert [line[:4] for line in lines] == [["a", "1", "READY*", "0"], ["a", "2", "READY", "0"],
                                            ["b", "1", "READY*", "0"]]
    assert lines[0][4:8] == [str(size) for size in (SIZES[0], SIZES[1], SIZES[2], SIZES[1])]


def test_the_cli_uses_the_model_and_version_asked_for(server, repository):
    assert "model_version: 2" in cli(server, "--model", "a:2", "info")
    line = cli(server, "--model", "a:2", "stream", stdin="1,2,3,4\n")
    expected = Reference(repository[1][("a", 2)], SIZES[2], SIZES[1]).step(np.array([[1, 2, 3, 4]], np.float32))
    np.testing.assert_allclose([float(v) for v in line.split(",")], expected[0], atol=1e-4)  # printed to 6 digits


def test_sessions_run_on_the_version_they_are_opened_on(server, repository):
    x = np.ones((2, SIZES[0]), np.float32)
    for model, key in (("a", ("a", 1)), ("a:2", ("a", 2)), ("b", ("b", 1))):
        with LstmClient(server.address, model=model) as client, client.session() as session:
            info = session.info()
            assert (info.model_name, info.model_version) == key
            np.testing.assert_allclose(session.step(x), Reference(repository[1][key], SIZES[2], SIZES[1]).step(x),
                                       atol=TOLERANCE)


def test_naming_no_model_among_several_is_refused_with_what_to_do(server):
    with LstmClient(server.address) as client, pytest.raises(LstmError) as refused:
        client.predict(np.ones((1, 1, SIZES[0]), np.float32))
    assert "model_name" in refused.value.details() and [v.field for v in refused.value.field_violations] == \
        ["model_name"]


def test_the_async_client_lists_models_and_predicts_on_a_version(server, repository):
    async def run():
        async with AsyncLstmClient(server.address, model="a:2") as client:
            return await client.models(), await client.predict(np.ones((3, 1, SIZES[0]), np.float32))

    models, prediction = asyncio.run(run())
    assert {(m.name, m.version) for m in models} == {("a", 1), ("a", 2), ("b", 1)}
    expected = Reference(repository[1][("a", 2)], SIZES[2], SIZES[1]).step(np.ones((3, SIZES[0]), np.float32))
    np.testing.assert_allclose(prediction.outputs[:, 0], expected, atol=TOLERANCE)


def test_a_malformed_model_reference_is_refused_before_any_call():
    with pytest.raises(ValueError, match="positive integer"):
        LstmClient("127.0.0.1:1", model="a:latest")
