from __future__ import annotations

import asyncio
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._aio import current_loop

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


@asynccontextmanager
async def started_process(
    argv: list[str], *, prompt: float, env: dict[str, str] | None = None
) -> AsyncIterator[trio.Process]:
    """``argv`` as a process, once it has printed "serving" on stderr or
    stdout (whichever it uses: both are read); killed and waited for on exit."""
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
    )
    try:
        assert process.stdout is not None
        seen = b""
        with trio.fail_after(prompt):
            while b"serving" not in seen:
                data = await process.stdout.receive_some()
                assert data, f"the process ended before serving: {seen.decode()}"
                seen += data
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()


def deep_chain(top: Path, levels: int, leaf: bytes = b"leaf", *, name: str = "leaf") -> None:
    """``top/d/d/.../d/NAME`` holding ``leaf``, ``levels`` directories below
    ``top`` (made if missing), made one fd at a time: a path this deep is
    past PATH_MAX, and a walk per path would recurse."""
    top.mkdir(parents=True, exist_ok=True)
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(levels):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
        out = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, leaf)
        os.close(out)
    finally:
        os.close(fd)


class BytesReader:
    """An async reader over ``data`` that hands out at most ``step`` per read."""

    def __init__(self, data: bytes, step: int | None = None) -> None:
        self._data = memoryview(data)
        self._step = step

    async def read(self, max_bytes: int) -> bytes:
        n = max_bytes if self._step is None else min(max_bytes, self._step)
        piece, self._data = self._data[:n], self._data[n:]
        await trio.lowlevel.checkpoint()
        return bytes(piece)


def tar_of(files: dict[str, bytes]) -> bytes:
    """An in-memory tar archive holding ``files`` (name -> content)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def untar(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        found = {}
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read()
        return found


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def our_threads() -> set[int]:
    # trio keeps idle worker threads ("Trio thread N") cached process-wide
    # for reuse; they are the runtime's, not boxfiles', so they are not
    # counted.
    return {t.ident or 0 for t in threading.enumerate() if not t.name.startswith("Trio thread")}


def trio_tasks() -> int:
    def count(task: trio.lowlevel.Task) -> int:
        return 1 + sum(count(child) for n in task.child_nurseries for child in n.child_tasks)

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return count(root)


def assert_no_asyncio_tasks() -> None:
    """Inside an open_client block: no asyncio task is left running."""
    loop = current_loop.get()
    assert loop is not None, "call this inside an open_client block"
    assert asyncio.all_tasks(loop) == set()


class Leaks:
    """Snapshot of fds, threads and trio tasks, compared by :meth:`check`."""

    def __init__(self) -> None:
        self.fds = open_fds()
        self.threads = our_threads()
        self.tasks = trio_tasks()

    async def check(self) -> None:
        # A peer notices a closed connection a moment later (EOF then
        # connection_lost); allow it that moment, generously.
        with trio.move_on_after(2):
            while open_fds() - self.fds:
                await trio.sleep(0.01)
        assert open_fds() - self.fds == set(), "file descriptors leaked"
        assert our_threads() - self.threads == set(), "threads leaked"
        assert trio_tasks() == self.tasks, "trio tasks leaked"
