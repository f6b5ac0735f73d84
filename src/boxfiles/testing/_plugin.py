"""pytest fixtures, registered through the ``pytest11`` entry point.

They need pytest-trio (``pip install 'boxfiles[testing]'``): use them from
``@pytest.mark.trio`` tests (or with ``trio_mode = true``). Without it, a
test that asks for one fails naming what to install; other tests are not
affected.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import final

import pytest
import trio

from .._client import FilesClient, open_client
from .._server import serve_files
from ._faults import FaultServer, open_fault_server


@final
@dataclass(frozen=True)
class FilesServer:
    """A running reference server.

    Attributes:
        target: the address to pass to :func:`boxfiles.open_client`.
        root: the container root it serves.
    """

    target: str
    root: Path


@contextmanager
def short_socket_dir() -> Iterator[Path]:
    """A fresh directory with a short path, for unix sockets (whose paths are
    limited to 107 bytes, which pytest's tmp_path can exceed); removed on exit."""
    path = Path(tempfile.mkdtemp(prefix="boxfiles-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


#: The error of a test that asks for a fixture when pytest-trio is missing.
NEEDS_PYTEST_TRIO = (
    "boxfiles' pytest fixtures need the pytest-trio plugin, which is not installed "
    "(or disabled): pip install 'boxfiles[testing]'"
)


@pytest.fixture
def _boxfiles_needs_trio(request: pytest.FixtureRequest) -> None:
    """Fail the test with NEEDS_PYTEST_TRIO when pytest-trio is not loaded
    (pytest's own error would only say that async fixtures are unsupported)."""
    if not request.config.pluginmanager.has_plugin("trio"):
        pytest.fail(NEEDS_PYTEST_TRIO, pytrace=False)


@pytest.fixture
async def files_server(tmp_path: Path, _boxfiles_needs_trio: None) -> AsyncIterator[FilesServer]:
    """The reference server on a temporary unix socket, serving an empty
    ``tmp_path / "box"``; stopped (and its socket removed) after the test."""
    root = tmp_path / "box"
    root.mkdir()
    with short_socket_dir() as sock_dir:
        async with trio.open_nursery() as nursery:
            target: str = await nursery.start(serve_files, root, f"unix:{sock_dir}/files.sock")
            yield FilesServer(target, root)
            nursery.cancel_scope.cancel()


@pytest.fixture
async def files_client(files_server: FilesServer) -> AsyncIterator[FilesClient]:
    """A :class:`boxfiles.FilesClient` connected to ``files_server``."""
    async with open_client(files_server.target) as client:
        yield client


@pytest.fixture
async def fault_server(tmp_path: Path, _boxfiles_needs_trio: None) -> AsyncIterator[FaultServer]:
    """A :class:`boxfiles.testing.FaultServer` serving an empty
    ``tmp_path / "box"`` on a temporary unix socket; declare faults with
    ``fail_next_upload`` / ``fail_next_download``."""
    root = tmp_path / "box"
    root.mkdir()
    with short_socket_dir() as sock_dir:
        async with open_fault_server(root, f"unix:{sock_dir}/faults.sock") as server:
            yield server
