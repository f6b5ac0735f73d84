"""Developer tasks: ``nox -s tests``, ``lint``, ``typecheck``, ``protos``, ``demo``, ``bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = ["3.11"]

# Pinned so that regenerated code is byte-identical to what is committed.
PROTO_TOOLS = ["grpcio-tools==1.85.1", "mypy-protobuf==5.1.0", "grpclib==0.4.9"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite (includes the check that generated code matches protos/)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def soak(session: nox.Session) -> None:
    """Hundreds of transfers with random faults; checks nothing leaks."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "soak", "-s", *session.posargs)


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """The performance benchmark (not a test): ``nox -s bench -- --size 256M``.

    See ``python tests/bench/run.py --help``; results go to bench-results/.
    """
    session.install(".[test,bench]")
    session.run("python", "tests/bench/run.py", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "src", "tests", "noxfile.py", "protos")
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py", "protos")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=PYTHON)
def protos(session: nox.Session) -> None:
    """Regenerate src/boxfiles/_proto from protos/ with the pinned tools."""
    session.install(*PROTO_TOOLS)
    session.run("python", "protos/generate.py", *session.posargs)


@nox.session(python=PYTHON)
def demo(session: nox.Session) -> None:
    """The main job: a round trip through an embedded reference server."""
    session.install(".")
    session.run("boxfiles", "demo", *session.posargs)
