"""The Dockerfile passes hadolint and the container scripts pass shellcheck (offline binaries from PyPI)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


def test_dockerfile_passes_hadolint():
    result = subprocess.run([BIN / "hadolint", ROOT / "Dockerfile"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_container_scripts_pass_shellcheck():
    scripts = sorted((ROOT / "deploy" / "container").glob("*.sh"))
    assert scripts
    result = subprocess.run([BIN / "shellcheck", *scripts], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
