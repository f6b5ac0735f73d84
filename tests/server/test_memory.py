"""The server streams with bounded memory: a 512 MiB upload is extracted in
chunks, and stalled downloads hold a chunk each."""

from __future__ import annotations

import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._aio import open_channel
from boxfiles._proto.files_pb2 import DownloadRequest
from boxfiles._server._service import SERVER_POOL_SIZE
from boxfiles._target import UnixTarget
from boxfiles._wire import DEFAULT_CHUNK_SIZE, DOWNLOAD

from ..helpers.processes import serve_process

MiB = 1024 * 1024
SIZE = 512 * MiB
#: Python allocations the client and the server together may hold at peak:
#: a few chunks in each channel, grpclib's buffers and tarfile's; nothing
#: that grows with the archive.
BOUND = 32 * MiB


class GeneratedTar:
    """A tar archive of one SIZE-byte file, produced as it is read."""

    def __init__(self) -> None:
        info = tarfile.TarInfo("big.bin")
        info.size = SIZE
        self._block = b"\x5a" * MiB
        self._pieces = self._generate(info.tobuf(tarfile.PAX_FORMAT))

    def _generate(self, header: bytes) -> Iterator[bytes]:
        yield header
        for _ in range(SIZE // MiB):
            yield self._block
        yield bytes(2 * tarfile.BLOCKSIZE)

    async def read(self, max_bytes: int) -> bytes:
        assert max_bytes >= MiB
        return next(self._pieces, b"")


@pytest.mark.slow
async def test_large_upload_has_bounded_memory(server: str, root: Path) -> None:
    tracemalloc.start()
    try:
        started = time.monotonic()
        async with boxfiles.open_client(server) as client:
            await client.upload_tar(GeneratedTar(), "/big.bin")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert (root / "big.bin").stat().st_size == SIZE
    (root / "big.bin").unlink()  # not 512 MiB left in pytest's kept tmp dirs
    print(f"512 MiB upload: peak traced {peak / MiB:.1f} MiB, {elapsed:.1f}s")
    assert peak < BOUND


def resident(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def settled(pid: int) -> int:
    """The process's RSS once it has stopped growing for a second."""
    last, steady = resident(pid), 0
    with trio.fail_after(30):
        while steady < 5:
            await trio.sleep(0.2)
            now = resident(pid)
            steady = steady + 1 if now <= last else 0
            last = max(last, now)
    return last


async def test_stalled_downloads_hold_a_chunk_each_and_the_servers_spares(
    tmp_path: Path, sock_dir: Path
) -> None:
    # Each client takes the first chunk, so the server packs ahead, then
    # reads nothing: a download holds its own chunk buffer, and all of them
    # together at most SERVER_POOL_SIZE more (each used to hold about 10).
    downloads = 24
    with open(tmp_path / "big.bin", "wb") as big:
        big.truncate(256 * MiB)  # sparse: reading it costs no disk
    sock = sock_dir / "s.sock"
    async with serve_process(tmp_path, sock) as server:
        base = await settled(server.pid)
        with trio.CancelScope() as scope:
            async with AsyncExitStack() as stack:
                for _ in range(downloads):
                    channel = await stack.enter_async_context(open_channel(UnixTarget(str(sock))))
                    call = await stack.enter_async_context(channel.open_call(DOWNLOAD))
                    await call.send(DownloadRequest(src_path="/big.bin"), end=True)
                    first = await call.recv()
                    assert first is not None
                    assert first.HasField("source_is_dir")
                    data = await call.recv()
                    assert data is not None
                    assert len(data.data) == DEFAULT_CHUNK_SIZE
                held = await settled(server.pid) - base
                scope.cancel()  # leaving by cancellation resets the calls
    print(f"{downloads} stalled downloads: server RSS +{held / MiB:.0f} MiB")
    assert held < (downloads + SERVER_POOL_SIZE) * DEFAULT_CHUNK_SIZE + 24 * MiB
