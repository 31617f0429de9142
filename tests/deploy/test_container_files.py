"""The Dockerfile passes hadolint and the container scripts pass shellcheck (offline binaries from PyPI)."""

import os
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


def fake_path(directory: Path, uid: int, with_system: bool) -> str:
    """A PATH on which `id -u` says `uid`; with_system: the system's own directories after it (so podman, runc,
    debootstrap and apt-get are found where installed); else only bash, so nothing is installed or installable."""
    directory.mkdir()
    (directory / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (directory / "id").chmod(0o755)
    (directory / "bash").symlink_to("/bin/bash")
    return f"{directory}:/usr/sbin:/usr/bin:/sbin:/bin" if with_system else str(directory)


@pytest.mark.parametrize("uid, with_system, problem", [
    (1000, True, "make container needs root"),
    (0, False, "cannot install them without apt-get"),
])
def test_the_container_targets_refuse_where_they_cannot_install_what_they_need(tmp_path, uid, with_system,
                                                                                problem):
    result = subprocess.run([ROOT / "deploy" / "container" / "system-deps.sh"], capture_output=True, text=True,
                            env={"PATH": fake_path(tmp_path / "bin", uid, with_system)}, timeout=60)
    assert result.returncode == 1
    assert problem in result.stderr and "nothing was built" in result.stderr


@pytest.mark.parametrize("target, build", [("container", "build.sh"), ("container-test", "test.sh")])
def test_the_container_targets_install_their_tools_before_building(target, build):
    """`make -n` lists the commands in the order make runs them: the tools' check comes before any build."""
    environ = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    printed = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=ROOT, env=environ,
                             capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    scripts = [line.split()[0] for line in printed if line.startswith("deploy/container/")]
    assert scripts == ["deploy/container/system-deps.sh", f"deploy/container/{build}"], printed
