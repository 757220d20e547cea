"""nox sessions: lint, typecheck, tests, demo, bench. ``nox -s tests`` = ``./dev test``."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.reuse_existing_virtualenvs = True
PY = "3.11"


def _install(session: nox.Session, *groups: str, extras: str = "libvirt,pscom,metrics") -> None:
    session.install("--upgrade", "pip")
    args = ["-e", f".[{extras}]" if extras else "."]
    for g in groups:
        args += ["--group", g]
    session.install(*args)


@nox.session(python=PY)
def lint(session: nox.Session) -> None:
    """ruff (format and lint) and the import-linter layer contracts."""
    _install(session, "lint")
    session.run("ruff", "format", "--check", ".")
    session.run("ruff", "check", ".")
    session.run("lint-imports")


@nox.session(python=PY)
def typecheck(session: nox.Session) -> None:
    """mypy --strict over src/."""
    _install(session, "typecheck")
    session.run("mypy")


@nox.session(python=PY)
def tests(session: nox.Session) -> None:
    """The whole suite (needs mosquitto; `./dev test` installs it)."""
    _install(session, "test")
    session.run("pytest", *session.posargs)


@nox.session(python=PY)
def demo(session: nox.Session) -> None:
    """The demo: embedded broker, two fake hosts, one live migration."""
    _install(session, extras="")  # the embedded broker is a core dependency
    session.run("asyncmigfra", "demo", *session.posargs)


@nox.session(python=PY)
def bench(session: nox.Session) -> None:
    """Benchmarks through a real mosquitto; prints figures (not a test)."""
    _install(session, "test")
    session.run("python", "-m", "bench", *session.posargs)
