from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

import boxfiles

pytest_plugins = ["pytester"]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bf-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


@pytest.fixture
async def server(root: Path, sock_dir: Path) -> AsyncIterator[str]:
    """The reference server on a unix socket; yields its target."""
    async with trio.open_nursery() as nursery:
        target: str = await nursery.start(boxfiles.serve_files, root, f"unix:{sock_dir}/files.sock")
        yield target
        nursery.cancel_scope.cancel()


@pytest.fixture
def sink(sock_dir: Path) -> Iterator[str]:
    """A grpcio upload sink in a process of its own (tests/helpers/grpcio_sink.py),
    so its allocations stay out of a test's measurements; yields its target."""
    path = sock_dir / "sink.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.grpcio_sink", str(path)],
        cwd=Path(__file__).resolve().parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        yield f"unix:{path}"
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)
        assert proc.stdout is not None
        proc.stdout.close()
