"""The README's walk-throughs run as written and print what the README shows; its tables are complete."""

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.model.export import demo_module, export
from server.settings import Settings
from tests.integration.reference import TOLERANCE, Reference
from tests.servers import server_in_thread
from tests.walkthrough import README, README_ADDRESS, fenced_block_after, run_example, run_walkthrough

pytestmark = pytest.mark.integration


def test_walkthrough_prints_what_the_readme_shows(demo_server):
    assert run_walkthrough(demo_server.address) == fenced_block_after("walkthrough:output")


def test_the_roll_out_walkthrough_prints_what_the_readme_shows(tmp_path, monkeypatch):
    """Version 2 is exported mid-stream and picked up by the server's poll, as the README has it; each session's
    outputs equal the in-process reference of the version it began on."""
    export(demo_module(), tmp_path / "tutorial-lstm" / "1" / "model.pt", name="tutorial-lstm", version="1")
    # the walk-through runs `lstmserve-export`: the one installed beside this interpreter
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    with server_in_thread(tmp_path, model_repository=str(tmp_path), poll_repository=0.2) as server:
        printed, variables = run_example("rollout", {README_ADDRESS: server.address,
                                                     'REPOSITORY = "models"': f'REPOSITORY = "{tmp_path}"'})
    assert printed == fenced_block_after("rollout:output")
    for version, outputs in ((1, variables["stepped"]), (2, variables["fresh"])):
        module = torch.jit.load(str(tmp_path / "tutorial-lstm" / str(version) / "model.pt"))
        np.testing.assert_allclose(outputs, Reference(module, 1, 3).step(variables["inputs"]), atol=TOLERANCE)


def test_readme_starts_with_the_two_fresh_machine_commands():
    first_lines = "\n".join(README.splitlines()[:6])
    assert "make run" in first_lines and "make test" in first_lines


def test_settings_table_lists_every_setting():
    for field in dataclasses.fields(Settings):
        assert f"`--{field.name.replace('_', '-')}` | `LSTMSERVE_{field.name.upper()}`" in README, field.name


def test_metrics_table_lists_every_metric():
    for metric in Metrics(CollectorRegistry()).registry.collect():
        assert f"`{metric.name}" in README, metric.name
