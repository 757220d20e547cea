"""Packaging: ``pip install .`` and ``pip install '.[libvirt]'`` work in a fresh venv and give a
working ``asyncmigfra`` command (not an editable install: what a user of a release gets)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from asyncmigfra import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _install(tmp_path: Path, spec: str) -> Path:
    # A copy of the source tree without the developer's venv and caches keeps the build
    # small and independent of what is lying around.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "__pycache__", "*.egg-info", ".nox", "build"
        ),
    )
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{src}{spec}"],
        check=True,
        timeout=600,
    )
    return env_dir


@pytest.mark.timeout(600)  # pip resolves and builds (libvirt-python compiles) from PyPI
@pytest.mark.parametrize("extra", ["", "[libvirt]"], ids=["plain", "libvirt"])
def test_pip_install_gives_a_working_command(tmp_path, extra):
    env_dir = _install(tmp_path, extra)
    out = subprocess.run(
        [str(env_dir / "bin" / "asyncmigfra"), "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert out.stdout.strip() == f"asyncmigfra {__version__}"
    probe = "import asyncmigfra.app, asyncmigfra.cli; print('ok')"
    if extra:
        probe = "import asyncmigfra.hypervisor.virt; print('ok')"
    ran = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", probe],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert ran.stdout.strip() == "ok"
    # The back-ends are found through their entry points in the installed metadata.
    listed = subprocess.run(
        [
            str(env_dir / "bin" / "python"),
            "-c",
            "from asyncmigfra.hypervisor.registry import available; print(' '.join(available()))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert {"dummy", "fake", "libvirt"} <= set(listed.stdout.split())
    assert sys.version_info >= (3, 11)
