"""`lstmserve-export --repository`: versioned directories of a model repository (Triton's layout)."""

import json

import pytest
import torch
from torch import nn

from server.model.export import main as export_main
from server.model.runtime import ModelRuntime

pytestmark = pytest.mark.unit


def exported(repository, *args: str) -> int:
    return export_main(["--repository", str(repository), *args])


def test_demo_versions_land_in_their_directories_with_their_version(tmp_path, capsys):
    for version in ("1", "2"):
        assert exported(tmp_path, "--demo", "--version", version) == 0
        printed = capsys.readouterr().out
        assert str(tmp_path / "tutorial-lstm" / version / "model.pt") in printed
        assert json.loads(printed.split(": ", 1)[1])["version"] == version
    runtimes = {v: ModelRuntime.load(tmp_path / "tutorial-lstm" / v / "model.pt") for v in ("1", "2")}
    assert {v: r.metadata.version for v, r in runtimes.items()} == {"1": "1", "2": "2"}
    assert {r.metadata.name for r in runtimes.values()} == {"tutorial-lstm"}
    assert sorted(p.name for p in (tmp_path / "tutorial-lstm").iterdir()) == ["1", "2"]  # nothing left behind


def test_demo_version_1_is_the_tutorial_and_version_2_computes_other_outputs(tmp_path):
    assert exported(tmp_path, "--demo") == 0
    assert exported(tmp_path, "--demo", "--version", "2") == 0
    torch.manual_seed(2)
    tutorial = nn.LSTM(input_size=4, hidden_size=3)
    x = torch.randn(5, 1, 4)
    state = torch.zeros(1, 1, 3), torch.zeros(1, 1, 3)
    one, two = (ModelRuntime.load(tmp_path / "tutorial-lstm" / v / "model.pt") for v in ("1", "2"))
    torch.testing.assert_close(one.run(x, *state)[0], tutorial(x, state)[0], atol=1e-5, rtol=0)
    assert not torch.allclose(one.run(x, *state)[0], two.run(x, *state)[0], atol=1e-3)


def test_a_trained_model_goes_into_the_repository_under_its_name(tmp_path):
    assert exported(tmp_path, "--name", "wide", "--version", "7", "--input-size", "16", "--hidden-size", "32",
                    "--num-layers", "2", "--seed", "0") == 0
    metadata = ModelRuntime.load(tmp_path / "wide" / "7" / "model.pt").metadata
    assert (metadata.name, metadata.version, metadata.num_layers) == ("wide", "7", 2)


def test_an_existing_version_is_never_overwritten(tmp_path, capsys):
    assert exported(tmp_path, "--demo", "--version", "2") == 0
    before = (tmp_path / "tutorial-lstm" / "2" / "model.pt").read_bytes()
    assert exported(tmp_path, "--demo", "--version", "2", "--seed", "9") == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "tutorial-lstm" / "2" / "model.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "tutorial-lstm").iterdir()) == ["2"]


@pytest.mark.parametrize("args, problem", [
    (["--demo", "--version", "0"], "positive integer"),
    (["--demo", "--version", "v2"], "positive integer"),
    (["--demo", "--version", "02"], "positive integer"),
    (["--demo", "--name", "../escape"], "--name"),
    (["--demo", "--name", ".hidden"], "--name"),
    (["--input-size", "3", "--hidden-size", "5"], "needs --name"),
])
def test_names_and_versions_that_are_not_repository_directories_are_refused(tmp_path, capsys, args, problem):
    with pytest.raises(SystemExit) as exit_info:
        exported(tmp_path / "repo", *args)
    assert exit_info.value.code == 2
    assert problem in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()


def test_output_and_repository_are_alternatives(tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_main(["--demo", "-o", str(tmp_path / "x.pt"), "--repository", str(tmp_path)])
    assert "not allowed with" in capsys.readouterr().err
