"""A plain ``pip install asyncmigfra`` runs ``asyncmigfra demo``: every distribution the demo
imports is a core dependency in pyproject.toml, or one of theirs (not an extra)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _core() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(reqs: list[Requirement]) -> set[str]:
    """The distributions a plain install of ``reqs`` brings (their markers evaluated here,
    extras only where a requirement asks for them)."""
    seen: set[str] = set()
    todo = list(reqs)
    while todo:
        req = todo.pop()
        name = _norm(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:  # not installed here: brings nothing here
            continue
        wanted = req.extras or {""}
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(sub)
    return seen


def test_the_embedded_broker_is_a_core_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_norm(r.name) for r in _core()}
    assert "amqtt" in core
    # `pip install asyncmigfra[demo]` still resolves (an empty alias).
    assert project["optional-dependencies"]["demo"] == []


def test_the_demo_needs_only_core_dependencies():
    # The demo as a process: every module it imported, mapped to its distribution.
    # (Modules the interpreter imported before, such as setuptools' .pth hook, are not the
    # demo's.)
    probe = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "from asyncmigfra.cli import main\n"
        "code = main(['demo', '--quiet'])\n"
        "mods = {m.partition('.')[0] for m in set(sys.modules) - before}\n"
        "print(json.dumps([code, sorted(mods)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    code, modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 0, done.stdout
    owners = metadata.packages_distributions()
    used = {
        _norm(dist)
        for mod in modules
        if mod not in sys.stdlib_module_names
        for dist in owners.get(mod, [])
    }
    assert "amqtt" in used  # the embedded broker really was imported
    allowed = _closure(_core()) | {"asyncmigfra"}
    assert used <= allowed, (
        f"the demo imports packages outside the core dependencies: {used - allowed}"
    )
