"""The README's walk-through runs as written and prints what the README shows; its tables are complete."""

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.metrics import Metrics
from server.settings import Settings

pytestmark = pytest.mark.integration

README = (Path(__file__).parents[2] / "README.md").read_text()


def fenced_block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\n```\w*\n(.*?)```", README, re.S)
    assert match, f"README has no block after {marker}"
    return match.group(1)


def test_walkthrough_prints_what_the_readme_shows(demo_server):
    code = fenced_block_after("walkthrough:code").replace("127.0.0.1:50051", demo_server.address)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README walk-through", "exec"), {})  # its own asserts check stepped == whole
    assert printed.getvalue() == fenced_block_after("walkthrough:output")


def test_readme_starts_with_the_two_fresh_machine_commands():
    first_lines = "\n".join(README.splitlines()[:6])
    assert "make run" in first_lines and "make test" in first_lines


def test_settings_table_lists_every_setting():
    for field in dataclasses.fields(Settings):
        assert f"`--{field.name.replace('_', '-')}` | `LSTMSERVE_{field.name.upper()}`" in README, field.name


def test_metrics_table_lists_every_metric():
    for metric in Metrics(CollectorRegistry()).registry.collect():
        assert f"`{metric.name}" in README, metric.name
