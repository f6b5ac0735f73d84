"""The server streams: a 512 MiB upload is extracted with bounded memory."""

from __future__ import annotations

import tarfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

import boxfiles

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
