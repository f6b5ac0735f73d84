"""Peak memory of an upload is bounded by the chunk size, not the file size."""

from __future__ import annotations

import tracemalloc
from functools import partial
from pathlib import Path

import pytest
import trio

import boxfiles
from boxfiles._chunks import POOL_SIZE
from boxfiles._client._local import CLIENT_POOL_SIZE

from ..helpers.trees import make_file

MiB = 1024 * 1024
ROOT = Path(__file__).resolve().parent.parent


async def peak_upload(target: str, source: Path, chunk_size: int) -> int:
    tracemalloc.start()
    try:
        async with boxfiles.open_client(target) as client:
            tracemalloc.reset_peak()
            await client.upload_tar(source, "/big", chunk_size=chunk_size)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.slow
async def test_upload_peak_memory_is_bounded_by_chunk_size(sink: str, tmp_path: Path) -> None:
    chunk_size = boxfiles.DEFAULT_CHUNK_SIZE
    # Chunks alive at the worst moment: POOL_SIZE buffers (CHANNEL_CAPACITY
    # queued, one being read, one being sent), and the transport's buffer of
    # unsent frames (WRITE_BUFFER_HIGH and one frame) with small change.
    bound = chunk_size * (POOL_SIZE + 2)
    small = await peak_upload(sink, make_file(tmp_path / "s", 16 * MiB), chunk_size)
    big = await peak_upload(sink, make_file(tmp_path / "b", 256 * MiB), chunk_size)
    print(f"peak traced: 16 MiB upload {small / MiB:.1f} MiB, 256 MiB upload {big / MiB:.1f} MiB")
    # One constant bound for both: sixteen times the data, no more memory.
    assert small < bound
    assert big < bound


@pytest.mark.slow
async def test_concurrent_uploads_share_one_bounded_pool(sink: str, tmp_path: Path) -> None:
    # However many uploads one client runs at once, each holds one chunk
    # buffer of its own and they share CLIENT_POOL_SIZE spares; each on its
    # own would hold up to POOL_SIZE, 240 chunks for these 40. Besides the
    # chunks: 40 streams' state and the transport's buffer.
    chunk_size, uploads = 256 * 1024, 40
    source = make_file(tmp_path / "s", 16 * MiB)
    tracemalloc.start()
    try:
        async with boxfiles.open_client(sink) as client:
            tracemalloc.reset_peak()
            async with trio.open_nursery() as nursery:
                for _ in range(uploads):
                    nursery.start_soon(
                        partial(client.upload_tar, source, "/big", chunk_size=chunk_size)
                    )
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    print(f"peak traced: {uploads} concurrent uploads {peak / MiB:.1f} MiB")
    assert peak < chunk_size * (uploads + CLIENT_POOL_SIZE) + 8 * MiB
