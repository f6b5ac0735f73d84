"""Developer tasks: ``nox -s tests``, ``deps``, ``lint``, ``typecheck``, ``protos``,
``demo``, ``build``, ``soak``, ``bench``.

``tests`` runs on every supported Python this machine has (found on PATH or
under pyenv) and says which; set ``BOXFILES_PYTHONS="3.10 3.11 ..."`` to
require versions, and the run fails if one of them is missing. With no
supported Python at all it fails too: it never passes having run nothing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import nox

nox.options.sessions = ["tests", "lint", "typecheck"]
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True

#: The Pythons boxfiles supports; requires-python and the classifiers say the same.
SUPPORTED = ("3.10", "3.11", "3.12", "3.13")

#: The oldest release each dependency pin admits (the newest is what a plain
#: install takes); ``nox -s deps`` runs the suite against these.
OLDEST = [
    "trio==0.25.0",
    "grpclib==0.4.7",
    "h2==4.1.0",
    "hyperframe==6.0.0",
    "protobuf==7.35.1",
    "tqdm==4.66.0",
]

# Pinned so that regenerated code is byte-identical to what is committed.
PROTO_TOOLS = ["grpcio-tools==1.85.1", "mypy-protobuf==5.1.0", "grpclib==0.4.9"]


def _runs(python: str, version: str) -> bool:
    # A pyenv shim exists for every installed version but fails unless that
    # version is selected: ask the interpreter itself.
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except OSError:
        return False
    return out.returncode == 0 and out.stdout.strip() == version


def _find(version: str) -> str | None:
    """A working ``python<version>``: on PATH, else under pyenv."""
    candidates = [shutil.which(f"python{version}")]
    pyenv_root = os.environ.get("PYENV_ROOT", str(Path.home() / ".pyenv"))
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"))
    for candidate in candidates:
        if candidate and _runs(candidate, version):
            return candidate
    return None


def _discover() -> list[str]:
    found = {version: _find(version) for version in SUPPORTED}
    # nox looks interpreters up on PATH by name: put each one found first.
    dirs = [str(Path(path).parent) for path in found.values() if path]
    os.environ["PATH"] = os.pathsep.join([*dict.fromkeys(dirs), os.environ.get("PATH", "")])
    required = os.environ.get("BOXFILES_PYTHONS", "").split()
    unknown = sorted(set(required) - set(SUPPORTED))
    if unknown:
        raise SystemExit(f"BOXFILES_PYTHONS names unsupported versions: {' '.join(unknown)}")
    available = [version for version in SUPPORTED if found[version]]
    # A required version that is missing stays in the list, so nox fails on
    # it (error_on_missing_interpreters); so does every version if none is found.
    return sorted(set(available) | set(required)) or list(SUPPORTED)


PYTHONS = _discover()
#: One Python for the tasks that need only one: the newest found.
NEWEST = PYTHONS[-1]


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The test suite (includes the check that generated code matches protos/)."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=NEWEST)
def deps(session: nox.Session) -> None:
    """The test suite against the oldest release every dependency pin admits."""
    session.install("-e", ".[test]")
    session.install(*OLDEST)
    session.run("python", "-m", "pip", "list", "--format=freeze", silent=False)
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session(python=PYTHONS)
def soak(session: nox.Session) -> None:
    """Hundreds of transfers with random faults; checks nothing leaks."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", "-m", "soak", "-s", *session.posargs)


@nox.session(python=PYTHONS)
def bench(session: nox.Session) -> None:
    """The performance benchmark (not a test), on each Python found.

    Speed differs between Pythons: ``nox -s bench -- --size 256M`` runs all,
    ``nox -s bench -p 3.12`` one.

    See ``python tests/bench/run.py --help``; results go to
    bench-results/<python>/ unless ``--out`` is given.
    """
    session.install(".[test,bench]")
    args = list(session.posargs)
    if not any(arg == "--out" or arg.startswith("--out=") for arg in args):
        args += ["--out", f"bench-results/{session.python}"]
    session.run("python", "tests/bench/run.py", *args)


@nox.session(python=NEWEST)
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "src", "tests", "noxfile.py", "protos")
    session.run("ruff", "format", "--check", "src", "tests", "noxfile.py", "protos")


@nox.session(python=NEWEST)
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=NEWEST)
def protos(session: nox.Session) -> None:
    """Regenerate src/boxfiles/_proto from protos/ with the pinned tools."""
    session.install(*PROTO_TOOLS)
    session.run("python", "protos/generate.py", *session.posargs)


@nox.session(python=NEWEST)
def demo(session: nox.Session) -> None:
    """The main job: a round trip through an embedded reference server."""
    session.install(".")
    session.run("boxfiles", "demo", *session.posargs)


@nox.session(python=NEWEST)
def build(session: nox.Session) -> None:
    """A wheel and an sdist in dist/, for ``pip install dist/boxfiles-*.whl``."""
    session.install("build")
    session.run("python", "-m", "build", "--outdir", "dist")
