"""Shared fixtures: real TorchScript models exported by the project's exporter, and real servers."""

import pytest
import torch

from server.model.export import build_module, demo_module, export
from tests.servers import server_in_thread

# (input, hidden, layers, output head or None)
MODEL_SHAPES = {
    "tutorial": (4, 3, 1, None),
    "two_layers_head": (5, 8, 2, 6),
    "wide": (16, 32, 1, None),
}


def export_model(directory, name: str, input_size: int, hidden_size: int, num_layers: int = 1,
                 output_size: int | None = None, seed: int = 0):
    """Exports a model and returns `(path, eager module)`; the eager module is the reference."""
    module = build_module(input_size, hidden_size, num_layers, output_size, seed=seed).eval()
    path = directory / f"{name}.pt"
    export(module, path, name=name, version="test")
    return path, torch.jit.load(str(path))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def demo_model(models_dir):
    path = models_dir / "demo.pt"
    export(demo_module(), path, name="tutorial-lstm", version="1")
    return path


@pytest.fixture(scope="session")
def demo_server(demo_model):
    """A server on the tutorial model shared by the tests that do not change server settings."""
    with server_in_thread(demo_model) as server:
        yield server
