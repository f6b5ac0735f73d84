"""Peak memory of copy_in / copy_out is bounded by a few chunks, not the tree."""

from __future__ import annotations

import os
import tarfile
import tracemalloc
from pathlib import Path

import pytest

import boxfiles
from boxfiles._aio import ServerCall
from boxfiles._proto.files_pb2 import DownloadChunk, DownloadRequest

from ..helpers.scripted import scripted_server
from ..helpers.trees import make_file

MiB = 1024 * 1024
# As for upload_tar (see test_memory), plus copy_in's packing buffer and the
# chunk waiting in its channel, or copy_out's unpacking buffer, the chunk in
# its channel and the one tarfile is assembling for a write.
BOUND = boxfiles.DEFAULT_CHUNK_SIZE * (boxfiles.CHANNEL_CAPACITY + 14)


def make_tree(base: Path, size: int) -> Path:
    tree = base / "tree"
    tree.mkdir()
    make_file(tree / "big", size)
    for i in range(200):
        (tree / f"small-{i}").write_bytes(os.urandom(1000))
    return tree


@pytest.mark.slow
async def test_copy_in_peak_memory_is_bounded(sink: str, tmp_path: Path) -> None:
    peaks = []
    for size in (16 * MiB, 64 * MiB):
        base = tmp_path / str(size)
        base.mkdir()
        tree = make_tree(base, size)
        tracemalloc.start()
        try:
            async with boxfiles.open_client(sink) as client:
                tracemalloc.reset_peak()
                await client.copy_in(tree, "/t")
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    print(f"peak traced: copy_in 16 MiB {peaks[0] / MiB:.1f} MiB, 64 MiB {peaks[1] / MiB:.1f} MiB")
    assert max(peaks) < BOUND


@pytest.mark.slow
async def test_copy_out_peak_memory_is_bounded(sock_dir: Path, tmp_path: Path) -> None:
    """The scripted server runs in this process; it makes each chunk on the
    fly and holds one at a time, so its share of the peak is small."""
    size = 64 * MiB
    block = bytes(range(256)) * 4096

    async def stream(call: ServerCall[DownloadRequest, DownloadChunk]) -> None:
        await call.recv()
        header = _file_header("d/big", size)
        await call.send(DownloadChunk(data=_dir_header("d") + header, source_is_dir=True))
        for _ in range(size // MiB):
            await call.send(DownloadChunk(data=block))
        await call.send(DownloadChunk(data=bytes(10240)))

    async with scripted_server(sock_dir, download=stream) as srv:
        tracemalloc.start()
        try:
            async with boxfiles.open_client(srv.target) as client:
                tracemalloc.reset_peak()
                await client.copy_out("/d", tmp_path / "out")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    print(f"peak traced: copy_out 64 MiB {peak / MiB:.1f} MiB")
    assert (tmp_path / "out" / "big").stat().st_size == size
    assert peak < BOUND


def _dir_header(name: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info.tobuf(tarfile.PAX_FORMAT)


def _file_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(tarfile.PAX_FORMAT)
