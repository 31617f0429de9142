"""The README's walk-through runs as written and prints what the README shows; its tables are complete."""

import dataclasses

import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.settings import Settings
from tests.walkthrough import README, fenced_block_after, run_walkthrough

pytestmark = pytest.mark.integration


def test_walkthrough_prints_what_the_readme_shows(demo_server):
    assert run_walkthrough(demo_server.address) == fenced_block_after("walkthrough:output")


def test_readme_starts_with_the_two_fresh_machine_commands():
    first_lines = "\n".join(README.splitlines()[:6])
    assert "make run" in first_lines and "make test" in first_lines


def test_settings_table_lists_every_setting():
    for field in dataclasses.fields(Settings):
        assert f"`--{field.name.replace('_', '-')}` | `LSTMSERVE_{field.name.upper()}`" in README, field.name


def test_metrics_table_lists_every_metric():
    for metric in Metrics(CollectorRegistry()).registry.collect():
        assert f"`{metric.name}" in README, metric.name
