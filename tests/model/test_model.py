"""Exporter round trip, metadata inference from a plain scripted nn.LSTM, and contract checks."""

import json

import pytest
import torch
from torch import nn

from server.model import ModelContractError, ModelRuntime
from server.model.export import LstmWithHead
from server.model.export import main as export_main
from tests.conftest import export_model

pytestmark = pytest.mark.unit


def test_exported_file_carries_its_metadata_and_runs_like_the_module(tmp_path):
    path, reference = export_model(tmp_path, "head", 5, 8, 2, output_size=6, seed=3)
    runtime = ModelRuntime.load(path)
    m = runtime.metadata
    assert (m.name, m.version, m.input_size, m.hidden_size, m.num_layers, m.output_size, m.dtype) == \
        ("head", "test", 5, 8, 2, 6, "float32")
    x, (h, c) = torch.randn(7, 3, 5), (torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    y, h_n, c_n = runtime.run(x, h, c)
    y_ref, (h_ref, c_ref) = reference(x, (h, c))
    for got, want in ((y, y_ref), (h_n, h_ref), (c_n, c_ref)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_plain_scripted_lstm_without_metadata_has_its_sizes_inferred(tmp_path):
    lstm = nn.LSTM(input_size=6, hidden_size=4, num_layers=3)
    path = tmp_path / "plain.pt"
    torch.jit.save(torch.jit.script(lstm), str(path))
    m = ModelRuntime.load(path).metadata
    assert (m.name, m.input_size, m.hidden_size, m.num_layers, m.output_size) == ("plain", 6, 4, 3, 4)
    assert m.version.startswith("sha256-")


@pytest.mark.parametrize("module, reason", [
    (nn.Linear(4, 3), "neither lstmserve metadata nor nn.LSTM parameters"),
    (nn.LSTM(4, 3, bidirectional=True), "bidirectional"),
    (nn.LSTM(4, 3, batch_first=True), "batch_first"),
])
def test_files_outside_the_contract_are_refused_with_the_reason(tmp_path, module, reason):
    path = tmp_path / "bad.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    with pytest.raises(ModelContractError, match=reason):
        ModelRuntime.load(path)


def test_a_file_that_is_not_torchscript_is_refused(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("not a model")
    with pytest.raises(ModelContractError, match="not a TorchScript file"):
        ModelRuntime.load(path)


def test_exporter_cli_loads_a_trained_checkpoint(tmp_path, capsys):
    trained = LstmWithHead(3, 5, 1, 2)
    checkpoint = tmp_path / "trained.pt"
    torch.save(trained.state_dict(), checkpoint)
    out = tmp_path / "served.pt"
    assert export_main(["--input-size", "3", "--hidden-size", "5", "--output-size", "2",
                        "--checkpoint", str(checkpoint), "-o", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split(": ", 1)[1])["output_size"] == 2
    runtime = ModelRuntime.load(out)
    x, state = torch.randn(4, 1, 3), (torch.zeros(1, 1, 5), torch.zeros(1, 1, 5))
    torch.testing.assert_close(runtime.run(x, *state)[0], trained(x, state)[0], atol=1e-5, rtol=0)


def test_exporter_cli_refuses_a_checkpoint_of_other_shapes(tmp_path):
    checkpoint = tmp_path / "other.pt"
    torch.save(nn.LSTM(3, 7).state_dict(), checkpoint)
    assert export_main(["--input-size", "3", "--hidden-size", "5", "--checkpoint", str(checkpoint),
                        "-o", str(tmp_path / "x.pt")]) == 2


def test_demo_model_is_the_tutorials_lstm(tmp_path):
    assert export_main(["--demo", "-o", str(tmp_path / "demo.pt")]) == 0
    torch.manual_seed(2)
    tutorial = nn.LSTM(input_size=4, hidden_size=3)
    served = torch.jit.load(str(tmp_path / "demo.pt"))
    for name, parameter in tutorial.named_parameters():
        torch.testing.assert_close(dict(served.named_parameters())[name], parameter, atol=0, rtol=0)
