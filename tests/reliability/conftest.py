"""The reliability suite: reduced in `make test`, full with LSTMSERVE_RELIABILITY=full (make reliability)."""

import pytest

from tests.conftest import export_model
from tests.reliability.figures import FIGURES


def pytest_terminal_summary(terminalreporter):
    lines = FIGURES.lines()
    if lines:
        terminalreporter.section("reliability")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def two_layer_model(tmp_path_factory):
    """(path, scripted reference): 2 layers and a linear head, so state and outputs differ in size."""
    return export_model(tmp_path_factory.mktemp("reliability"), "two_layers_head", 5, 8, 2, 6)
